"""Saves and loads of one path at the same time, failed and killed saves.

`ne.save` to a path must leave, at every moment, one whole version there
(the old one or one of the new ones): concurrent saves serialise (or fail
clearly), a failed or killed save leaves the old version loadable, and a
reader loading throughout gets one of the written versions, exactly.

The concurrent tests fork their writers and reader from one helper process
that has imported named_embed but not started JAX (so forking is safe and
each child skips the import); every child starts JAX on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import named_embed as ne
from named_embed._src.files import directory_saves, stored_tensors

needs_posix = pytest.mark.skipif(
  directory_saves.fcntl is None or not hasattr(os, "fork"),
  reason="serialised saves need fcntl.flock; the helper forks (POSIX)",
)

INDEX = "model.safetensors.index.json"
ROWS, DIM = 64, 16


def table_of(writer: int, number: int, rows: int = ROWS, dim: int = DIM):
  """Version ``number`` of writer ``writer``: other rows for each; odd
  numbers quantised."""
  seed = 1000 * writer + number
  values = np.random.default_rng(seed).normal(size=(rows, dim))
  table = ne.EmbeddingTable.from_pretrained(values.astype(np.float32))
  return table.quantized("int8") if number % 2 else table


def fingerprint(table) -> str:
  """A digest of the table's kind and of every array in it, bit for bit."""
  digest = hashlib.sha256(type(table).__name__.encode())
  for leaf in jax.tree_util.tree_leaves(table):
    array = np.asarray(leaf)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


HELPER = r"""
import json, os, sys, time
config = json.loads(sys.argv[1])
sys.path.insert(0, config["tests"])
import named_embed as ne  # imported before forking; JAX is not started
from concurrent_saves_test import fingerprint, table_of
path, work = config["path"], config["work"]
stop = os.path.join(work, "stop")

def write(writer):
  outcomes = []
  for number in range(config["saves"]):
    table = table_of(writer, number, config["rows"], config["dim"])
    try:
      ne.save(table, path)
      outcomes.append({"saved": fingerprint(table)})
    except Exception as error:
      outcomes.append({"error": f"{type(error).__name__}: {error}"})
  return outcomes

def read():
  outcomes = []
  while not os.path.exists(stop) or len(outcomes) < 5:
    try:
      outcomes.append({"loaded": fingerprint(ne.load(path))})
    except Exception as error:
      outcomes.append({"error": f"{type(error).__name__}: {error}"})
  return outcomes

def child(role, run):
  pid = os.fork()
  if pid == 0:
    code = 0
    try:
      result = run()
      with open(os.path.join(work, f"{role}.json"), "w") as f:
        json.dump(result, f)
    except BaseException:
      import traceback
      traceback.print_exc()
      code = 1
    os._exit(code)
  return pid

started = time.perf_counter()
reader = child("reader", read)
writers = [
  child(f"writer{w}", lambda w=w: write(w)) for w in range(config["writers"])
]
codes = [os.waitpid(pid, 0)[1] for pid in writers]
open(stop, "w").close()
codes.append(os.waitpid(reader, 0)[1])
print(json.dumps({"codes": codes, "seconds": time.perf_counter() - started}))
"""


def run_helper(path, work, writers=2, saves=15):
  config = {
    "path": str(path),
    "work": str(work),
    "tests": os.path.dirname(os.path.abspath(__file__)),
    "writers": writers,
    "saves": saves,
    "rows": ROWS,
    "dim": DIM,
  }
  done = subprocess.run(
    [sys.executable, "-c", HELPER, json.dumps(config)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["codes"] == [0] * (writers + 1), done.stderr[-3000:]
  results = {
    name[: -len(".json")]: json.loads((work / name).read_text())
    for name in os.listdir(work)
    if name.endswith(".json")
  }
  return results, summary["seconds"]


@needs_posix
@pytest.mark.parametrize("layout", ["directory", "file"])
def test_concurrent_saves_and_a_reader_see_whole_versions_only(
  tmp_path, layout
):
  path = tmp_path / ("out" if layout == "directory" else "t.safetensors")
  work = tmp_path / "work"
  work.mkdir()
  first = table_of(9, 0)
  ne.save(first, path)
  writers, saves = 2, 15
  expected = {fingerprint(first)}
  final = set()
  for writer in range(writers):
    for number in range(saves):
      version = fingerprint(table_of(writer, number))
      expected.add(version)
      if number == saves - 1:
        final.add(version)
  results, seconds = run_helper(path, work, writers, saves)
  for writer in range(writers):
    outcomes = results[f"writer{writer}"]
    assert len(outcomes) == saves
    errors = [o["error"] for o in outcomes if "error" in o]
    assert errors == [], errors  # serialised: every save succeeds
    assert all(o["saved"] in expected for o in outcomes)
  loads = results["reader"]
  errors = [o["error"] for o in loads if "error" in o]
  assert errors == [], (len(errors), len(loads), errors[:3])
  assert all(o["loaded"] in expected for o in loads)
  assert len({o["loaded"] for o in loads}) >= 2  # it saw saves happen
  assert fingerprint(ne.load(path)) in final  # the last save of a writer
  if layout == "directory":  # the last version's files and index only
    index = json.loads((path / INDEX).read_text())
    listed = set(index["weight_map"].values())
    assert sorted(os.listdir(path)) == sorted([*listed, INDEX])
  else:  # no temporaries left
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors", "work"]
  assert seconds < 30


def test_a_reader_keeps_the_version_it_opened(tmp_path):
  """Files opened before a save replaced them are read whole and exact."""
  for path in (tmp_path / "out", tmp_path / "t.safetensors"):
    old, new = table_of(1, 0), table_of(1, 1)
    ne.save(old, path)
    opened = stored_tensors.open_tensors(path, ["embeddings"])
    ne.save(new, path)  # a quantised table: other tensors, files removed
    rows = opened["embeddings"].read()
    assert rows.tobytes() == np.asarray(old.rows_array()).tobytes()
    assert fingerprint(ne.load(path)) == fingerprint(new)


@pytest.mark.parametrize("layout", ["directory", "file"])
def test_a_save_between_the_metadata_and_the_tensors(tmp_path, layout):
  """`ne.load` reads the metadata and the tensors of one version, even when
  a save of another kind lands between the two."""
  path = tmp_path / ("out" if layout == "directory" else "t.safetensors")
  old, new = table_of(2, 0), table_of(2, 1)
  ne.save(old, path)
  calls = []

  def open_saved(path, keys, check=None):
    def keys_then_save(metadata):
      if not calls:  # once: the retry sees the new version
        calls.append(metadata)
        ne.save(new, path)
      return keys(metadata)

    return stored_tensors.open_tensors(path, keys_then_save, check)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ne._src.files.distributed_io, "open_saved", open_saved)
    loaded = ne.load(path)
  assert calls
  # the version whose metadata was read (a file), or the newer one (a
  # directory whose files the save removed: its index is read again)
  want = old if layout == "file" else new
  assert fingerprint(loaded) == fingerprint(want)


# ------------------------------------------------- failed and killed saves


FAILING = r"""
import json, os, resource, signal, sys
import numpy as np
import named_embed as ne
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it: EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
rows = np.ones((512, 128), np.float32)  # 256 KiB: more than the limit
try:
  ne.save(ne.EmbeddingTable.from_pretrained(rows), sys.argv[1])
  print(json.dumps({"saved": True}))
except Exception as error:
  print(json.dumps({"type": type(error).__name__, "message": str(error),
                    "oserror": isinstance(error, OSError)}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("layout", ["directory", "file"])
def test_a_save_that_runs_out_of_space_leaves_the_old_version(tmp_path, layout):
  path = tmp_path / ("out" if layout == "directory" else "t.safetensors")
  old = table_of(3, 0)  # 4 KiB
  ne.save(old, path)
  where = path if layout == "directory" else tmp_path
  before = sorted(os.listdir(where))
  done = subprocess.run(
    [sys.executable, "-c", FAILING, str(path), str(64 << 10)],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  outcome = json.loads(done.stdout.strip().splitlines()[-1])
  assert "File too large" in outcome["message"], outcome
  assert outcome["oserror"], outcome  # (on every process of a save)
  assert sorted(os.listdir(where)) == before  # nothing of the failed save
  assert fingerprint(ne.load(path)) == fingerprint(old)


KILLED = r"""
import os, sys, time
import numpy as np
import named_embed as ne
from named_embed._src.files import directory_saves
where = sys.argv[2]
real = {"file": directory_saves.write_tensor_file,
        "index": directory_saves._write_index}[where]

def stalled(*args):
  real(*args) if where == "file" else None  # a file written, not renamed
  print("stalled", flush=True)
  time.sleep(60)

name = "write_tensor_file" if where == "file" else "_write_index"
setattr(directory_saves, name, stalled)
rows = np.full((32, 8), 7.0, np.float32)
ne.save(ne.EmbeddingTable.from_pretrained(rows).quantized("int8"), sys.argv[1])
"""


@needs_posix
@pytest.mark.parametrize("where", ["file", "index"])
def test_a_killed_save_leaves_the_old_version(tmp_path, where):
  out = tmp_path / "out"
  old = table_of(4, 0)
  ne.save(old, out)
  before = sorted(os.listdir(out))
  saver = subprocess.Popen(
    [sys.executable, "-c", KILLED, str(out), where],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert saver.stdout.readline().strip() == "stalled"
    os.kill(saver.pid, signal.SIGKILL)
    saver.wait(timeout=30)
  finally:
    if saver.poll() is None:
      saver.kill()
    saver.stdout.close()
  left = sorted(set(os.listdir(out)) - set(before))
  assert left, "the killed save left nothing to clean up"
  assert fingerprint(ne.load(out)) == fingerprint(old)
  newer = table_of(4, 1)
  ne.save(newer, out)  # removes the killed save's files and temporaries
  index = json.loads((out / INDEX).read_text())
  listed = set(index["weight_map"].values())
  assert sorted(os.listdir(out)) == sorted([*listed, INDEX])
  assert fingerprint(ne.load(out)) == fingerprint(newer)


@needs_posix
def test_a_second_save_waits_for_the_running_one(tmp_path, monkeypatch):
  """The lock serialises saves of one directory; one held too long gives
  a clear TimeoutError and changes nothing."""
  out = tmp_path / "out"
  old = table_of(5, 0)
  ne.save(old, out)
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(out)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    monkeypatch.setenv("NAMED_EMBED_SYNC_TIMEOUT", "0.5")
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match="another save of it"):
      ne.save(table_of(5, 1), out)
    assert 0.4 < time.perf_counter() - started < 5
    assert fingerprint(ne.load(out)) == fingerprint(old)
  finally:
    holder.stdin.close()
    holder.wait(timeout=30)
    holder.stdout.close()
  ne.save(table_of(5, 1), out)  # the lock is free again
  assert fingerprint(ne.load(out)) == fingerprint(table_of(5, 1))


HOLD = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


# ------------------------------------------------ files rewritten in place


REWRITER = r"""
import os, sys, time
versions = [open(p, "rb").read() for p in sys.argv[2:]]
end = time.monotonic() + 3
k = 0
while time.monotonic() < end:
  with open(sys.argv[1], "r+b") as f:  # as `cp` over it: truncate, write
    f.truncate(0)
    f.write(versions[k % len(versions)])
  k += 1
print(k)
"""


@needs_posix
def test_a_file_rewritten_in_place_never_crashes_the_reader(tmp_path):
  """`cp` over a file being read: each load gives a version or a clear
  error, never SIGBUS."""
  sources = []
  for number in range(2):  # a plain and a quantised table
    source = tmp_path / f"v{number}.safetensors"
    ne.save(table_of(6, number, 256, 64), source)
    sources.append(source)
  path = tmp_path / "t.safetensors"
  path.write_bytes(sources[0].read_bytes())
  expected = {fingerprint(ne.load(s)) for s in sources}
  rewriter = subprocess.Popen(
    [sys.executable, "-c", REWRITER, str(path), *map(str, sources)],
    stdout=subprocess.PIPE,
    text=True,
  )
  loaded, errors = 0, []
  try:
    while rewriter.poll() is None:
      try:
        assert fingerprint(ne.load(path)) in expected
        loaded += 1
      except (ValueError, OSError) as error:
        assert str(path) in str(error), error
        errors.append(error)
  finally:
    rewriter.wait(timeout=30)
    rewriter.stdout.close()
  assert loaded + len(errors) > 10, (loaded, errors[:3])


def test_fingerprints_identify_versions(tmp_path):
  """The fingerprints the tests compare tell versions and kinds apart, and
  survive a save and a load."""
  plain, quantised = table_of(7, 0), table_of(7, 1)
  assert isinstance(quantised, ne.QuantizedTable)
  assert isinstance(plain, ne.EmbeddingTable)
  assert fingerprint(plain) != fingerprint(quantised)
  assert fingerprint(plain) != fingerprint(table_of(8, 0))
  for table in (plain, quantised):
    ne.save(table, tmp_path / "t.safetensors")
    assert fingerprint(ne.load(tmp_path / "t.safetensors")) == fingerprint(
      table
    )
