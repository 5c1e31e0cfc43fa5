"""A tensor in safetensors files, whole or in blocks, read a region at a time.

A tensor is stored either *whole*, under its own name in one file (any
safetensors file, or one file of a Hugging Face checkpoint), or in
*blocks*: tensors named after the region of the whole that they hold, one
``start:stop`` per dimension::

  embeddings[0:32,0:16]     rows 0 to 31 of a [64, 16] tensor
  embeddings[32:64,0:16]    rows 32 to 63

spread over the files of a checkpoint directory whose index maps each
block to its file (`named_embed._src.files.checkpoints`). Any safetensors
reader sees the blocks as ordinary tensors; `open_tensor` puts them back
together and checks that they tile the whole exactly, each block exactly
once. `ne.save` writes tables whose rows span processes this way
(`named_embed._src.files.distributed_io`).

`StoredTensor.read` reads any region, a tuple of slices, into one new
array, with positioned reads of the file (``readinto``) straight into it:
no memory map of the file (whose pages would count in the process's
resident memory beside the copy), no intermediate buffer, and only the
bytes the region needs (a region cut along the embedding axes too reads
whole rows of it, a bounded chunk at a time). The array is aligned to
64 bytes, so that `jax.device_put` on a CPU device adopts it without a
copy. A process that reads a 1/64 share of a table's rows holds a 1/64
share in memory, whichever blocks, files and layout the table was saved
with. safetensors itself checks each file's header (`safe_open`).

A directory save also records a random *save token* in its index and in
every file it writes (metadata ``named_embed_save``). `StoredTensor.read`
refuses a block whose file has another token than the index: the file
belongs to another save of the same directory (one interrupted, or
running at the same time).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from named_embed._src.files import checkpoints, common

SAVE_KEY = "named_embed_save"
"""Metadata key of the save token, in the index and in each block's file."""

_log = logging.getLogger("named_embed")
_BLOCK = re.compile(r"(?P<key>.+)\[(?P<ranges>\d+:\d+(?:,\d+:\d+)*)\]")

Region = tuple[tuple[int, ...], tuple[int, ...]]  # (start, stop)

ALIGNMENT = 64
"""Bytes the arrays `StoredTensor.read` returns are aligned to (what XLA's
CPU client needs to use a host buffer in place)."""

_CHUNK_BYTES = 16 << 20  # bound of the buffer of a region that is not
# contiguous in its file (cut along a non-leading axis)

# safetensors' dtype names (its header's "dtype") -> numpy dtypes
_DTYPES = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype(np.uint8),
  "I8": np.dtype(np.int8),
  "U16": np.dtype(np.uint16),
  "I16": np.dtype(np.int16),
  "U32": np.dtype(np.uint32),
  "I32": np.dtype(np.int32),
  "U64": np.dtype(np.uint64),
  "I64": np.dtype(np.int64),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype(np.float32),
  "F64": np.dtype(np.float64),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def block_name(key: str, start: Sequence[int], stop: Sequence[int]) -> str:
  """The name of the block of tensor ``key`` from ``start`` to ``stop``.

  >>> block_name("embeddings", (32, 0), (64, 16))
  'embeddings[32:64,0:16]'
  """
  ranges = ",".join(f"{a}:{b}" for a, b in zip(start, stop))
  return f"{key}[{ranges}]"


def parse_block_name(name: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
  """``(key, start, stop)`` of a block name, or ``(name, (), ())`` for any
  other tensor name.

  >>> parse_block_name("embeddings[32:64,0:16]")
  ('embeddings', (32, 0), (64, 16))
  >>> parse_block_name("model.embed_tokens.weight")
  ('model.embed_tokens.weight', (), ())
  """
  match = _BLOCK.fullmatch(name)
  if match is None:
    return name, (), ()
  pairs = [r.split(":") for r in match["ranges"].split(",")]
  start = tuple(int(a) for a, _ in pairs)
  stop = tuple(int(b) for _, b in pairs)
  return match["key"], start, stop


@dataclasses.dataclass(frozen=True)
class Block:
  """One stored piece of a tensor: tensor ``name`` of ``file``, holding the
  region ``[start, stop)`` of the whole (the whole tensor for a tensor
  stored whole)."""

  file: str
  name: str
  start: tuple[int, ...]
  stop: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """A tensor of a safetensors file or checkpoint, not read yet.

  Attributes:
    source: The path the caller gave (file, directory or index).
    key: The tensor's name.
    shape: The whole tensor's shape.
    dtype: Its numpy dtype (``ml_dtypes.bfloat16`` for bfloat16).
    blocks: Where its pieces are (one block when stored whole).
    metadata: The metadata of its file, or of the checkpoint's index.
    names: Every tensor name of the file or index, for messages.
  """

  source: str
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: tuple[Block, ...]
  metadata: dict[str, Any]
  names: tuple[str, ...]
  handles: dict[str, Any] = dataclasses.field(
    default_factory=dict, compare=False, repr=False
  )  # files opened so far, each opened once

  def describe(self) -> str:
    """Where the tensor is, for messages.

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = os.path.join(tmp, "m.safetensors")
    ...   save_file({"w": np.ones((2, 3), np.float32)}, path)
    ...   open_tensor(path, "w").describe().replace(tmp + os.sep, "")
    "m.safetensors, tensor 'w'"
    """
    files = sorted({block.file for block in self.blocks})
    if len(self.blocks) == 1:
      return f"{files[0]}, tensor {self.key!r}"
    return (
      f"{self.source}, tensor {self.key!r} ({len(self.blocks)} blocks in"
      f" {len(files)} files)"
    )

  def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The region ``index`` (slices with unit steps; None: everything),
    reading only the blocks, and the bytes of them, that it covers.

    Raises:
      FileNotFoundError: if a file holding the region is missing.
      ValueError: for a corrupt file, a block whose shape or dtype is not
        the one its name and the first block give, or a file written by
        another save than the index.

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = os.path.join(tmp, "m.safetensors")
    ...   save_file({"w": np.arange(12, dtype=np.float32).reshape(4, 3)}, path)
    ...   open_tensor(path, "w").read((slice(1, 3), slice(None))).tolist()
    [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    """
    start, stop = _region(index, self.shape)
    out = aligned_empty([b - a for a, b in zip(start, stop)], self.dtype)
    if not out.size:
      return out
    for block in self.blocks:
      overlap = _overlap(block, start, stop)
      if overlap is None:
        continue
      low, high = overlap
      target = tuple(slice(a - s, b - s) for a, b, s in zip(low, high, start))
      # a view of ``out`` (``out[()]`` of a 0-d array would be a copy)
      self._read_block(block, low, high, out[target] if target else out)
    return out

  def _read_block(self, block: Block, low, high, out: np.ndarray) -> None:
    """Reads the region ``[low, high)`` of the whole, inside ``block``,
    into ``out``."""
    f = _open(self.handles, block.file)
    self._check_block(block, f)
    local = [(a - s, b - s) for a, b, s in zip(low, high, block.start)]
    shown = ",".join(f"{a}:{b}" for a, b in local)
    _log.debug("reading [%s] of %s, tensor %r", shown, block.file, block.name)
    f.read_region(block.name, local, out)

  def _check_block(self, block: Block, f: _File) -> None:
    where = f"{block.file}, tensor {block.name!r}"
    expected_save = self.metadata.get(SAVE_KEY)
    found_save = f.metadata.get(SAVE_KEY)
    if expected_save is not None and found_save != expected_save:
      raise ValueError(
        f"{where} was written by another save than the index of"
        f" {self.source} (save token {found_save!r}, the index has"
        f" {expected_save!r}): a save of this directory was interrupted or"
        " is running now. Save again, or wait for that save to finish."
      )
    if block.name not in f.entries:
      raise ValueError(_missing_message(block.file, block.name, f.names))
    shape, dtype = f.shape_of(block.name), f.dtype_of(block.name)
    expected = tuple(b - a for a, b in zip(block.start, block.stop))
    if shape != expected or dtype != self.dtype:
      raise ValueError(
        f"{where} has shape {shape} and dtype {dtype}, but its place in"
        f" tensor {self.key!r} of shape {self.shape} needs shape {expected}"
        f" and dtype {self.dtype}: the checkpoint is corrupt."
      )


def open_tensor(
  path: str | os.PathLike[str],
  key: str,
  check: Callable[[str, dict[str, Any], list[str]], None] | None = None,
) -> StoredTensor:
  """Finds tensor ``key`` of a file or checkpoint; reads headers only.

  Args:
    path: A ``.safetensors`` file, a checkpoint directory, or its
      ``*.safetensors.index.json`` (as `checkpoints.tensor_file` accepts).
    key: The tensor, stored whole or in blocks.
    check: Called with ``(path, metadata, tensor names)`` of the file or
      index before ``key`` is looked up (e.g. to refuse files of another
      kind with a better message than a missing key).

  Raises:
    FileNotFoundError: if the path or a file it needs is missing.
    ValueError: for a corrupt file or index, a missing ``key`` (the message
      lists the tensors), or blocks that do not tile a tensor.

  >>> import os, tempfile, numpy as np
  >>> from safetensors.numpy import save_file
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "blocks.safetensors")
  ...   save_file({"w[0:1,0:3]": np.zeros((1, 3), np.float32),
  ...              "w[1:4,0:3]": np.ones((3, 3), np.float32)}, path)
  ...   stored = open_tensor(path, "w")
  ...   stored.shape, len(stored.blocks), float(stored.read().sum())
  ((4, 3), 2, 9.0)
  """
  return open_tensors(path, (key,), check)[key]


def open_tensors(
  path: str | os.PathLike[str],
  keys: Sequence[str] | Callable[[dict[str, Any]], Sequence[str]],
  check: Callable[[str, dict[str, Any], list[str]], None] | None = None,
) -> dict[str, StoredTensor]:
  """Finds several tensors of one file or checkpoint (see `open_tensor`);
  each file is opened once, and headers only are read.

  Args:
    path: As for `open_tensor`.
    keys: The tensors, or a function of the file's (or index's) metadata
      that names them (called after ``check``; ``path`` must then be a
      file, an index, or a directory with an index or one file).
    check: As for `open_tensor`.

  Returns:
    Tensor name -> `StoredTensor`, in the order of ``keys``; they share
    the metadata of the file or index.

  >>> import os, tempfile, numpy as np
  >>> from safetensors.numpy import save_file
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "m.safetensors")
  ...   save_file({"a": np.ones(2, np.int8), "b": np.ones((3, 2))}, path,
  ...             metadata={"parts": "a,b"})
  ...   found = open_tensors(path, lambda metadata: metadata["parts"].split(","))
  ...   {key: stored.shape for key, stored in found.items()}
  {'a': (2,), 'b': (3, 2)}
  """
  source = os.fspath(path)
  handles: dict[str, Any] = {}
  index = checkpoints.find_index(source)
  found = {}
  if index is not None:
    metadata, weight_map = checkpoints.read_index(index)
    names = list(weight_map)
    if check is not None:
      check(source, metadata, names)
    for key in keys(metadata) if callable(keys) else keys:
      if key in weight_map:
        files = {key: checkpoints.tensor_file(index, key)}
      else:
        files = {
          name: checkpoints.file_in_index(index, name, weight_map[name])
          for name in names
          if parse_block_name(name)[0] == key and name != key
        }
        if not files:
          checkpoints.tensor_file(index, key)  # raises: no tensor ``key``
      found[key] = _assemble(
        source, key, files, metadata, tuple(names), handles
      )
    return found
  wanted = None if callable(keys) else list(keys)
  file = checkpoints.tensor_file(source, wanted[0] if wanted else "")
  f = _open(handles, file)
  metadata, names = f.metadata, list(f.names)
  if check is not None:
    check(source, metadata, names)
  for key in keys(metadata) if wanted is None else wanted:
    files = {n: file for n in names if parse_block_name(n)[0] == key}
    if not files:
      raise ValueError(_missing_message(file, key, names))
    found[key] = _assemble(source, key, files, metadata, tuple(names), handles)
  return found


def _assemble(source, key, files: dict[str, str], metadata, names, handles):
  """The `StoredTensor` of ``key`` from its blocks' names and files."""
  if key in files:  # stored whole: the header says the shape
    f = _open(handles, files[key])
    if key not in f.entries:
      raise ValueError(_missing_message(files[key], key, f.names))
    shape = f.shape_of(key)
    blocks = (Block(files[key], key, (0,) * len(shape), shape),)
    return StoredTensor(
      source, key, shape, f.dtype_of(key), blocks, metadata, names, handles
    )
  blocks = []
  for name, file in files.items():
    _, start, stop = parse_block_name(name)
    blocks.append(Block(file, name, start, stop))
  shape = _check_tiling(blocks, f"{source}, tensor {key!r}")
  blocks.sort(key=lambda b: b.start)
  f = _open(handles, blocks[0].file)
  if blocks[0].name not in f.entries:
    raise ValueError(_missing_message(blocks[0].file, blocks[0].name, f.names))
  dtype = f.dtype_of(blocks[0].name)
  return StoredTensor(
    source, key, shape, dtype, tuple(blocks), metadata, names, handles
  )


def _check_tiling(blocks: list[Block], where: str) -> tuple[int, ...]:
  """The whole shape, if ``blocks`` tile it as a grid, each cell once."""
  ndims = {len(b.start) for b in blocks}
  if len(ndims) != 1:
    raise ValueError(f"{where}: its blocks have different ranks {ndims}.")
  shape, cells = [], 1
  for d in range(ndims.pop()):
    intervals = sorted({(b.start[d], b.stop[d]) for b in blocks})
    end = 0
    for a, b in intervals:
      if a != end or b <= a:
        raise ValueError(
          f"{where}: its blocks do not tile dimension {d}: ranges"
          f" {intervals} leave a gap or overlap at {end}."
        )
      end = b
    shape.append(end)
    cells *= len(intervals)
  distinct = {(b.start, b.stop) for b in blocks}
  if len(distinct) != len(blocks) or len(blocks) != cells:
    raise ValueError(
      f"{where}: its {len(blocks)} blocks do not cover a {tuple(shape)}"
      f" tensor exactly once ({cells} blocks of the grid expected)."
    )
  return tuple(shape)


def _region(index, shape) -> Region:
  if index is None:
    index = ()
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  start, stop = [], []
  for entry, size in zip(index, shape):
    a, b, step = entry.indices(size)
    if step != 1:
      raise ValueError(f"Only unit-step regions can be read, got {index}.")
    start.append(a)
    stop.append(max(a, b))
  return tuple(start), tuple(stop)


def _overlap(block: Block, start, stop) -> Region | None:
  low = tuple(max(a, b) for a, b in zip(start, block.start))
  high = tuple(min(a, b) for a, b in zip(stop, block.stop))
  if any(a >= b for a, b in zip(low, high)):
    return None
  return low, high


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """An uninitialised C-order array whose data starts at a multiple of
  `ALIGNMENT` bytes (numpy's own allocations are 16-byte aligned).

  >>> aligned_empty((3, 5), np.float32).ctypes.data % ALIGNMENT
  0
  """
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  skip = -raw.ctypes.data % ALIGNMENT
  return raw[skip : skip + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class _File:
  """A safetensors file whose header safetensors has checked: its metadata
  and where each tensor's bytes are (``entries``: name -> dtype name,
  shape, first byte, end byte, counted from the file's start)."""

  path: str
  metadata: dict[str, str]
  entries: dict[str, tuple[str, tuple[int, ...], int, int]]

  @property
  def names(self) -> list[str]:
    return list(self.entries)

  def shape_of(self, name: str) -> tuple[int, ...]:
    return self.entries[name][1]

  def dtype_of(self, name: str) -> np.dtype:
    code = self.entries[name][0]
    if code not in _DTYPES:
      raise ValueError(
        f"{self.path}, tensor {name!r} has the safetensors dtype {code!r},"
        f" which named_embed does not read (it reads {sorted(_DTYPES)})."
      )
    return _DTYPES[code]

  def read_region(self, name: str, local: Sequence[tuple[int, int]], out):
    """Reads ``[start, stop)`` per dimension of tensor ``name`` into the
    array ``out`` (of that region's shape), reading only its rows."""
    shape = self.shape_of(name)
    itemsize = self.dtype_of(name).itemsize
    first = self.entries[name][2]
    row_bytes = math.prod(shape[1:]) * itemsize  # one index of dim 0
    low, high = local[0] if local else (0, 1)
    whole_rows = all(
      a == 0 and b == n for (a, b), n in zip(local[1:], shape[1:])
    )
    with open(self.path, "rb", buffering=0) as f:
      if whole_rows and out.flags.c_contiguous:  # one run of the file
        _read_into(f, first + low * row_bytes, out, self.path)
        return
      step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
      inner = tuple(slice(a, b) for a, b in local[1:])
      for row in range(low, high, step):
        rows = min(step, high - row)
        chunk = np.empty((rows, *shape[1:]), out.dtype)
        _read_into(f, first + row * row_bytes, chunk, self.path)
        out[row - low : row - low + rows] = chunk[(slice(None), *inner)]


def _read_into(f, offset: int, out: np.ndarray, path: str) -> None:
  """Fills the C-contiguous ``out`` with the file's bytes from ``offset``."""
  view = memoryview(out.reshape(-1).view(np.uint8))
  f.seek(offset)
  done = 0
  while done < len(view):
    got = f.readinto(view[done:])
    if not got:
      raise ValueError(
        f"{path} ended at byte {offset + done} while reading a tensor: it"
        " was truncated after it was opened."
      )
    done += got


def _open(handles: dict[str, Any], path: str) -> _File:
  """``path``'s header, checked by safetensors and read once per
  ``handles``."""
  if path not in handles:
    handles[path] = _opened(path)
  return handles[path]


def _opened(path: str) -> _File:
  """The `_File` of ``path``, with clear errors."""
  from safetensors import SafetensorError, safe_open

  if not os.path.isfile(path):
    raise FileNotFoundError(f"No safetensors file at {path}.")
  try:
    with safe_open(path, framework="numpy") as f:  # checks the header
      metadata = f.metadata() or {}
  except SafetensorError as error:
    raise ValueError(
      f"{path} is not a valid safetensors file ({error}). It may be"
      " truncated (an interrupted download or copy) or not a safetensors"
      " file at all."
    ) from None
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  entries = {}
  for name, entry in header.items():
    if name != "__metadata__":
      begin, end = entry["data_offsets"]
      shape = tuple(int(n) for n in entry["shape"])
      entries[name] = (entry["dtype"], shape, 8 + size + begin, 8 + size + end)
  return _File(path, metadata, entries)


def _missing_message(path: str, key: str, keys) -> str:
  keys = list(keys)
  if not keys:
    return f"{path} holds no tensors, so it has no tensor {key!r}."
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  return (
    f"{path} has no tensor {key!r}.{hint} Its {len(keys)} tensors are:"
    f" {common.available(keys)}."
  )
