"""Tables whose rows span processes: each process reads and writes its own.

Under `jax.distributed` (one process per host, one mesh over every
process's devices) no process may need the whole table. A table is
stored as one or more named tensors (`file_metadata.Tensor`: the rows of
a plain table; the codes and scales of a quantised one; a base and its
adapters), and everything here works tensor by tensor.

**Loading with a mesh** (`load`): each tensor's `PartitionSpec` comes from
its axis names and the rules, as for `ne.shard`. Each process reads, for
each of its devices in turn, that device's region of each tensor
(`stored_tensors`: positioned reads of only the files that hold it, into
one array per region, which a CPU device adopts without a copy) and moves
it to the device. Its host memory grows by its share of the table, plus
(on GPUs and TPUs) one region in flight.

**Saving to a directory** (`save_directory`): the Hugging Face sharded
layout, ``model-0000k-of-0000n.safetensors`` files and
``model.safetensors.index.json``. Every process derives the same
`WriteAssignment` from the tensors' shardings: each distinct block of each
tensor once, written by one of the processes holding it (replicas take
turns), named after its region (``embeddings[0:32,0:16]``; a tensor held
whole, such as a replicated adapter, keeps its plain name); one file per
writing process. Then
(1) process 0 removes the previous index (refusing one named_embed did not
write) and draws a save token; (2) every process writes its file,
atomically; (3) process 0 writes the index, atomically, and removes files
of the previous save that it no longer lists. An interrupted save leaves
no index. Each step, and each load with a mesh, ends with
`named_embed._src.base.processes.together`: an error on one process is raised on
every process, instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from penzai import pz

from named_embed._src.base import processes
from named_embed._src.files import checkpoints, stored_tensors
from named_embed._src.files.atomic import replacing
from named_embed._src.files.file_metadata import Tensor
from named_embed._src.tools import sharding

INDEX_NAME = "model" + checkpoints.INDEX_SUFFIX

Stored = Mapping[str, stored_tensors.StoredTensor]
Build = Callable[[Stored, Mapping[str, Any]], Any]
"""``build(stored, arrays)``: the table of the arrays read (by tensor
name) from the tensors ``stored``."""
TensorsOf = Callable[[Any], Mapping[str, Tensor]]
"""``tensors_of(table)``: its tensors by name, with their axis names (the
inverse of a `Build`)."""


def is_directory_path(path: str | os.PathLike[str]) -> bool:
  """Whether `ne.save` writes ``path`` as a checkpoint directory.

  A path whose name has a suffix (``table.safetensors``) is one file; a
  path without one (``out``), ending in a separator, or naming an
  existing directory, is a directory.

  >>> is_directory_path("out"), is_directory_path("t.safetensors")
  (True, False)
  """
  path = os.fspath(path)
  if os.path.isdir(path) or path.endswith(("/", os.sep)):
    return True
  return not os.path.splitext(os.path.basename(path))[1]


def spans_processes(rows: Any) -> bool:
  """Whether ``rows`` has devices in other processes than this one.

  >>> import numpy as np
  >>> spans_processes(np.ones(3))
  False
  """
  return isinstance(rows, jax.Array) and not rows.is_fully_addressable


def check_one_file(
  arrays: Mapping[str, Any], path: str | os.PathLike[str]
) -> None:
  """Raises unless one process holds all of ``arrays`` (one file can hold
  only what one host has).

  >>> import numpy as np
  >>> check_one_file({"embeddings": np.ones(3)}, "t.safetensors")
  """
  if any(spans_processes(array) for array in arrays.values()):
    stem = os.path.splitext(os.fspath(path))[0]
    raise ValueError(
      f"ne.save({os.fspath(path)!r}): the table's rows are spread over"
      f" {processes.count()} processes, and one file would need them all"
      f" on one host. Save to a directory instead (a path without a"
      f" suffix, e.g. {stem!r}), where every process writes its own rows."
    )


def load(
  open_stored: Callable[[], Stored],
  build: Build,
  tensors_of: TensorsOf,
  *,
  mesh: Mesh | None,
  rules: sharding.Rules | None,
  what: str,
) -> Any:
  """``build(stored, arrays)`` of the tensors ``open_stored()`` finds,
  read whole (``mesh=None``) or placed on ``mesh`` by ``rules``, each
  process reading its own devices' regions of each tensor only.

  ``tensors_of(table)`` names the axes of each tensor of a table that
  ``build`` makes: the placement of each tensor follows from them (found on
  abstract arrays: nothing is read for it), and ``build``'s own checks run
  before anything is read.

  Raises:
    TypeError: for a ``mesh`` that is not a `Mesh`, or rules without a mesh
      (or a mesh without rules).
    ValueError: if the mesh does not divide a tensor's axes (the message
      names the shape, the mesh and the rules); and what ``open_stored``,
      reading and ``build`` raise, on every process if on one.

  >>> import os, tempfile, jax, numpy as np, named_embed as ne
  >>> from safetensors.numpy import save_file
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> def build(stored, arrays):
  ...   return ne.EmbeddingTable.from_pretrained(arrays["w"])
  >>> def tensors_of(table):
  ...   return {"w": Tensor(("vocabulary", "embedding"), table.rows_array())}
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "m.safetensors")
  ...   save_file({"w": np.ones((4, 2), np.float32)}, path)
  ...   table = load(lambda: stored_tensors.open_tensors(path, ["w"]), build,
  ...                tensors_of, mesh=mesh, rules={"vocabulary": "model"},
  ...                what="demo")
  >>> table.rows_array().sharding.spec
  P('model', None)
  """
  if mesh is None:
    if rules is not None:
      raise TypeError(
        "`rules` places the table on a mesh: pass `mesh=` too, or neither."
      )
    stored = open_stored()
    arrays = {key: _on_device(tensor.read()) for key, tensor in stored.items()}
    table = build(stored, arrays)
    gc.collect(0)  # frees host copies of transfers now (see `placed_rows`)
    return table
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {mesh!r}.")
  if not isinstance(rules, Mapping):
    raise TypeError(
      "`rules` must map axis names to mesh axes, e.g. {'vocabulary':"
      f" 'model'}} ({{}} replicates the table); got {rules!r}."
    )
  with processes.together(what):
    stored = open_stored()
    placements = _placements(stored, build, tensors_of, mesh, rules)
    arrays = {
      key: placed_rows(tensor, placements[key])
      for key, tensor in stored.items()
    }
    return sharding.shard(build(stored, arrays), mesh, rules)


def open_saved(path: str | os.PathLike[str], keys, check=None) -> Stored:
  """`stored_tensors.open_tensors` for `ne.load`: a directory must hold
  the index that `save_directory` writes last.

  >>> import tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   try:
  ...     open_saved(tmp, ["embeddings"])
  ...   except ValueError as error:
  ...     print(str(error).replace(tmp, "out"))
  out is a directory without its index (model.safetensors.index.json). ne.save writes the index last: a save there was interrupted, or never made.
  """
  path = os.fspath(path)
  if os.path.isdir(path) and checkpoints.find_index(path) is None:
    raise ValueError(
      f"{path} is a directory without its index ({INDEX_NAME}). ne.save"
      " writes the index last: a save there was interrupted, or never made."
    )
  return stored_tensors.open_tensors(path, keys, check)


def placed_rows(
  stored: stored_tensors.StoredTensor, placement: NamedSharding
) -> jax.Array:
  """The stored tensor as a global array laid out by ``placement``,
  reading only this process's devices' regions, one at a time.

  >>> import os, tempfile, jax, numpy as np
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> from safetensors.numpy import save_file
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "m.safetensors")
  ...   save_file({"w": np.arange(6, dtype=np.float32).reshape(3, 2)}, path)
  ...   rows = placed_rows(stored_tensors.open_tensor(path, "w"),
  ...                      NamedSharding(mesh, P("model")))
  >>> rows.tolist()
  [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
  """
  shape = stored.shape
  dtype = jax.dtypes.canonicalize_dtype(stored.dtype)
  arrays, read = [], {}
  for device, index in placement.addressable_devices_indices_map(shape).items():
    region = _region(index, shape)
    if region not in read:  # replicas on this process are copied, not read
      block = stored.read(index)  # 64-byte aligned: a CPU device adopts it
      read[region] = jax.device_put(block, device).block_until_ready()
      del block
      # On GPUs and TPUs, jaxlib releases the host copy of a transfer at
      # Python's next garbage collection (`gc.callbacks`); a young one frees
      # it before the next region is read: one region in flight at most.
      gc.collect(0)
      arrays.append(read[region])
    else:
      arrays.append(jax.device_put(read[region], device))
  return jax.make_array_from_single_device_arrays(
    shape, placement, arrays, dtype=dtype
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
      holders.setdefault(_region(index, shape), []).append(device)
    itemsize = np.dtype(array.dtype).itemsize
    for region in sorted(holders):
      name = (
        key if len(holders) == 1 else stored_tensors.block_name(key, *region)
      )
      processes = sorted({d.process_index for d in holders[region]})
      process = processes[turn % len(processes)]  # replicas take turns
      turn += 1
      chosen[name] = min(
        (d for d in holders[region] if d.process_index == process),
        key=lambda d: d.id,
      )
      tensors[name], regions[name] = key, region
      sizes[name] = math.prod(b - a for a, b in zip(*region)) * itemsize
  writers = sorted({d.process_index for d in chosen.values()})
  files = {
    p: f"model-{k + 1:05d}-of-{len(writers):05d}.safetensors"
    for k, p in enumerate(writers)
  }
  return WriteAssignment(
    weight_map={n: files[d.process_index] for n, d in chosen.items()},
    tensors=tensors,
    regions=regions,
    writers=chosen,
    total_size=sum(sizes.values()),
  )


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
    OSError: if writing fails; on every process if on one.
    TimeoutError: if a process does not reach a step in time.

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
  stale: set[str] = set()
  error = None
  try:  # 1. the directory, emptied of the previous index
    stale = _prepare(directory, first)
  except Exception as failure:
    error = failure
  token = secrets.token_hex(8)  # process 0's is every process's
  token = processes.share(f"{what}: preparing {directory}", token, error)[0]
  with processes.together(f"{what}: writing this process's rows"):
    _write_own(arrays, directory, plan, token)  # 2. each process its file
  with processes.together(f"{what}: writing the index"):
    if first:  # 3. the index, once every file is complete
      index_metadata = {
        "total_size": plan.total_size,
        **metadata,
        stored_tensors.SAVE_KEY: token,
      }
      index = os.path.join(directory, INDEX_NAME)
      checkpoints.write_index(index, plan.weight_map, index_metadata)
      for name in stale - set(plan.weight_map.values()):
        _remove(os.path.join(directory, name))


def _prepare(directory: str, first: bool) -> set[str]:
  """Creates ``directory``; on process 0, removes the previous index and
  returns the files it listed."""
  if os.path.isfile(directory):
    raise FileExistsError(
      f"{directory} is a file. A path without a suffix names a checkpoint"
      " directory; add a suffix (e.g. '.safetensors') to write one file."
    )
  os.makedirs(directory, exist_ok=True)
  return _claim(directory) if first else set()


def _write_own(
  arrays, directory: str, plan: WriteAssignment, token: str
) -> None:
  """Writes this process's blocks, one file, atomically."""
  shards = {
    (key, shard.device): shard
    for key, array in arrays.items()
    for shard in array.addressable_shards
  }
  metadata = {"format": "pt", stored_tensors.SAVE_KEY: token}
  for file, names in plan.files_of(processes.index()).items():
    tensors = {
      n: _host(shards[plan.tensors[n], plan.writers[n]].data) for n in names
    }
    with replacing(os.path.join(directory, file)) as temp:
      _save_file(tensors, temp, metadata)
    del tensors


def _claim(directory: str) -> set[str]:
  """Removes the previous named_embed index; returns the files it listed.

  Refuses a directory with an index named_embed did not write."""
  names = os.listdir(directory)
  foreign = [
    n for n in names if n.endswith(checkpoints.INDEX_SUFFIX) and n != INDEX_NAME
  ]
  index = os.path.join(directory, INDEX_NAME)
  if not foreign and os.path.exists(index):
    metadata, weight_map = checkpoints.read_index(index)
    if "named_embed" in metadata:
      os.remove(index)
      return set(weight_map.values())
    foreign = [INDEX_NAME]
  if foreign:
    raise ValueError(
      f"{directory} holds a checkpoint index {foreign[0]!r} that named_embed"
      " did not write (a model checkpoint?); refusing to overwrite it. Save"
      " the table to a new directory."
    )
  return set()


def _host(data: jax.Array) -> np.ndarray:
  # C order: safetensors writes the raw buffer of what it is given.
  return np.ascontiguousarray(np.asarray(data))


def _save_file(tensors: dict[str, np.ndarray], path: str, metadata) -> None:
  from safetensors.numpy import save_file

  save_file(tensors, path, metadata=metadata)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _on_device(array: np.ndarray) -> Any:
  """``array`` on the default device: adopted without a copy on a CPU
  device (it is aligned; `jnp.asarray` would copy it). A dtype JAX would
  convert (float64 without x64) stays numpy, for the builder to refuse or
  convert as it does any input."""
  if jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype:
    return array
  return jax.device_put(array)


def _placements(
  stored: Stored, build: Build, tensors_of: TensorsOf, mesh: Mesh, rules
) -> dict[str, NamedSharding]:
  """The sharding ``rules`` give each tensor of the table ``build`` makes
  of ``stored``, found on abstract arrays (nothing read, nothing
  allocated)."""

  def abstract_tensors():
    arrays = {
      key: jnp.zeros(tensor.shape, jax.dtypes.canonicalize_dtype(tensor.dtype))
      for key, tensor in stored.items()
    }
    return {
      key: pz.nx.wrap(tensor.array, *tensor.axes)
      for key, tensor in tensors_of(build(stored, arrays)).items()
    }

  named = jax.eval_shape(abstract_tensors)
  placements = {}
  for key, tensor in stored.items():
    value = named[key]
    try:
      spec = sharding.partition_spec(value, mesh, rules)
    except ValueError as error:
      shape = dict(value.named_shape)
      what = "a table" if len(stored) == 1 else "an array"
      raise ValueError(
        f"{tensor.describe()}: {what} of shape {shape} does not fit mesh"
        f" {dict(mesh.shape)} with rules {dict(rules)}. {error}"
      ) from None
    placements[key] = NamedSharding(mesh, spec)
  return placements


def _region(index: tuple[slice, ...], shape) -> tuple[tuple[int, ...], ...]:
  """``(start, stop)`` of a device's index into an array of ``shape``."""
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  bounds += [(0, n) for n in shape[len(bounds) :]]
  return tuple(a for a, _ in bounds), tuple(b for _, b in bounds)
