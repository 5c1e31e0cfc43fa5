"""A tensor in safetensors files, whole or in blocks, read a region at a time.

A tensor is stored either *whole*, under its own name in one file (any
safetensors file, or one file of a Hugging Face checkpoint), or in
*blocks*: tensors named after the region of the whole that they hold, one
``start:stop`` per dimension::

  embeddings[0:32,0:16]     rows 0 to 31 of a [64, 16] tensor
  embeddings[32:64,0:16]    rows 32 to 63

spread over the files of a checkpoint directory whose index maps each
block to its file (`named_embed.formats.checkpoints`). Any safetensors
reader sees the blocks as ordinary tensors; `open_tensor` puts them back
together and checks that they tile the whole exactly, each block exactly
once. `ne.save` writes tables whose rows span processes this way
(`named_embed.formats.distributed_io`).

`StoredTensor.read` reads any region, a tuple of slices, through
``safetensors.safe_open(path, "np").get_slice(name)[...]``, which copies
only the requested bytes out of the memory-mapped file. A process that
reads a 1/64 share of a table's rows holds a 1/64 share in memory,
whichever blocks, files and layout the table was saved with.

A directory save also records a random *save token* in its index and in
every file it writes (metadata ``named_embed_save``). `StoredTensor.read`
refuses a block whose file has another token than the index: the file
belongs to another save of the same directory (one interrupted, or
running at the same time).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from named_embed.formats import checkpoints
from named_embed.formats._common import available

SAVE_KEY = "named_embed_save"
"""Metadata key of the save token, in the index and in each block's file."""

_log = logging.getLogger("named_embed")
_BLOCK = re.compile(r"(?P<key>.+)\[(?P<ranges>\d+:\d+(?:,\d+:\d+)*)\]")

Region = tuple[tuple[int, ...], tuple[int, ...]]  # (start, stop)


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
    if not math.prod(b - a for a, b in zip(start, stop)):
      return np.empty([b - a for a, b in zip(start, stop)], self.dtype)
    pieces = [b for b in self.blocks if _overlap(b, start, stop) is not None]
    if len(pieces) == 1 and _covers(pieces[0], start, stop):
      whole = index is None  # the whole tensor, stored whole
      return self._read_block(pieces[0], start, stop, whole)  # one copy
    out = np.empty([b - a for a, b in zip(start, stop)], self.dtype)
    for block in pieces:
      low, high = _overlap(block, start, stop)
      target = tuple(slice(a - s, b - s) for a, b, s in zip(low, high, start))
      out[target] = self._read_block(block, low, high, False)
    return out

  def _read_block(self, block: Block, low, high, whole: bool) -> np.ndarray:
    local = tuple(
      slice(a - s, b - s) for a, b, s in zip(low, high, block.start)
    )
    f = _open(self.handles, block.file)
    self._check_block(block, f)
    shown = ",".join(f"{a.start}:{a.stop}" for a in local)
    _log.debug("reading [%s] of %s, tensor %r", shown, block.file, block.name)
    if whole:
      return f.get_tensor(block.name)
    return f.get_slice(block.name)[local]

  def _check_block(self, block: Block, f) -> None:
    where = f"{block.file}, tensor {block.name!r}"
    expected_save = self.metadata.get(SAVE_KEY)
    found_save = (f.metadata() or {}).get(SAVE_KEY)
    if expected_save is not None and found_save != expected_save:
      raise ValueError(
        f"{where} was written by another save than the index of"
        f" {self.source} (save token {found_save!r}, the index has"
        f" {expected_save!r}): a save of this directory was interrupted or"
        " is running now. Save again, or wait for that save to finish."
      )
    if block.name not in f.keys():
      raise ValueError(_missing_message(block.file, block.name, f.keys()))
    shape = tuple(f.get_slice(block.name).get_shape())
    expected = tuple(b - a for a, b in zip(block.start, block.stop))
    dtype = _dtype_of(f, block.name, len(shape))
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
  source = os.fspath(path)
  handles: dict[str, Any] = {}
  index = checkpoints.find_index(source)
  if index is not None:
    metadata, weight_map = checkpoints.read_index(index)
    names = list(weight_map)
    if check is not None:
      check(source, metadata, names)
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
  else:
    file = checkpoints.tensor_file(source, key)
    f = _open(handles, file)
    metadata, names = f.metadata() or {}, list(f.keys())
    if check is not None:
      check(source, metadata, names)
    files = {n: file for n in names if parse_block_name(n)[0] == key}
    if not files:
      raise ValueError(_missing_message(file, key, names))
  return _assemble(source, key, files, metadata, tuple(names), handles)


def _assemble(source, key, files: dict[str, str], metadata, names, handles):
  """The `StoredTensor` of ``key`` from its blocks' names and files."""
  if key in files:  # stored whole: the header says the shape
    f = _open(handles, files[key])
    if key not in f.keys():
      raise ValueError(_missing_message(files[key], key, f.keys()))
    shape = tuple(f.get_slice(key).get_shape())
    dtype = _dtype_of(f, key, len(shape))
    blocks = (Block(files[key], key, (0,) * len(shape), shape),)
    return StoredTensor(
      source, key, shape, dtype, blocks, metadata, names, handles
    )
  blocks = []
  for name, file in files.items():
    _, start, stop = parse_block_name(name)
    blocks.append(Block(file, name, start, stop))
  shape = _check_tiling(blocks, f"{source}, tensor {key!r}")
  blocks.sort(key=lambda b: b.start)
  f = _open(handles, blocks[0].file)
  if blocks[0].name not in f.keys():
    raise ValueError(_missing_message(blocks[0].file, blocks[0].name, f.keys()))
  dtype = _dtype_of(f, blocks[0].name, len(shape))
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


def _covers(block: Block, start, stop) -> bool:
  return all(a >= b for a, b in zip(start, block.start)) and all(
    a <= b for a, b in zip(stop, block.stop)
  )


def _dtype_of(f, name: str, ndim: int) -> np.dtype:
  """A tensor's numpy dtype, read as an empty slice (no data read)."""
  if not ndim:
    return np.dtype(f.get_tensor(name).dtype)
  return np.dtype(f.get_slice(name)[(slice(0, 0),) * ndim].dtype)


def _open(handles: dict[str, Any], path: str):
  """``path`` opened with `safetensors.safe_open`, once per ``handles``
  (the memory map is released when the handle is garbage collected)."""
  if path not in handles:
    handles[path] = _opened(path).__enter__()
  return handles[path]


def _opened(path: str):
  """``safe_open(path, "numpy")`` with clear errors."""
  from safetensors import SafetensorError, safe_open

  if not os.path.isfile(path):
    raise FileNotFoundError(f"No safetensors file at {path}.")
  try:
    return safe_open(path, framework="numpy")
  except SafetensorError as error:
    raise ValueError(
      f"{path} is not a valid safetensors file ({error}). It may be"
      " truncated (an interrupted download or copy) or not a safetensors"
      " file at all."
    ) from None


def _missing_message(path: str, key: str, keys) -> str:
  keys = list(keys)
  if not keys:
    return f"{path} holds no tensors, so it has no tensor {key!r}."
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  return (
    f"{path} has no tensor {key!r}.{hint} Its {len(keys)} tensors are:"
    f" {available(keys)}."
  )
