"""How arrays are laid out on a device mesh, read at trace time.

Under a mesh with `Explicit` axes (the default of `jax.make_mesh`), the
sharding of a traced array is part of its type (`jax.typeof(x).sharding`),
and a gather must be told its output sharding. Under `Auto` axes (or no
mesh) nothing is known at trace time and GSPMD decides; these helpers then
return None and the kernels emit plain single-device code.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def explicit_spec(x: jax.Array) -> PartitionSpec | None:
  """``x``'s partition spec if it is sharded over Explicit mesh axes."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  if not mesh.axis_names or AxisType.Explicit not in mesh.axis_types:
    return None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return PartitionSpec(*spec)


def spans_devices(*arrays: jax.Array) -> bool:
  """Whether any of ``arrays`` is split over several devices along Explicit
  mesh axes."""
  for x in arrays:
    spec = explicit_spec(x)
    if spec is None or jax.typeof(x).sharding.mesh.size <= 1:
      continue
    if any(entry is not None for entry in spec):
      return True
  return False


def splits(sharding: NamedSharding | None) -> bool:
  """Whether a recorded sharding really splits an array over devices."""
  return (
    sharding is not None
    and sharding.mesh.size > 1
    and any(entry is not None for entry in sharding.spec)
  )


def gather_sharding(table: jax.Array, ids: jax.Array) -> NamedSharding | None:
  """Output sharding of ``table[ids]`` under Explicit axes, else None.

  Token dimensions keep the ids' sharding, embedding dimensions keep the
  table's: GSPMD then lowers a vocabulary-sharded gather to a masked local
  gather plus one all-reduce of the ``[tokens, embedding]`` rows.
  """
  table_spec = explicit_spec(table)
  ids_spec = explicit_spec(ids)
  if table_spec is None and ids_spec is None:
    return None
  mesh = jax.typeof(table if table_spec is not None else ids).sharding.mesh
  ids_spec = ids_spec or PartitionSpec(*([None] * ids.ndim))
  table_spec = table_spec or PartitionSpec(*([None] * table.ndim))
  used = {a for entry in ids_spec for a in mesh_axes(entry)}
  # A mesh axis can shard one output dimension only: an embedding dimension
  # sharded over an axis the tokens already use (FSDP + data parallelism)
  # comes out replicated over it.
  embedding = [
    None if used & set(mesh_axes(entry)) else entry for entry in table_spec[1:]
  ]
  return NamedSharding(mesh, PartitionSpec(*ids_spec, *embedding))


def mesh_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one `PartitionSpec` entry (None, a name, or several)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def pin_rows(table: jax.Array, rows_sharding: NamedSharding | None):
  """Constrains a table (and, by transposition, its gradient) to the
  sharding recorded by ``ne.shard``. Needed under Auto axes, where GSPMD
  would otherwise bring the gradient back replicated."""
  if rows_sharding is None or explicit_spec(table) is not None:
    return table
  spec = tuple(rows_sharding.spec)[: table.ndim]
  sharding = NamedSharding(rows_sharding.mesh, PartitionSpec(*spec))
  return jax.lax.with_sharding_constraint(table, sharding)
