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
once (`named_embed._src.files.tensor_blocks`). `ne.save` writes tables
whose rows span processes this way
(`named_embed._src.files.distributed_io`).

**One version, opened once.** `open_tensors` reads the file's header, or
the checkpoint's index once, and opens at once every file that holds the
tensors asked for (`named_embed._src.files.tensor_files`: each a checked
regular file, its header read from the open file). Every read then comes
from these open files, so a save replacing the checkpoint meanwhile
(renaming new files over the old, or removing them) changes nothing that
was opened. If a file the index lists has vanished, or holds another
save than the index (a newer save replaced the index between the read
and the opening), the index is read again and everything reopened, a
bounded number of times (`ATTEMPTS`).

`StoredTensor.read` reads any region, a tuple of slices, into one new
array, with positioned reads of the open files straight into it: no
memory map of the file (whose pages would count in the process's
resident memory beside the copy, and which a file rewritten in place
would turn into ``SIGBUS``), no intermediate buffer, and only the bytes
the region needs (a region cut along the embedding axes too reads whole
rows of it, a bounded chunk at a time). The array is aligned to 64
bytes, so that `jax.device_put` on a CPU device adopts it without a copy.
A process that reads a 1/64 share of a table's rows holds a 1/64 share in
memory, whichever blocks, files and layout the table was saved with.

A directory save also records a random *save token* in its index and in
every file it writes (metadata ``named_embed_save``). A block whose file
has another token than the index (once the index, read again, is the
same) is refused: the file belongs to another save of the same directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from named_embed._src.files import checkpoints, common, tensor_files
from named_embed._src.files.tensor_blocks import (
  Block as Block,
)
from named_embed._src.files.tensor_blocks import (
  Grid,
)
from named_embed._src.files.tensor_blocks import (
  block_name as block_name,
)
from named_embed._src.files.tensor_blocks import (
  parse_block_name as parse_block_name,
)
from named_embed._src.files.tensor_files import (
  ALIGNMENT as ALIGNMENT,
)
from named_embed._src.files.tensor_files import (
  aligned_empty as aligned_empty,
)

SAVE_KEY = "named_embed_save"
"""Metadata key of the save token, in the index and in each block's file."""

ATTEMPTS = 10
"""How many times `open_tensors` reads a checkpoint's index whose files a
newer save keeps replacing, before it gives up."""

_File = tensor_files.SafetensorsFile  # the files read (tests spy on it)
_log = logging.getLogger("named_embed")
Keys = Sequence[str] | Callable[[dict[str, Any]], Sequence[str]]
Check = Callable[[str, dict[str, Any], list[str]], None]


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """A tensor of a safetensors file or checkpoint, not read yet; its files
  are open.

  Attributes:
    source: The path the caller gave (file, directory or index).
    key: The tensor's name.
    shape: The whole tensor's shape.
    dtype: Its numpy dtype (``ml_dtypes.bfloat16`` for bfloat16).
    blocks: Where its pieces are (one block when stored whole), in
      row-major order of the grid they tile.
    metadata: The metadata of its file, or of the checkpoint's index.
    names: Every tensor name of the file or index, for messages.
    handles: File path -> its open `tensor_files.SafetensorsFile`.
    grid: The blocks' grid (None when stored whole).
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
  )
  grid: Grid | None = dataclasses.field(default=None, repr=False)

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
      ValueError: for a file truncated or rewritten in place since it was
        opened.
      OSError: if reading fails, or the region does not fit in memory.

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = os.path.join(tmp, "m.safetensors")
    ...   save_file({"w": np.arange(12, dtype=np.float32).reshape(4, 3)}, path)
    ...   open_tensor(path, "w").read((slice(1, 3), slice(None))).tolist()
    [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    """
    start, stop = _region(index, self.shape)
    shape = [b - a for a, b in zip(start, stop)]
    out = tensor_files.allocate(shape, self.dtype, self.describe)
    if not out.size:
      return out
    if self.grid is None:
      pieces = [(self.blocks[0], (start, stop))]
    else:
      pieces = self.grid.overlapping(start, stop)
    for block, (low, high) in pieces:
      target = tuple(slice(a - s, b - s) for a, b, s in zip(low, high, start))
      # a view of ``out`` (``out[()]`` of a 0-d array would be a copy)
      self._read_block(block, low, high, out[target] if target else out)
    return out

  def _read_block(self, block: Block, low, high, out: np.ndarray) -> None:
    """Reads the region ``[low, high)`` of the whole, inside ``block``,
    into ``out``."""
    f = self.handles[block.file]
    local = [(a - s, b - s) for a, b, s in zip(low, high, block.start)]
    if _log.isEnabledFor(logging.DEBUG):
      shown = ",".join(f"{a}:{b}" for a, b in local)
      _log.debug("reading [%s] of %s, tensor %r", shown, block.file, block.name)
    f.read_region(block.name, local, out)


def open_tensor(
  path: str | os.PathLike[str], key: str, check: Check | None = None
) -> StoredTensor:
  """Finds tensor ``key`` of a file or checkpoint and opens its files;
  reads headers only.

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
      lists the tensors), blocks that do not tile a tensor, a block whose
      shape or dtype is not the one its name and the first block give, or
      a file written by another save than the index.

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
  path: str | os.PathLike[str], keys: Keys, check: Check | None = None
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
    the metadata of the file or index, and its open files.

  Raises:
    ValueError: also if the index keeps being replaced by newer saves
      while its files are opened (`ATTEMPTS` times).

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
  index = checkpoints.find_index(source)
  if index is None:
    return _open_file(source, keys, check)
  stale = None
  for _ in range(ATTEMPTS):
    listed = checkpoints.read_index(index)
    try:
      return _open_indexed(source, index, listed, keys, check)
    except _Stale as error:
      if checkpoints.read_index(index) == listed:  # not a newer save: real
        raise error.error from None
      stale = error.error
  raise ValueError(
    f"{index} was replaced by newer saves {ATTEMPTS} times while the files"
    f" it lists were opened (last: {stale}). Read it again once the saves"
    " of this checkpoint have finished."
  )


class _Stale(Exception):
  """A file of the index vanished or holds another save: ``error``."""

  def __init__(self, error: Exception):
    super().__init__(str(error))
    self.error = error


def _open_file(source: str, keys: Keys, check: Check | None):
  """The tensors of one safetensors file (or of an index-less directory's
  file that holds them), all from one open file."""
  wanted = None if callable(keys) else list(keys)
  file = checkpoints.tensor_file(source, wanted[0] if wanted else "")
  handles: dict[str, Any] = {}
  try:
    return _tensors_of_file(source, file, handles, wanted, keys, check)
  except _Stale as error:  # a file's own token always matches: never here
    raise error.error from None


def _tensors_of_file(source, file, handles, wanted, keys, check):
  f = _open(handles, file)
  metadata, names = f.metadata, list(f.names)
  if check is not None:
    check(source, metadata, names)
  by_key = _blocks_by_key(names)
  found = {}
  for key in keys(metadata) if wanted is None else wanted:
    files = {n: file for n in by_key.get(key, ())}
    if not files:
      raise ValueError(_missing_message(file, key, names))
    found[key] = _assemble(source, key, files, metadata, tuple(names), handles)
  return found


def _open_indexed(source, index, listed, keys: Keys, check: Check | None):
  """The tensors of the index's ``listed`` metadata and weight map, every
  file they need opened; `_Stale` if one vanished or is of another save."""
  metadata, weight_map = listed
  names = list(weight_map)
  if check is not None:
    check(source, metadata, names)
  by_key = _blocks_by_key(names)
  handles: dict[str, Any] = {}
  found = {}
  try:
    for key in keys(metadata) if callable(keys) else keys:
      blocks = [n for n in by_key.get(key, ()) if n != key]
      if key in weight_map:
        blocks = [key]
      elif not blocks:
        checkpoints.tensor_file(index, key)  # raises: no tensor ``key``
        raise _Stale(ValueError(f"{index} changed while it was read."))
      files = {
        n: checkpoints.file_in_index(index, n, weight_map[n]) for n in blocks
      }
      found[key] = _assemble(
        source, key, files, metadata, tuple(names), handles
      )
  except FileNotFoundError as error:
    raise _Stale(error) from None
  return found


def _blocks_by_key(names: Sequence[str]) -> dict[str, list[str]]:
  """Tensor name -> the names of its blocks (or its own name)."""
  by_key: dict[str, list[str]] = {}
  for name in names:
    by_key.setdefault(parse_block_name(name)[0], []).append(name)
  return by_key


def _assemble(source, key, files: dict[str, str], metadata, names, handles):
  """The `StoredTensor` of ``key`` from its blocks' names and files, each
  file opened and each block checked."""
  if key in files:  # stored whole: the header says the shape
    f = _open(handles, files[key])
    if key not in f.entries:
      raise ValueError(_missing_message(files[key], key, f.names))
    shape = f.shape_of(key)
    blocks = (Block(files[key], key, (0,) * len(shape), shape),)
    dtype, grid = f.dtype_of(key), None
  else:
    found = []
    for name, file in files.items():
      _, start, stop = parse_block_name(name)
      found.append(Block(file, name, start, stop))
    grid = Grid.of(found, f"{source}, tensor {key!r}")
    blocks, shape = grid.blocks, grid.shape
    first = _open(handles, blocks[0].file)
    if blocks[0].name not in first.entries:
      raise ValueError(
        _missing_message(blocks[0].file, blocks[0].name, first.names)
      )
    dtype = first.dtype_of(blocks[0].name)
  stored = StoredTensor(
    source, key, shape, dtype, blocks, metadata, names, handles, grid
  )
  for block in blocks:
    _check_block(stored, block, _open(handles, block.file))
  return stored


def _check_block(stored: StoredTensor, block: Block, f: _File) -> None:
  """Raises unless ``block`` is in ``f`` with the shape and dtype its
  place in ``stored`` needs, written by the index's save."""
  where = f"{block.file}, tensor {block.name!r}"
  expected_save = stored.metadata.get(SAVE_KEY)
  found_save = f.metadata.get(SAVE_KEY)
  if expected_save is not None and found_save != expected_save:
    raise _Stale(
      ValueError(
        f"{where} was written by another save than the index of"
        f" {stored.source} (save token {found_save!r}, the index has"
        f" {expected_save!r}): a save of this directory was interrupted or"
        " is running now. Save again, or wait for that save to finish."
      )
    )
  if block.name not in f.entries:
    raise ValueError(_missing_message(block.file, block.name, f.names))
  shape, dtype = f.shape_of(block.name), f.dtype_of(block.name)
  expected = tuple(b - a for a, b in zip(block.start, block.stop))
  if shape != expected or dtype != stored.dtype:
    raise ValueError(
      f"{where} has shape {shape} and dtype {dtype}, but its place in"
      f" tensor {stored.key!r} of shape {stored.shape} needs shape"
      f" {expected} and dtype {stored.dtype}: the checkpoint is corrupt."
    )


def _region(index, shape):
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


def _open(handles: dict[str, Any], path: str) -> _File:
  """``path`` opened and its header checked, once per ``handles``."""
  if path not in handles:
    handles[path] = tensor_files.open_file(path)
  return handles[path]


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
