"""Hostile checkpoint indexes and safetensors files: every reader error is a
quick `ValueError` (bad content) or `OSError` (cannot read) naming the
file; nothing hangs, fills memory, or takes quadratic time."""

from __future__ import annotations

import json
import os
import random
import struct
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import named_embed as ne
from named_embed._src.files import stored_tensors, tensor_files
from named_embed._src.files.stored_tensors import block_name, open_tensor

INDEX = "model.safetensors.index.json"
W = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
posix_only = pytest.mark.skipif(
  not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX"
)


def readers(path):
  """Every reader of ``path`` (a file, or a directory and its index)."""
  yield lambda: ne.load(path)
  yield lambda: ne.from_safetensors(path, key="embeddings")
  yield lambda: stored_tensors.open_tensors(path, ["embeddings"])


def refused(path, match, named=None, error=ValueError):
  """Every reader of ``path`` raises ``error`` matching ``match`` that
  names ``named`` (default ``path``)."""
  for read in readers(path):
    with pytest.raises(error, match=match) as caught:
      read()
    assert str(named or path) in str(caught.value)


def checkpoint(tmp_path, name="out"):
  out = tmp_path / name
  ne.save(ne.EmbeddingTable.from_pretrained(W), out)
  return out


# ----------------------------------------------------------- the index


@posix_only
def test_an_index_linked_to_dev_zero_is_refused_at_once(tmp_path):
  out = checkpoint(tmp_path)
  (out / INDEX).unlink()
  (out / INDEX).symlink_to("/dev/zero")
  started = time.perf_counter()
  refused(
    out, "is a character device, not a regular file", out / INDEX, OSError
  )
  assert time.perf_counter() - started < 2


@posix_only
def test_an_index_that_is_a_fifo_is_refused_without_waiting(tmp_path):
  out = checkpoint(tmp_path)
  (out / INDEX).unlink()
  os.mkfifo(out / INDEX)
  outcome = []

  def load():
    try:
      ne.load(out)
    except OSError as error:
      outcome.append(str(error))

  thread = threading.Thread(target=load, daemon=True)
  thread.start()
  thread.join(timeout=20)
  assert not thread.is_alive(), "ne.load waits for a writer of the FIFO"
  assert outcome and "FIFO" in outcome[0] and str(out / INDEX) in outcome[0]


def test_a_huge_index_is_refused_before_it_is_read(tmp_path):
  out = checkpoint(tmp_path)
  with open(out / INDEX, "r+b") as f:
    f.truncate(100 << 20)  # sparse: no disk, but 100 MiB to read
  refused(out, r"is 104,857,600 bytes, more than the 67,108,864", out / INDEX)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_in_an_index_is_a_value_error(tmp_path, depth):
  out = checkpoint(tmp_path)
  spec = '{"weight_map": ' + "[" * depth + "]" * depth + "}"
  (out / INDEX).write_text(spec)
  match = (
    "nests arrays or objects too deeply"
    if depth > 10_000
    else ('needs a "weight_map" object')
  )
  refused(out, match, out / INDEX)


@pytest.mark.parametrize(
  "content", [b"\xff\xfe{}", b'{"weight_map": {"embeddings": "\xc3"}}']
)
def test_an_index_that_is_not_utf8_is_a_value_error(tmp_path, content):
  out = checkpoint(tmp_path)
  (out / INDEX).write_bytes(content)
  refused(out, r"is not valid JSON: byte [0-9]+ is not UTF-8", out / INDEX)


@pytest.mark.parametrize(
  "name", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors"]
)
def test_an_index_naming_a_file_outside_its_directory_is_refused(
  tmp_path, name
):
  out = checkpoint(tmp_path)
  ne.save(
    ne.EmbeddingTable.from_pretrained(W), tmp_path / "outside.safetensors"
  )
  spec = json.loads((out / INDEX).read_text())
  spec["weight_map"] = {"embeddings": name}
  (out / INDEX).write_text(json.dumps(spec))
  refused(out, "outside the index's directory; refusing to read it")


@posix_only
@pytest.mark.parametrize("kind", ["fifo", "directory", "dev_zero", "nul"])
def test_an_index_naming_a_file_that_is_not_regular_is_refused(tmp_path, kind):
  out = checkpoint(tmp_path)
  target = out / "odd.safetensors"
  if kind == "fifo":
    os.mkfifo(target)
  elif kind == "directory":
    target.mkdir()
  elif kind == "dev_zero":
    target.symlink_to("/dev/zero")
  spec = json.loads((out / INDEX).read_text())
  name = "odd\x00.safetensors" if kind == "nul" else target.name
  spec["weight_map"] = {"embeddings": name}
  (out / INDEX).write_text(json.dumps(spec))
  if kind == "nul":  # no such file can exist
    refused(out, "does not exist", out / INDEX, FileNotFoundError)
    return
  shown = {"fifo": r"a FIFO \(named pipe\)", "directory": "a directory"}
  match = f"is {shown.get(kind, 'a character device')}, not a regular file"
  refused(out, match, target, OSError)


def test_index_metadata_ne_save_never_writes_is_refused(tmp_path):
  out = checkpoint(tmp_path)
  spec = json.loads((out / INDEX).read_text())
  spec["metadata"]["table"] = {"kind": ["nested"]}
  (out / INDEX).write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"metadata entry 'table' .* not a str"):
    ne.load(out)


# ------------------------------------------------- safetensors files


@posix_only
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_file_that_is_not_regular_is_refused(tmp_path, kind):
  path = tmp_path / "t.safetensors"
  if kind == "fifo":
    os.mkfifo(path)
  else:
    path.symlink_to("/dev/zero")
  shown = r"a FIFO \(named pipe\)" if kind == "fifo" else "a character device"
  refused(path, f"is {shown}, not a regular file", error=OSError)


def header_file(path, header, data=b"", length=None):
  """A file of ``header`` (JSON-dumped unless bytes) and ``data``."""
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  count = len(raw) if length is None else length
  path.write_bytes(struct.pack("<Q", count) + raw + data)
  return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HEADERS = {
  "length past the end": (b"{}", b"", 1 << 40, "would take"),
  "length of 2**64-1": (b"{}", b"", (1 << 64) - 1, "would take"),
  "not utf-8": (b'{"\xff": 1}', b"", None, "not UTF-8 JSON"),
  "deep nesting": (b"[" * 100_000, b"", None, "nested too deeply"),
  "not an object": (b"[1, 2]", b"", None, "not a JSON object"),
  "metadata of numbers": ({"__metadata__": {"a": 1}}, b"", None, "strings"),
  "entry not an object": ({"w": 3}, b"", None, "not an object"),
  "negative shape": ({"w": entry(shape=(-2,))}, b"\0" * 8, None, "shape"),
  "boolean shape": ({"w": entry(shape=(True,))}, b"\0" * 8, None, "shape"),
  "float shape": ({"w": entry(shape=(2.0,))}, b"\0" * 8, None, "shape"),
  "huge empty shape": (
    {"w": entry(shape=(0, 1 << 40, 1 << 40), offsets=(0, 0))},
    b"",
    None,
    "too large",
  ),
  "rank 100": (
    {"w": entry(shape=(1,) * 100, offsets=(0, 4))},
    b"\0" * 4,
    None,
    "shape",
  ),  # fmt: skip
  "reversed offsets": (
    {"w": entry(offsets=(8, 0))},
    b"\0" * 8,
    None,
    "data offsets",
  ),  # fmt: skip
  "size mismatch": (
    {"w": entry(shape=(1 << 30,))},
    b"\0" * 8,
    None,
    "needs 4,294,967,296 bytes",
  ),  # fmt: skip
  "overlap": (
    {"a": entry(), "b": entry(offsets=(4, 12))},
    b"\0" * 12,
    None,
    "starts at byte 4",
  ),
  "gap": ({"w": entry(offsets=(4, 12))}, b"\0" * 12, None, "starts at byte 4"),
  "short data": ({"w": entry()}, b"\0" * 4, None, "tensors end at byte"),
  "data left over": ({"w": entry()}, b"\0" * 12, None, "tensors end at byte"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_hostile_headers_are_value_errors_naming_the_file(tmp_path, case):
  header, data, length, match = HEADERS[case]
  path = header_file(tmp_path / "bad.safetensors", header, data, length)
  for read in readers(path):
    with pytest.raises(ValueError, match="is not a valid safetensors") as e:
      read()
    assert match in str(e.value) and str(path) in str(e.value)


def test_a_block_that_claims_a_giant_region_is_refused_before_reading(
  tmp_path,
):
  path = tmp_path / "blocks.safetensors"
  save_file(
    {"w[0:1000000000000,0:4]": W[:1], "w[1000000000000:1000000000006,0:4]": W},
    path,
  )
  with pytest.raises(ValueError, match=r"has shape \(1, 4\).*needs shape"):
    open_tensor(path, "w")  # no terabyte allocated, no MemoryError
  huge = "w[0:" + "9" * 30 + ",0:4]"  # too many digits: not a block name
  save_file({huge: W}, path)
  with pytest.raises(ValueError, match="has no tensor 'w'"):
    open_tensor(path, "w")


def test_a_tensor_too_large_for_memory_is_an_os_error(tmp_path, monkeypatch):
  path = tmp_path / "t.safetensors"
  save_file({"w": W}, path)
  stored = open_tensor(path, "w")

  def no_memory(*args):
    raise MemoryError

  monkeypatch.setattr(np, "empty", no_memory)
  with pytest.raises(OSError, match=r"Cannot read .*t.safetensors.*96 bytes"):
    stored.read()


# ------------------------------------------------------ many blocks


def many_blocks(count, rows_per_block=1, dim=25):
  rows = np.arange(count * rows_per_block * dim, dtype=np.float32)
  whole = rows.reshape(count * rows_per_block, dim)
  blocks = {}
  for k in range(count):
    start, stop = (k * rows_per_block, 0), ((k + 1) * rows_per_block, dim)
    blocks[block_name("embeddings", start, stop)] = whole[start[0] : stop[0]]
  return whole, blocks


def test_eight_thousand_blocks_load_quickly(tmp_path):
  whole, blocks = many_blocks(8000)  # 0.8 MB
  plain = ne.EmbeddingTable.from_pretrained(whole)
  ne.save(plain, tmp_path / "reference.safetensors")
  metadata = tensor_files.open_file(
    str(tmp_path / "reference.safetensors")
  ).metadata
  names = list(blocks)
  random.Random(0).shuffle(names)  # in no particular order
  file = tmp_path / "blocks.safetensors"
  save_file({n: blocks[n] for n in names}, file, metadata=metadata)
  out = tmp_path / "out"
  out.mkdir()
  weight_map = {}
  for part in range(4):
    chosen = names[part::4]
    part_name = f"part-{part}.safetensors"
    save_file({n: blocks[n] for n in chosen}, out / part_name)
    weight_map.update({n: part_name for n in chosen})
  index = {"metadata": metadata, "weight_map": weight_map}
  (out / INDEX).write_text(json.dumps(index))
  for path in (file, out):
    started = time.perf_counter()
    table = ne.load(path)
    seconds = time.perf_counter() - started
    assert np.asarray(table.rows_array()).tobytes() == whole.tobytes()
    assert seconds < 2, (path, seconds)
  stored = open_tensor(out, "embeddings")
  started = time.perf_counter()
  for row in range(0, 8000, 8):  # a region at a time: only its blocks
    region = stored.read((slice(row, row + 3),))
    assert region.tobytes() == whole[row : row + 3].tobytes()
  assert time.perf_counter() - started < 2


# ------------------------------------------------------- mutations


def test_random_corruptions_give_value_or_os_errors_naming_the_file(tmp_path):
  """Bytes changed at random, files cut short: each read succeeds or raises
  a ValueError or OSError that names the file."""
  table = ne.EmbeddingTable.from_pretrained(W).quantized("int8")
  source = tmp_path / "q.safetensors"
  ne.save(table, source)
  raw = source.read_bytes()
  rng = random.Random(0)
  path = tmp_path / "bad.safetensors"
  outcomes = {"loaded": 0, "refused": 0}
  for _ in range(300):
    blob = bytearray(raw)
    if rng.random() < 0.3:
      blob = blob[: rng.randrange(len(blob))]
    else:
      for _ in range(rng.randint(1, 3)):
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    path.write_bytes(bytes(blob))
    try:
      stored = stored_tensors.open_tensors(path, ["codes", "scales"])
      for tensor in stored.values():
        tensor.read()
      outcomes["loaded"] += 1
    except (ValueError, OSError) as error:
      assert str(path) in str(error), error
      outcomes["refused"] += 1
  assert outcomes["refused"] > 100 and outcomes["loaded"] > 0, outcomes


def test_a_failing_read_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
  path = tmp_path / "t.safetensors"
  save_file({"w": W}, path)
  stored = open_tensor(path, "w")

  def failing(fd, buffers, offset):
    raise OSError(5, "Input/output error")

  monkeypatch.setattr(tensor_files, "_PREADV", failing)
  with pytest.raises(OSError, match=r"Cannot read .*t.safetensors at byte"):
    stored.read()
