"""Crash leftovers of `ne.save` and `ne.save_word2vec` (`_src.files.atomic`).

A save killed with ``kill -9`` cannot remove its temporary directory; the
next save of the same path must remove it, but never the temporary of a
save of that path that is still running (another process or thread).

The kill test forks its savers from one helper process that has imported
named_embed but not started JAX (so forking is safe and each saver skips
the two-second import); the helper stops after each kill until this test
has looked at the directory and loaded the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import safetensors.numpy

import named_embed as ne
from named_embed._src.files import atomic, word2vec

needs_locks = pytest.mark.skipif(
  atomic.fcntl is None or not hasattr(os, "fork"),
  reason="crash cleanup needs fcntl.flock (POSIX); the kill test os.fork",
)

ROWS, DIM = 16384, 512  # 32 MiB of float32
PATHS = {"safetensors": "t.safetensors", "word2vec": "t.bin"}


@functools.cache
def pattern(rows: int, dim: int) -> np.ndarray:
  return np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) % 1000


def rows_of(version: int, rows: int = ROWS, dim: int = DIM) -> np.ndarray:
  """The rows of save number ``version``: recognisable from any one value."""
  return pattern(rows, dim) + np.float32(1000 * version)


def table_of(version: int, rows: int = ROWS, dim: int = DIM):
  tokens = [f"w{i}" for i in range(rows)]
  return ne.EmbeddingTable.from_pretrained(
    rows_of(version, rows, dim)
  ).with_vocabulary(ne.Vocabulary(tokens))


def save(kind: str, table, path) -> None:
  if kind == "safetensors":
    ne.save(table, path)
  else:
    ne.save_word2vec(table, path, binary=True)


def load_rows(kind: str, path) -> np.ndarray:
  if kind == "safetensors":
    table = ne.load(path)
  else:
    table = ne.load_word2vec(path, binary=True)
  return np.asarray(table.rows_array())


def temporaries(directory, name: str) -> list[str]:
  """The temporaries of saves of ``directory/name``, by the module's pattern."""
  pattern = re.compile(re.escape(f".{name}.") + r"[0-9a-f]{8}\.tmp")
  return sorted(n for n in os.listdir(directory) if pattern.fullmatch(n))


def version_in(kind: str, path, rows: int = ROWS, dim: int = DIM) -> int:
  """Loads ``path``, checks it is one whole table, returns its version."""
  loaded = load_rows(kind, path)
  version = int(loaded[0, 0]) // 1000
  assert np.array_equal(loaded, rows_of(version, rows, dim)), version
  return version


# ------------------------------------------------------ kill -9, repeatedly

HELPER = r"""
import json, os, random, re, signal, sys, time

import named_embed as ne
import numpy as np

config = json.loads(sys.argv[1])
directory = config["directory"]
rng = random.Random(config["seed"])
rows, dim = config["rows"], config["dim"]
pattern = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) % 1000
tokens = [f"w{i}" for i in range(rows)]


def table_of(version):
  values = pattern + np.float32(1000 * version)
  return ne.EmbeddingTable.from_pretrained(values).with_vocabulary(
    ne.Vocabulary(tokens)
  )


def start(kind, path, version):
  # A saver, forked: JAX starts in the child, never in this process.
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:
    status = 1
    try:
      os.close(read_end)
      table = table_of(version)
      os.write(write_end, b"s")
      if kind == "safetensors":
        ne.save(table, path)
      else:
        ne.save_word2vec(table, path, binary=True)
      os.write(write_end, b"d")
      status = 0
    finally:
      os._exit(status)
  os.close(write_end)
  assert os.read(read_end, 1) == b"s", "the saver failed before saving"
  return pid, read_end


def finish(pid, read_end):
  _, status = os.waitpid(pid, 0)
  done = os.read(read_end, 1) == b"d"
  os.close(read_end)
  return done and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def wait_for_new_temporary(name, before, limit):
  # The saver's temporary directory, once it has locked it: the saver
  # creates the file to write in it right after.
  pattern = re.compile(re.escape(f".{name}.") + r"[0-9a-f]{8}\.tmp")
  deadline = time.monotonic() + limit
  while time.monotonic() < deadline:
    for found in os.listdir(directory):
      if pattern.fullmatch(found) and found not in before:
        if os.listdir(os.path.join(directory, found)):
          return found
    time.sleep(0.0005)
  return None


def report(**fields):
  print(json.dumps(fields), flush=True)
  assert sys.stdin.readline().strip() == "ok"


for kind, name in config["paths"].items():
  path = os.path.join(directory, name)
  pid, pipe = start(kind, path, 0)
  begun = time.monotonic()
  assert finish(pid, pipe)
  duration = time.monotonic() - begun
  report(phase="first", kind=kind, version=0, completed=True)
  for version in range(1, config["kills"] + 1):
    before = set(os.listdir(directory))
    pid, pipe = start(kind, path, version)
    if version % 2:  # any moment of the save
      time.sleep(rng.uniform(0, 1.2 * duration))
    else:  # inside the save, once it has made its temporary
      wait_for_new_temporary(name, before, 5 * duration + 1)
      time.sleep(rng.uniform(0, 0.2 * duration))
    os.kill(pid, signal.SIGKILL)
    report(phase="killed", kind=kind, version=version,
           completed=finish(pid, pipe))
  # A live saver, stopped inside its save: the test saves meanwhile.
  version = config["kills"] + 1
  before = set(os.listdir(directory))
  pid, pipe = start(kind, path, version)
  frozen = wait_for_new_temporary(name, before, 5 * duration + 1)
  os.kill(pid, signal.SIGSTOP)
  report(phase="stopped", kind=kind, version=version, frozen=frozen, pid=pid)
  os.kill(pid, signal.SIGCONT)
  report(phase="resumed", kind=kind, version=version,
         completed=finish(pid, pipe))
print(json.dumps({"end": True}), flush=True)
"""


@needs_locks
def test_killed_saves_leave_at_most_one_temporary_and_a_whole_file(
  tmp_path,
):
  kills = 8
  unrelated = [
    ".tmpAbC123",  # the name safetensors' own temporaries have
    ".t.safetensors.notes.tmp",
    ".t.safetensors.0123ABCD.tmp",
    ".xt.safetensors.0123abcd.tmp",
    "t.safetensors.0123abcd.tmp",
    ".t.safetensors.0123abcd.tmp.bak",
    ".other.safetensors.0123abcd.tmp",  # another path's, stale
  ]
  for name in unrelated:
    (tmp_path / name).write_text("not ours")
  config = {
    "directory": str(tmp_path),
    "seed": 0,
    "kills": kills,
    "rows": ROWS,
    "dim": DIM,
    "paths": PATHS,
  }
  helper = subprocess.Popen(
    [sys.executable, "-c", HELPER, json.dumps(config)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  completed = {kind: set() for kind in PATHS}
  stale_seen = {kind: set() for kind in PATHS}
  stopped = None  # the pid of a saver stopped with SIGSTOP
  try:
    while True:
      line = helper.stdout.readline()
      assert line, f"the helper died (exit status {helper.wait()})"
      event = json.loads(line)
      if event.get("end"):
        break
      kind, version = event["kind"], event["version"]
      name = PATHS[kind]
      path = tmp_path / name
      left = temporaries(tmp_path, name)
      if event["phase"] == "stopped":
        # A live save of the same path: another save leaves its temporary.
        stopped = event["pid"]
        frozen = event["frozen"]
        assert frozen is not None and left == [frozen]
        inside = sorted(os.listdir(tmp_path / frozen))
        save(kind, table_of(100, 64, 8), path)
        assert temporaries(tmp_path, name) == [frozen]
        assert sorted(os.listdir(tmp_path / frozen)) == inside  # untouched
        assert version_in(kind, path, 64, 8) == 100
      elif event["phase"] == "resumed":
        # The stopped save went on and replaced the file.
        stopped = None
        assert event["completed"]
        assert version_in(kind, path) == version
        assert left == []
      else:
        # At most the killed save's temporary: it removed earlier ones.
        assert len(left) <= 1, left
        stale_seen[kind].update(left)
        found = version_in(kind, path)
        if event["completed"]:
          completed[kind].add(version)
          assert found == version
        else:
          assert found in completed[kind] or found == version
          assert found >= max(completed[kind])
          completed[kind].add(found)  # killed after its rename
      helper.stdin.write("ok\n")
      helper.stdin.flush()
    assert helper.wait(timeout=30) == 0
  finally:
    if helper.poll() is None:
      helper.kill()
      helper.wait()
    if stopped is not None:  # left stopped by a failure above
      with contextlib.suppress(ProcessLookupError):
        os.kill(stopped, signal.SIGKILL)
    helper.stdin.close()
    helper.stdout.close()
  for kind, seen in stale_seen.items():
    # Several saves were killed inside their save and cleaned up after.
    assert len(seen) >= 3, (kind, seen)
  assert sorted(os.listdir(tmp_path)) == sorted([*unrelated, *PATHS.values()])


# ------------------------------------------- saves running at the same time


HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@needs_locks
@pytest.mark.parametrize("kind", PATHS)
def test_a_temporary_locked_by_a_live_process_is_kept(tmp_path, kind):
  name = PATHS[kind]
  path = tmp_path / name
  held = tmp_path / f".{name}.0123abcd.tmp"
  held.mkdir()
  (held / name).write_bytes(b"half a table")
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(held)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "locked\n"
    save(kind, table_of(1, 8, 4), path)
    assert temporaries(tmp_path, name) == [held.name]
    assert (held / name).read_bytes() == b"half a table"
  finally:
    holder.stdin.close()  # the holder exits, the kernel drops its lock
    holder.wait()
    holder.stdout.close()
  save(kind, table_of(2, 8, 4), path)
  assert sorted(os.listdir(tmp_path)) == [name]
  assert version_in(kind, path, 8, 4) == 2


def blocking_writer(kind, monkeypatch, worker_name: str):
  """Makes saves in thread ``worker_name`` stop mid-write until released."""
  started, release = threading.Event(), threading.Event()

  def pause():
    if threading.current_thread().name == worker_name:
      started.set()
      assert release.wait(timeout=30)

  if kind == "safetensors":
    real = safetensors.numpy.save_file

    def save_file(tensors, filename, metadata=None):
      real(tensors, filename, metadata=metadata)
      pause()

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
  else:
    real = word2vec._write_binary

    def write_binary(f, tokens, rows):
      real(f, tokens, rows)
      pause()

    monkeypatch.setattr(word2vec, "_write_binary", write_binary)
  return started, release


@needs_locks
@pytest.mark.parametrize("kind", PATHS)
def test_a_save_running_in_another_thread_keeps_its_temporary(
  tmp_path, monkeypatch, kind
):
  name = PATHS[kind]
  path = tmp_path / name
  started, release = blocking_writer(kind, monkeypatch, "slow saver")
  errors = []

  def slow_save():
    try:
      save(kind, table_of(1, 8, 4), path)
    except BaseException as error:  # reported by the main thread
      errors.append(error)

  worker = threading.Thread(target=slow_save, name="slow saver")
  worker.start()
  try:
    assert started.wait(timeout=30)
    running = temporaries(tmp_path, name)
    assert len(running) == 1
    save(kind, table_of(2, 8, 4), path)  # cleans up before saving
    assert temporaries(tmp_path, name) == running
    assert version_in(kind, path, 8, 4) == 2
  finally:
    release.set()
    worker.join(timeout=30)
  assert not errors
  assert version_in(kind, path, 8, 4) == 1  # the slow save finished last
  assert sorted(os.listdir(tmp_path)) == [name]


# ------------------------------------------------------------- unit tests


@needs_locks
def test_stale_temporaries_of_the_path_only_are_removed(tmp_path):
  path = tmp_path / "t.safetensors"
  ours = [".t.safetensors.0123abcd.tmp", ".t.safetensors.89ef4567.tmp"]
  for name in ours:  # as killed saves leave them
    (tmp_path / name).mkdir()
    (tmp_path / name / ".tmpAbC123").write_bytes(b"x" * 100)
  (tmp_path / ".t.safetensors.fedcba98.tmp").write_bytes(b"old version")
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep").write_text("keep")
  (tmp_path / ".t.safetensors.00000000.tmp").symlink_to(outside)
  (tmp_path / ".t.sa.0123abcd.tmp").mkdir()
  removed = atomic.remove_stale_temporaries(path)
  assert sorted(os.path.basename(p) for p in removed) == sorted(
    [*ours, ".t.safetensors.fedcba98.tmp"]
  )
  assert sorted(os.listdir(tmp_path)) == [
    ".t.sa.0123abcd.tmp",
    ".t.safetensors.00000000.tmp",  # a symbolic link: never followed
    "outside",
  ]
  assert (outside / "keep").read_text() == "keep"


def test_without_fcntl_stale_temporaries_are_left_alone(tmp_path, monkeypatch):
  monkeypatch.setattr(atomic, "fcntl", None)
  stale = tmp_path / ".t.safetensors.0123abcd.tmp"
  stale.mkdir()
  path = tmp_path / "t.safetensors"
  ne.save(table_of(1, 8, 4), path)
  assert sorted(os.listdir(tmp_path)) == [stale.name, "t.safetensors"]
  assert version_in("safetensors", path, 8, 4) == 1


@needs_locks
def test_a_temporary_removed_before_it_was_locked_is_replaced(
  tmp_path, monkeypatch
):
  # Another save's cleanup may find the new, still empty, directory before
  # its writer locks it, and delete it: the writer starts over.
  real_lock = atomic._lock
  removed = []

  def lock_after_a_cleanup(work):
    if not removed:
      removed.extend(atomic.remove_stale_temporaries(tmp_path / "t.bin"))
    return real_lock(work)

  monkeypatch.setattr(atomic, "_lock", lock_after_a_cleanup)
  path = tmp_path / "t.bin"
  save("word2vec", table_of(3, 8, 4), path)
  assert len(removed) == 1
  assert version_in("word2vec", path, 8, 4) == 3
  assert os.listdir(tmp_path) == ["t.bin"]


class FlockDuringACleanup:
  """`fcntl` whose first blocking lock finds a cleanup deleting the directory.

  (The writer has opened its directory; a cleanup locked it first, deletes
  it and unlocks; then the writer's lock goes through.)
  """

  def __init__(self, real, directory):
    self.real, self.directory = real, directory
    self.LOCK_EX, self.LOCK_NB = real.LOCK_EX, real.LOCK_NB
    self.deleted = []

  def flock(self, fd, operation):
    if operation == self.LOCK_EX and not self.deleted:
      for name in os.listdir(self.directory):
        if atomic.is_temporary(name):
          os.rmdir(os.path.join(self.directory, name))
          self.deleted.append(name)
    return self.real.flock(fd, operation)


@needs_locks
def test_a_temporary_deleted_while_its_writer_waited_for_the_lock_is_replaced(
  tmp_path, monkeypatch
):
  fake = FlockDuringACleanup(atomic.fcntl, tmp_path)
  monkeypatch.setattr(atomic, "fcntl", fake)
  path = tmp_path / "t.safetensors"
  save("safetensors", table_of(4, 8, 4), path)
  assert len(fake.deleted) == 1
  assert version_in("safetensors", path, 8, 4) == 4
  assert os.listdir(tmp_path) == ["t.safetensors"]


def test_saves_name_their_temporaries_recognisably(tmp_path, monkeypatch):
  seen = []
  real = safetensors.numpy.save_file

  def save_file(tensors, filename, metadata=None):
    seen.append(os.path.relpath(filename, tmp_path))
    seen.extend(os.listdir(tmp_path))
    real(tensors, filename, metadata=metadata)

  monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
  ne.save(table_of(1, 8, 4), tmp_path / "t.safetensors")
  work, listed = seen
  assert re.fullmatch(r"\.t\.safetensors\.[0-9a-f]{8}\.tmp", listed)
  assert work == os.path.join(listed, "t.safetensors")
  assert atomic.is_temporary(listed)
