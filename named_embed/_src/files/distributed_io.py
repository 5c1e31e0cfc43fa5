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

**Saving to a directory** (`save_directory`,
`named_embed._src.files.directory_saves`): the Hugging Face sharded
layout, every process writing its own blocks of each tensor; process 0
replaces the index once every file is complete, so the directory holds
one whole version at every moment, and saves of one directory run one
after the other.

Each step, and each load with a mesh, ends with
`named_embed._src.base.processes.together`: an error on one process is raised on
every process, instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from penzai import pz

from named_embed._src.base import processes
from named_embed._src.files import checkpoints, directory_saves, stored_tensors
from named_embed._src.files.directory_saves import (
  INDEX_NAME as INDEX_NAME,
)
from named_embed._src.files.directory_saves import (
  WriteAssignment as WriteAssignment,
)
from named_embed._src.files.directory_saves import (
  assign_writes as assign_writes,
)
from named_embed._src.files.directory_saves import (
  save_directory as save_directory,
)
from named_embed._src.files.file_metadata import Tensor
from named_embed._src.tools import sharding

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

  def checked(source: str, metadata: dict[str, Any], names: list[str]):
    _check_strings(source, metadata)
    if check is not None:
      check(source, metadata, names)

  return stored_tensors.open_tensors(path, keys, checked)


def _check_strings(source: str, metadata: dict[str, Any]) -> None:
  """An index's metadata, as `save_directory` writes it: strings, and the
  ``total_size``. (A file's metadata holds strings only: its reader checks
  that.)"""
  for key, value in metadata.items():
    if not isinstance(value, str) and key != "total_size":
      raise ValueError(
        f"{source}: the metadata entry {key!r} of its index is"
        f" {json.dumps(value)[:80]}, not a string; ne.save did not write"
        " this index (or it was edited)."
      )


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
    region = directory_saves.region_of(index, shape)
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
