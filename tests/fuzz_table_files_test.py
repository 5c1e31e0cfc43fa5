"""Fuzzing `ne.load` with damaged files of every kind of table, one file or
a checkpoint directory: every outcome is the table the file holds or a
ValueError / OSError naming the file, within a time and memory bound.

The oracle for a load that succeeds is independent of named_embed's
reader: the tensors of the loaded table are those the safetensors library
decodes from the (damaged) file, bit for bit, and when the damage leaves
the header alone, the table is the one that was saved. safetensors keeps
no checksum, so a flipped bit inside the numbers is a valid file holding
other numbers (docs/formats.md says so).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import tempfile
import time

import hypothesis
import hypothesis.strategies as st
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors

import named_embed as ne
from named_embed import formats

_INDEX = "model.safetensors.index.json"


def _tables():
  rng = np.random.default_rng(3)
  rows = rng.normal(size=(6, 4)).astype(np.float32)
  vocab = ne.Vocabulary(["<pad>", "a", "b", "c", "d", "e"], pad="<pad>")
  plain = ne.EmbeddingTable.from_pretrained(rows, freeze=False, name="t")
  bf16 = ne.EmbeddingTable.from_pretrained(
    rows.astype(ml_dtypes.bfloat16)
  ).with_vocabulary(vocab)
  key = jax.random.key(0)
  return {
    "plain": plain,
    "bf16": bf16,
    "int8": plain.quantized("int8"),
    "int4": plain.quantized("int4", group_size=2),
    "lora": bf16.with_lora(rank=2, alpha=2.0, name="l", init_base_rng=key),
    "rows": plain.with_trainable_rows([1, 4], name="r"),
  }


_SAVED: dict[tuple[str, bool], tuple[str, dict]] = {}


def _saved(kind: str, directory: bool) -> tuple[str, dict[str, bytes]]:
  """A saved file (or directory) of ``kind`` and its bytes, by name."""
  if (kind, directory) not in _SAVED:
    root = tempfile.mkdtemp(prefix="fuzz_saved_")
    path = os.path.join(root, "t" if directory else "t.safetensors")
    formats.save(_tables()[kind], path)
    names = sorted(os.listdir(path)) if directory else [""]
    files = {}
    for name in names:
      with open(os.path.join(path, name) if name else path, "rb") as f:
        files[name] = f.read()
    _SAVED[kind, directory] = (path, files)
  return _SAVED[kind, directory]


def _tensors_of(path: str) -> dict[str, bytes]:
  """Every tensor of ``path`` (a file or directory of files), as bytes, by
  the safetensors library."""
  files = (
    [os.path.join(path, n) for n in os.listdir(path) if n.endswith("tensors")]
    if os.path.isdir(path)
    else [path]
  )
  found = {}
  for file in files:
    with safetensors.safe_open(file, framework="numpy") as f:
      for key in f.keys():
        found[key] = np.ascontiguousarray(f.get_tensor(key)).tobytes()
  return found


def _header_end(data: bytes) -> int:
  return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0


@st.composite
def _damage(draw, data: bytes, tensors: bool):
  data = bytearray(data)
  how = draw(st.sampled_from(["cut", "flip", "insert", "delete", "body"]))
  if how == "body" and not tensors:  # an index: JSON, no numbers
    how = "flip"
  if how == "body" and _header_end(data) < len(data):  # a flip in the numbers
    at = draw(st.integers(_header_end(data), len(data) - 1))
    data[at] ^= 1 << draw(st.integers(0, 7))
    return how, bytes(data)
  at = draw(st.integers(0, len(data) - 1))
  if how == "cut":
    del data[at:]
  elif how in ("flip", "body"):
    data[at] ^= 1 << draw(st.integers(0, 7))
  elif how == "insert":
    data[at:at] = draw(st.binary(min_size=1, max_size=8))
  else:
    del data[at : at + draw(st.integers(1, 8))]
  return how, bytes(data)


def _check_outcome(kind, directory, name, how, damaged):
  original_path, files = _saved(kind, directory)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, os.path.basename(original_path))
    if directory:
      shutil.copytree(original_path, path)
      target = os.path.join(path, name)
    else:
      target = path
    with open(target, "wb") as f:
      f.write(damaged)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
      loaded = formats.load(path)
    except (ValueError, OSError) as error:
      assert path in str(error), error
      return "error"
    finally:
      assert time.perf_counter() - start < 3.0
      grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
      assert grown < 100_000  # KiB
    resaved = os.path.join(tmp, "again.safetensors")
    formats.save(loaded, resaved)
    assert _tensors_of(resaved) == _tensors_of(path)
    header_kept = (
      damaged[: _header_end(files[name])]
      == files[name][: _header_end(files[name])]
    )
    if how == "body" or (header_kept and not name.endswith(".json")):
      with safetensors.safe_open(resaved, framework="numpy") as f:
        again = f.metadata()
      again.pop("total_size", None)
      assert type(loaded) is type(_tables()[kind])
      assert again == _metadata_of(original_path)
    return "loaded"


def _metadata_of(path: str) -> dict[str, str]:
  if os.path.isdir(path):
    with open(os.path.join(path, _INDEX)) as f:
      metadata = json.load(f)["metadata"]
    metadata.pop("total_size", None)
    metadata.pop("named_embed_save", None)
    return {k: str(v) for k, v in metadata.items()}
  with safetensors.safe_open(path, framework="numpy") as f:
    return f.metadata()


@st.composite
def _cases(draw, directory: bool):
  kind = draw(st.sampled_from(sorted(_tables())))
  _, files = _saved(kind, directory)
  name = draw(st.sampled_from(sorted(files)))
  how, damaged = draw(_damage(files[name], not name.endswith(".json")))
  return kind, name, how, damaged


@hypothesis.settings(max_examples=250, deadline=None, database=None)
@hypothesis.given(_cases(directory=False))
def test_fuzz_single_files(case):
  kind, name, how, damaged = case
  _check_outcome(kind, False, name, how, damaged)


@hypothesis.settings(max_examples=150, deadline=None, database=None)
@hypothesis.given(_cases(directory=True))
def test_fuzz_checkpoint_directories(case):
  kind, name, how, damaged = case
  _check_outcome(kind, True, name, how, damaged)


@pytest.mark.parametrize("kind", sorted(_tables()))
@pytest.mark.parametrize("directory", [False, True])
def test_every_cut_of_a_file_is_a_named_error(kind, directory):
  """Truncation at every 7th byte (and the last): never a table."""
  _, files = _saved(kind, directory)
  for name, data in files.items():
    for at in [*range(0, len(data), 7), len(data) - 1]:
      outcome = _check_outcome(kind, directory, name, "cut", data[:at])
      assert outcome == "error" or not data[at:].strip(), (name, at)
