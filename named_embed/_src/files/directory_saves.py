"""Checkpoint directories written by every process, one whole version at a
time.

**Layout** (`save_directory`): the Hugging Face sharded layout,
``model-0000k-of-0000n.safetensors`` files and
``model.safetensors.index.json``. Every process derives the same
`WriteAssignment` from the tensors' shardings: each distinct block of each
tensor once, written by one of the processes holding it (replicas take
turns), named after its region (``embeddings[0:32,0:16]``; a tensor held
whole, such as a replicated adapter, keeps its plain name); one file per
writing process.

**Versions.** The index is the commit point: at every moment the
directory holds one whole version, the one its index lists, and each
save replaces it in one rename. A save

1. (process 0) takes the directory's lock (`fcntl.flock` on the directory
   itself, held until the save ends: saves of one directory, from any
   process or thread, run one after the other; a save waits for the
   running one up to ``NAMED_EMBED_SYNC_TIMEOUT`` seconds, then raises
   `TimeoutError`), reads the current index (refusing one named_embed
   did not write), removes what killed saves left (files of this layout
   that no index lists and that carry a save token, and their abandoned
   temporaries) and draws the save token that every process shares;
2. (every process) writes its file, atomically, under a name the current
   index does not list: the plain name if it is free, else the plain name
   with the token (``model-00001-of-00002-<16 hex digits>.safetensors``);
   the names of alternate saves thus alternate, and a first save has the
   plain Hugging Face names;
3. (process 0) once every file is complete and flushed, replaces the
   index (atomically), then removes the files of the previous index.

A save that fails or is killed before step 3 leaves the previous index
and all its files, so the previous version still loads; process 0
removes the new files of a save that failed (the next save those of a
killed one). A reader opens the files of the index it read at once
(`named_embed._src.files.stored_tensors`), and reads the index again if
a newer save removed them meanwhile. Where `fcntl` is missing (Windows)
or the file system refuses locks, saves are not serialised: each then
writes token names, so concurrent saves still leave one whole version
(the last index written), and killed saves' files are left for you to
delete.

Each step ends with `named_embed._src.base.processes.together` (or
`share`): an error on one process is raised on every process, instead of
leaving them waiting in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from named_embed._src.base import processes
from named_embed._src.files import atomic, checkpoints, tensor_files
from named_embed._src.files.atomic import replacing
from named_embed._src.files.stored_tensors import SAVE_KEY
from named_embed._src.files.tensor_blocks import block_name

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

INDEX_NAME = "model" + checkpoints.INDEX_SUFFIX
_SUFFIX = ".safetensors"
_FILE = re.compile(
  r"model-[0-9]{5}-of-[0-9]{5}(?:-(?P<token>[0-9a-f]{16}))?\.safetensors"
)


@dataclasses.dataclass(frozen=True)
class WriteAssignment:
  """Who writes which block of which tensor, the same on every process.

  Attributes:
    weight_map: Block (stored tensor) name -> file name, in order.
    tensors: Block name -> the name of the tensor it is a block of.
    regions: Block name -> its region ``(start, stop)`` in that tensor.
    writers: Block name -> the device whose copy is written.
    total_size: Bytes of all blocks.
  """

  weight_map: dict[str, str]
  tensors: dict[str, str]
  regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
  writers: dict[str, Any]
  total_size: int

  def files_of(self, process: int) -> dict[str, list[str]]:
    """File name -> names of the blocks that ``process`` writes there.

    >>> import jax
    >>> assign_writes({"w": jax.numpy.ones((4, 2))}).files_of(0)
    {'model-00001-of-00001.safetensors': ['w']}
    """
    files: dict[str, list[str]] = {}
    for name, device in self.writers.items():
      if device.process_index == process:
        files.setdefault(self.weight_map[name], []).append(name)
    return files


def assign_writes(arrays: Mapping[str, jax.Array]) -> WriteAssignment:
  """Each distinct block of each array once, spread over the processes
  that hold it (turns continue from one array to the next); one file per
  writing process. An array held whole (one block) keeps its own name.

  >>> import jax, numpy as np
  >>> plan = assign_writes({"embeddings": jax.numpy.ones((4, 2)),
  ...                    "scales": jax.numpy.ones(4)})
  >>> plan.weight_map, plan.total_size
  ({'embeddings': 'model-00001-of-00001.safetensors', 'scales': 'model-00001-of-00001.safetensors'}, 48)
  """
  chosen: dict[str, Any] = {}  # block name -> device
  tensors, regions, sizes = {}, {}, {}
  turn = 0
  for key, array in arrays.items():
    shape = array.shape
    holders: dict[Any, list[Any]] = {}
    for device, index in array.sharding.devices_indices_map(shape).items():
      holders.setdefault(region_of(index, shape), []).append(device)
    itemsize = np.dtype(array.dtype).itemsize
    for region in sorted(holders):
      name = key if len(holders) == 1 else block_name(key, *region)
      owners = sorted({d.process_index for d in holders[region]})
      process = owners[turn % len(owners)]  # replicas take turns
      turn += 1
      chosen[name] = min(
        (d for d in holders[region] if d.process_index == process),
        key=lambda d: d.id,
      )
      tensors[name], regions[name] = key, region
      sizes[name] = math.prod(b - a for a, b in zip(*region)) * itemsize
  writers = sorted({d.process_index for d in chosen.values()})
  files = {
    p: f"model-{k + 1:05d}-of-{len(writers):05d}{_SUFFIX}"
    for k, p in enumerate(writers)
  }
  return WriteAssignment(
    weight_map={n: files[d.process_index] for n, d in chosen.items()},
    tensors=tensors,
    regions=regions,
    writers=chosen,
    total_size=sum(sizes.values()),
  )


def region_of(index: tuple[slice, ...], shape) -> tuple[tuple[int, ...], ...]:
  """``(start, stop)`` of a device's index into an array of ``shape``.

  >>> region_of((slice(2, 4),), (8, 3))
  ((2, 0), (4, 3))
  """
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  bounds += [(0, n) for n in shape[len(bounds) :]]
  return tuple(a for a, _ in bounds), tuple(b for _, b in bounds)


def save_directory(
  arrays: Mapping[str, Any],
  directory: str | os.PathLike[str],
  metadata: dict[str, str],
  *,
  what: str,
) -> None:
  """Writes ``arrays`` (tensor name -> array) as the tensors of a
  checkpoint directory, every process its own blocks, then the index with
  ``metadata`` (see the module docstring).

  Raises:
    ValueError: if the directory holds an index named_embed did not write.
    FileExistsError: if ``directory`` is a file.
    OSError: if writing fails; on every process if on one. The previous
      version of the directory then still loads.
    TimeoutError: if a process does not reach a step in time, or another
      save of the directory holds its lock as long.

  >>> import os, tempfile, jax
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   out = os.path.join(tmp, "out")
  ...   save_directory({"w": jax.numpy.ones((4, 2))}, out, {}, what="demo")
  ...   sorted(os.listdir(out))
  ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
  """
  directory = os.fspath(directory)
  arrays = {
    key: array if isinstance(array, jax.Array) else jnp.asarray(array)
    for key, array in arrays.items()
  }
  plan = assign_writes(arrays)
  first = processes.index() == 0
  lock, previous, value, error = None, set(), "", None
  try:  # 1. the lock, and the current version
    _make_directory(directory)
    if first:
      lock, previous = _begin(directory)
      value = _naming(previous, plan, lock is not None)
  except Exception as failure:
    error = failure
  names: dict[str, str] = {}
  committed = False
  try:
    shared = processes.share(f"{what}: preparing {directory}", value, error)
    token, mode = shared[0].split()
    names = _file_names(plan, token, mode == "unique")
    with processes.together(f"{what}: writing this process's rows"):
      _write_own(arrays, directory, plan, names, token)  # 2.
    with processes.together(f"{what}: writing the index"):
      if first:  # 3. the index, once every file is complete
        _write_index(directory, plan, names, metadata, token)
        committed = True
    if first:  # the previous version's files, now that nothing lists them
      for name in previous - set(names.values()):
        _remove(os.path.join(directory, name))
  except BaseException:
    if first and not committed:  # the previous version stays whole
      for name in names.values():
        _remove(os.path.join(directory, name))
    raise
  finally:
    if lock is not None:
      os.close(lock)  # releases the lock, after the removals


def _make_directory(directory: str) -> None:
  if os.path.isfile(directory):
    raise FileExistsError(
      f"{directory} is a file. A path without a suffix names a checkpoint"
      " directory; add a suffix (e.g. '.safetensors') to write one file."
    )
  os.makedirs(directory, exist_ok=True)


def _begin(directory: str) -> tuple[int | None, set[str]]:
  """Locks ``directory``; returns the lock (None: no locks here) and the
  files of its current index, after removing what killed saves left."""
  lock = _lock(directory)
  try:
    current = _current_files(directory)
    if lock is not None:  # no other save runs: leftovers are abandoned
      _remove_leftovers(directory, current)
  except BaseException:
    if lock is not None:
      os.close(lock)
    raise
  return lock, current


def _lock(directory: str) -> int | None:
  """An exclusive `fcntl.flock` of ``directory``, waited for at most
  `processes.timeout_seconds`; None where locks are unavailable."""
  if fcntl is None:
    return None
  fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  waited, delay = 0.0, 0.002
  limit = processes.timeout_seconds()
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return fd
    except BlockingIOError:
      if waited >= limit:
        os.close(fd)
        raise TimeoutError(
          f"Cannot save to {directory}: another save of it has been running"
          f" for {waited:.0f} s (it holds the directory's lock). Wait for it"
          f" to finish, or raise {processes.TIMEOUT_VARIABLE}."
        ) from None
      time.sleep(delay)
      waited += delay
      delay = min(2 * delay, 0.05)
    except OSError:  # a file system without locks: save unlocked
      os.close(fd)
      return None


def _current_files(directory: str) -> set[str]:
  """The files the current named_embed index lists, of this layout.

  Refuses a directory with an index named_embed did not write."""
  names = os.listdir(directory)
  foreign = [
    n for n in names if n.endswith(checkpoints.INDEX_SUFFIX) and n != INDEX_NAME
  ]
  index = os.path.join(directory, INDEX_NAME)
  if not foreign and os.path.lexists(index):
    metadata, weight_map = checkpoints.read_index(index)
    if "named_embed" in metadata:
      return {n for n in weight_map.values() if _FILE.fullmatch(n)}
    foreign = [INDEX_NAME]
  if foreign:
    raise ValueError(
      f"{directory} holds a checkpoint index {foreign[0]!r} that named_embed"
      " did not write (a model checkpoint?); refusing to overwrite it. Save"
      " the table to a new directory."
    )
  return set()


def _remove_leftovers(directory: str, current: set[str]) -> None:
  """Removes the files of killed or failed saves that no index lists
  (named_embed's: of this layout, with a save token), and the abandoned
  temporaries of this layout's names."""
  bases = re.compile(f"{_FILE.pattern}|{re.escape(INDEX_NAME)}")
  atomic.remove_abandoned(directory, bases)
  for name in sorted(os.listdir(directory)):
    match = _FILE.fullmatch(name)
    if match is None or name in current:
      continue
    path = os.path.join(directory, name)
    try:
      f = tensor_files.open_file(path)
    except (OSError, ValueError):
      continue  # not a file named_embed wrote: kept
    f.close()
    token = f.metadata.get(SAVE_KEY)
    if isinstance(token, str) and match["token"] in (None, token):
      _remove(path)


def _naming(current: set[str], plan: WriteAssignment, locked: bool) -> str:
  """The save token, and whether the files need it in their names (when
  the plain names are listed by the current index, or saves of the
  directory are not serialised)."""
  plain = set(plan.weight_map.values())
  unique = not locked or bool(plain & current)
  return f"{secrets.token_hex(8)} {'unique' if unique else 'plain'}"


def _file_names(plan: WriteAssignment, token: str, unique: bool):
  """The plan's file name -> the name written."""
  plain = sorted(set(plan.weight_map.values()))
  if not unique:
    return {name: name for name in plain}
  return {name: f"{name[: -len(_SUFFIX)]}-{token}{_SUFFIX}" for name in plain}


def _write_own(arrays, directory: str, plan, names, token: str) -> None:
  """Writes this process's blocks, one file, atomically (flushed to disk
  before it is renamed into place)."""
  shards = {
    (key, shard.device): shard
    for key, array in arrays.items()
    for shard in array.addressable_shards
  }
  metadata = {"format": "pt", SAVE_KEY: token}
  for file, blocks in plan.files_of(processes.index()).items():
    tensors = {
      n: _host(shards[plan.tensors[n], plan.writers[n]].data) for n in blocks
    }
    with replacing(os.path.join(directory, names[file])) as temp:
      write_tensor_file(tensors, temp, metadata)
    del tensors


def _write_index(directory: str, plan, names, metadata, token: str) -> None:
  index_metadata = {"total_size": plan.total_size, **metadata, SAVE_KEY: token}
  weight_map = {block: names[file] for block, file in plan.weight_map.items()}
  index = os.path.join(directory, INDEX_NAME)
  checkpoints.write_index(index, weight_map, index_metadata)


def _host(data: jax.Array) -> np.ndarray:
  # C order: safetensors writes the raw buffer of what it is given.
  return np.ascontiguousarray(np.asarray(data))


def write_tensor_file(
  tensors: dict[str, np.ndarray], path: str, metadata
) -> None:
  """safetensors' `save_file`, its I/O errors raised as `OSError` (which
  every process of a save re-raises as such)."""
  # deferred: only saves need safetensors' writer
  from safetensors import SafetensorError
  from safetensors.numpy import save_file

  try:
    save_file(tensors, path, metadata=metadata)
  except SafetensorError as error:
    code = re.search(r"os error ([0-9]+)", str(error))
    raise OSError(
      int(code[1]) if code else errno.EIO, f"Cannot write {path}: {error}"
    ) from None


def _remove(path: str) -> None:
  """Removes ``path`` if it can: a file left behind is at worst removed by
  the next save, never worth failing this one."""
  with contextlib.suppress(OSError):
    os.remove(path)
