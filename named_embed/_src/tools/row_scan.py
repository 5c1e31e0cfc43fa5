"""Reading a table's own rows chunk by chunk, on the devices that hold them.

Inspection (`named_embed._src.tools.inspection`), the summary's statistics
(`named_embed._src.tools.rendering`), the initial rows of a resize
(`named_embed._src.tools.new_rows`) and the exporters (`named_embed.formats`) read
every row of a table of any kind through its row source
(`named_embed._src.rows.row_source`): never the float ``[V, *embedding]`` table at
once, only one chunk of float rows (dequantised or merged) at a time.

- `over_shards` runs a function on each device's own rows when the
  vocabulary is split over a mesh (Explicit axes, read from the arrays'
  types, or Auto axes, from the sharding `named_embed.shard` recorded),
  with `jax.shard_map`; the function combines the devices' results with
  collectives and returns values the same on every device. On one device
  (or a table whose vocabulary is not split) it runs on all rows.
- `fold_chunks` folds over the chunks of the rows such a function reads.
- `host_row_chunks` / `host_rows` copy the float rows to the host, chunk
  by chunk (gathered through the source: any kind, any layout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from named_embed._src.base import mesh_layout
from named_embed._src.rows import row_source

CHUNK_BYTES = 8 * 2**20
"""A chunk holds about this many bytes of float32 rows."""


def chunk_rows(source: row_source.RowSource, num_rows: int) -> int:
  """Rows a chunk: a power of two of about `CHUNK_BYTES` float32 rows, at
  most ``num_rows`` (at least 1).

  >>> from named_embed._src.rows import row_source
  >>> from named_embed._src.tools import row_scan
  >>> row_scan.chunk_rows(row_source.dense_source((10**6, 1024), "f4"),
  ...                      10**6)
  2048
  """
  row_bytes = 4 * max(math.prod(source.row_shape), 1)
  rows = 2 ** int(math.log2(max(CHUNK_BYTES // row_bytes, 1)))
  return max(1, min(rows, num_rows))


def fold_chunks(
  step: Callable[[Any, Any, int], Any], carry: Any, num_rows: int, size: int
) -> Any:
  """Folds ``step(carry, start, rows)`` over chunks of ``size`` rows of
  ``num_rows``: full chunks in a loop, then a last, shorter one."""
  full, rest = divmod(num_rows, size)
  if full == 1:
    carry = step(carry, 0, size)
  elif full:
    carry = lax.fori_loop(0, full, lambda i, c: step(c, i * size, size), carry)
  if rest:
    carry = step(carry, full * size, rest)
  return carry


def _vocabulary_split(arrays: tuple, source, rows_sharding):
  """``(mesh, entry, explicit)`` for a `shard_map` over the rows, or None
  to read them all in plain code. ``entry`` is the mesh axis (or axes) the
  vocabulary is split over, None for rows held whole by every device of an
  Explicit mesh (plain code would mix arrays typed on that mesh with
  arrays on none). Read at trace time."""
  specs = [mesh_layout.explicit_spec(a) for a in arrays]
  typed = [a for a, spec in zip(arrays, specs) if spec is not None]
  if typed:
    split = [
      spec[0]
      for spec, aligned in zip(specs, source.row_aligned)
      if aligned and spec is not None and spec[0] is not None
    ]
    mesh = jax.typeof(typed[0]).sharding.mesh
    entry, explicit = (split[0] if split else None), True
  elif rows_sharding is not None and len(rows_sharding.spec):
    mesh, entry, explicit = rows_sharding.mesh, rows_sharding.spec[0], False
  else:
    return None
  devices = math.prod(mesh.shape[a] for a in mesh_layout.mesh_axes(entry))
  if devices <= 1:
    entry = None
  if entry is None and not explicit:
    return None
  return mesh, entry, explicit


def over_shards(
  body: Callable[..., Any],
  source: row_source.RowSource,
  arrays: tuple,
  rows_sharding: NamedSharding | None,
  *replicated: Any,
) -> Any:
  """``body(reader, offset, axis, *replicated)`` on each device's own rows.

  ``reader`` reads float rows of the device's rows
  (`named_embed._src.rows.row_chunks.Reader`: ``num_rows``, ``rows(start, size)``),
  whose first has global id ``offset``; ``axis`` is the mesh axis (or
  axes) the vocabulary is split over, for ``body``'s collectives, or None
  when ``body`` sees every row (``offset`` is then 0). ``body`` must return
  the same values on every device. Call it inside `jax.jit`.
  """
  split = _vocabulary_split(arrays, source, rows_sharding)
  if split is None:
    return body(source.reader(arrays, 0), 0, None, *replicated)
  mesh, entry, explicit = split

  def spec(array, aligned):
    lead = entry if aligned else None
    return PartitionSpec(lead, *([None] * (array.ndim - 1)))

  array_specs = tuple(
    spec(a, aligned) for a, aligned in zip(arrays, source.row_aligned)
  )
  replicated_specs = jax.tree.map(lambda _: PartitionSpec(), replicated)
  if explicit:  # shard_map takes exactly these specs under Explicit axes
    arrays = tuple(
      jax.sharding.reshard(a, NamedSharding(mesh, s))
      for a, s in zip(arrays, array_specs)
    )
    replicated = jax.tree.map(
      lambda x: jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec())),
      replicated,
    )

  def local(arrays, *replicated):
    rows = arrays[source.row_aligned.index(True)].shape[0]
    offset = 0 if entry is None else lax.axis_index(entry) * rows
    return body(source.reader(arrays, offset), offset, entry, *replicated)

  # check_vma=False: the bodies are never differentiated, and they make
  # their results the same on every device with explicit collectives.
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(array_specs, *replicated_specs),
    out_specs=PartitionSpec(),
    check_vma=False,
  )(arrays, *replicated)


def is_concrete(arrays: tuple) -> bool:
  """Whether every array holds values (not traced, not deleted).

  >>> import jax.numpy as jnp
  >>> from named_embed._src.tools import row_scan
  >>> row_scan.is_concrete((jnp.ones(2),))
  True
  """
  for array in arrays:
    if isinstance(array, jax.core.Tracer):
      return False
    if isinstance(array, jax.Array) and array.is_deleted():
      return False
  return True


# -------------------------------------------------------------- to the host


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _gathered(arrays, start, source, size, rows_sharding):
  arrays = row_source.prepare(source, arrays, rows_sharding)
  ids = start + jnp.arange(size, dtype=jnp.int32)
  return source.gather(arrays, ids)


def host_row_chunks(
  table: Any, stop: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
  """``(start, rows)``: the float rows ``[0, stop)`` of any kind of table
  (dequantised, adapters added; default: the token rows), in the table's
  dtype, on the host, chunk by chunk. Only one chunk of float rows exists
  on the devices at once, and none is built from a sharded slice.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import row_scan
  >>> q = ne.EmbeddingTable.from_pretrained(np.eye(3, dtype=np.float32)
  ...     ).padded_to_multiple(4).quantized()
  >>> [(start, rows.shape) for start, rows in row_scan.host_row_chunks(q)]
  [(0, (3, 3))]
  """
  source, arrays = table.row_parts()
  stop = table.vocab_size if stop is None else stop
  size = chunk_rows(source, stop)
  sharding = table.rows_sharding
  for start in range(0, stop, size):
    rows = min(size, stop - start)
    chunk = _gathered(arrays, jnp.int32(start), source, rows, sharding)
    yield start, np.asarray(chunk)


def host_rows(table: Any, stop: int | None = None) -> np.ndarray:
  """The float rows ``[0, stop)`` (default: the token rows) of any kind of
  table on the host, C-contiguous, built by `host_row_chunks`.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import row_scan
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((5, 2), np.float32))
  >>> row_scan.host_rows(table.padded_to_multiple(4)).shape
  (5, 2)
  """
  source, _ = table.row_parts()
  stop = table.vocab_size if stop is None else stop
  out = np.empty((stop, *source.row_shape), np.dtype(source.dtype))
  for start, rows in host_row_chunks(table, stop):
    out[start : start + rows.shape[0]] = rows
  return out
