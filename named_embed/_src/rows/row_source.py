"""Row sources: the kernel half of the table contract.

Every kind of table (`named_embed._src.tables.contract.AbstractTable`) hands the
kernels a static, hashable `RowSource` and a tuple of raw arrays
(``table.row_parts()``). The source says, per array, whether its first
axis is the vocabulary (*row-aligned*: sliced, gathered and sharded with
the rows) and whether it trains, and it makes rows for every operation:

- `RowSource.gather` (lookups, pooled lookups): the rows of some ids;
- `RowSource.one_hot` (the ``"one_hot"`` lookup strategy): the same rows
  as a product with one-hot vectors (a matmul both ways);
- `RowSource.logits` (decodes): ``[N, R]`` logits of ``hidden [N, E]``;
- `RowSource.rows_of` (chunked reads): the float rows of one vocabulary
  chunk, from the row-aligned arrays sliced to it; `RowSource.reader`
  reads any chunk (`named_embed._src.rows.row_chunks.Reader`);
- `RowSource.loss_reader` (the fused loss): one chunk's logits forwards
  and its gradients backwards (`named_embed._src.rows.row_chunks.LossReader`);
- `RowSource.prepare`: the arrays as kernels read them (frozen ones
  without gradient, row-aligned ones pinned to the recorded sharding).

A kind writes `gather` and `rows_of`; every other method has a correct
default built on those two, which a kind overrides only to be faster.
`DenseSource` is the plain float table's source; the sources of the other
kinds live in their own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from named_embed._src.base import mesh_layout, static
from named_embed._src.rows import row_chunks, vocab_parallel

ONE_HOT_CHUNK_ROWS = 4096
"""Rows a chunk when a compressed or adapted table is read by one-hot."""


def take(array: jax.Array, ids: jax.Array) -> jax.Array:
  """``array[ids]`` along axis 0, ids already in range (the fastest gather,
  with the output sharding Explicit mesh axes need)."""
  return array.at[ids].get(
    mode="promise_in_bounds",
    wrap_negative_indices=False,
    out_sharding=mesh_layout.gather_sharding(array, ids),
  )


class RowSource(static.Static):
  """The static half of a table (hashable: a jit cache key). Subclasses
  are frozen dataclasses declared with ``eq=False`` (`named_embed._src.base.static.
  Static` compares and hashes them) with ``num_rows``, ``row_shape`` and
  ``dtype``."""

  num_rows: int
  row_shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def row_aligned(self) -> tuple[bool, ...]:
    """Per array: its first axis is the vocabulary."""
    raise NotImplementedError

  @property
  def trainable(self) -> tuple[bool, ...]:
    """Per array: it receives gradients."""
    raise NotImplementedError

  def gather(self, arrays, ids: jax.Array) -> jax.Array:
    """Rows ``[*ids.shape, *row_shape]`` in ``dtype``; ids in range."""
    raise NotImplementedError

  def rows_of(self, arrays, first_id) -> jax.Array:
    """Rows ``[C, *row_shape]`` of a chunk whose first row has global id
    ``first_id``; row-aligned arrays are sliced to the chunk."""
    raise NotImplementedError

  # ------------------------------------------------ defaults on gather/rows_of

  def one_hot(self, arrays, ids: jax.Array) -> jax.Array:
    """`gather` as ``one_hot(ids) @ rows``, one vocabulary chunk at a time
    (no float copy of the table; differentiable like any JAX loop)."""
    reader = self.reader(arrays)
    flat = ids.reshape(-1)
    width = math.prod(self.row_shape)

    def step(out, start, size):
      chunk = reader.rows(start, size)
      hot = jax.nn.one_hot(flat - start, size, dtype=chunk.dtype)
      return out + lax.dot_general(
        hot,
        chunk,
        (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
      )

    out = jnp.zeros((flat.shape[0], width), jnp.float32)
    out = row_chunks.over_chunks(
      step, out, self.num_rows, min(self.num_rows, ONE_HOT_CHUNK_ROWS)
    )
    return out.astype(self.dtype).reshape(*ids.shape, *self.row_shape)

  def logits(self, arrays, hidden: jax.Array, offset=0) -> jax.Array:
    """``[N, R]`` logits of ``hidden [N, E]`` against the ``R`` rows of
    ``arrays`` (the first has global id ``offset``), in hidden's dtype."""
    rows = self.rows_of(arrays, offset)
    return row_chunks.contract(hidden, rows.reshape(rows.shape[0], -1))

  def decode(self, arrays, hidden, layout, dtype, rows_sharding):
    """Logits ``[*batch, R]`` of ``hidden`` as stored (read by ``layout``, a
    `named_embed._src.ops.decode_inputs.HiddenLayout`) in ``dtype``: ``[N, E]`` rows of
    hidden against `logits`, each device making its own rows' logits when
    the rows are split over a mesh axis."""
    hidden = jnp.transpose(hidden, layout.permutation)
    batch = hidden.shape[: layout.batch_ndim]
    flat = hidden.reshape(math.prod(batch), -1).astype(dtype)
    first = self.first_aligned(arrays)
    rows_layout = first.reshape(first.shape[0], -1)  # a bitcast, for the split
    tokens = jnp.zeros_like(flat[:, 0], jnp.int32)  # hidden's layout
    split = vocab_parallel.split_for(flat, rows_layout, tokens, rows_sharding)
    if split is None:
      logits = self.logits(arrays, flat)
    else:  # rows split over devices: each makes its own rows' logits
      logits = vocab_parallel.vocab_parallel_logits(flat, arrays, self, split)
    return logits.reshape(*batch, self.num_rows)

  def reader(self, arrays, offset=0) -> row_chunks.Reader:
    """A `named_embed._src.rows.row_chunks.Reader` of ``arrays``: float rows of any
    chunk, and the pull-back of a chunk's row gradient."""
    return row_chunks.Reader(self, tuple(arrays), offset)

  def loss_reader(self, arrays, hidden, offset=0) -> row_chunks.LossReader:
    """What the fused loss reads: chunk logits of ``hidden`` and their
    gradients (by default made from `reader`'s float rows)."""
    return row_chunks.RowsLossReader(self.reader(arrays, offset), hidden)

  def prepare(self, arrays, rows_sharding) -> tuple:
    """The arrays as every kernel reads them: frozen ones without gradient,
    row-aligned ones pinned to the vocabulary split that `named_embed.shard`
    recorded (which pins their gradients too)."""
    pin = None
    if rows_sharding is not None and tuple(rows_sharding.spec):
      pin = NamedSharding(
        rows_sharding.mesh, PartitionSpec(rows_sharding.spec[0])
      )
    out = []
    for array, aligned, trains in zip(arrays, self.row_aligned, self.trainable):
      if not trains:
        array = lax.stop_gradient(array)
      if aligned and pin is not None:
        array = mesh_layout.pin_rows(array, pin)
      out.append(array)
    return tuple(out)

  def first_aligned(self, arrays) -> jax.Array:
    """The first row-aligned array (its leading axis is the rows)."""
    return arrays[self.row_aligned.index(True)]


@dataclasses.dataclass(frozen=True, eq=False)
class DenseSource(RowSource):
  """One float array ``[V, *embedding]``: a plain table's rows (trainable
  when ``trains``), or the frozen base of an adapter."""

  num_rows: int
  row_shape: tuple[int, ...]
  dtype: np.dtype
  trains: bool = False

  row_aligned = (True,)

  @property
  def trainable(self):
    return (self.trains,)

  def gather(self, arrays, ids):
    (rows,) = arrays
    if rows.shape[0] == 1:
      # Broadcast instead of gather: the backward pass is a sum, not a scatter.
      return jnp.broadcast_to(rows[0], ids.shape + rows.shape[1:])
    return take(rows, ids)

  def one_hot(self, arrays, ids):
    """``one_hot(ids, V) @ rows``, exact in every float dtype."""
    (rows,) = arrays
    hot = jax.nn.one_hot(ids, rows.shape[0], dtype=rows.dtype)
    return lax.dot_general(
      hot,
      rows,
      (((hot.ndim - 1,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=rows.dtype,
    )

  def rows_of(self, arrays, first_id):
    del first_id
    return arrays[0]

  def logits(self, arrays, hidden, offset=0):
    del offset
    rows = arrays[0]
    return row_chunks.contract(hidden, rows.reshape(rows.shape[0], -1))

  def decode(self, arrays, hidden, layout, dtype, rows_sharding):
    """One einsum of ``hidden`` as stored with the rows (GSPMD splits it
    when the rows are split): the HLO of a hand-written decode."""
    del rows_sharding
    (rows,) = arrays
    return jnp.einsum(
      layout.subscripts, hidden.astype(dtype), rows.astype(dtype)
    )

  def prepare(self, arrays, rows_sharding):
    """The rows without gradient when frozen, pinned to the whole recorded
    sharding (embedding dimensions included: FSDP-style layouts)."""
    (rows,) = arrays
    if not self.trains:
      rows = lax.stop_gradient(rows)
    return (mesh_layout.pin_rows(rows, rows_sharding),)


@functools.lru_cache(maxsize=256)
def dense_source(shape, dtype, trains: bool = False) -> DenseSource:
  """The (cached: one object per layout) `DenseSource` of an array of
  ``shape`` ``[num_rows, *row_shape]``."""
  return DenseSource(shape[0], tuple(shape[1:]), np.dtype(dtype), trains)


# ------------------------------------------------------------ kernel helpers


def prepare(source: RowSource, arrays, rows_sharding) -> tuple:
  """``source.prepare(arrays, rows_sharding)``."""
  return source.prepare(arrays, rows_sharding)


def raw_in_order(array, names: tuple[str, ...]) -> jax.Array:
  """The data of a `NamedArray` with axes ``names``, in that order (no
  transpose, nor penzai call, when it is stored so: the eager hot path)."""
  if tuple(getattr(array, "named_axes", ())) == names:
    return array.data_array
  return array.untag(*names).unwrap()


def table_parts(table) -> tuple[RowSource, tuple]:
  """``table.row_parts()``: the static source and raw arrays of any kind of
  table (`named_embed._src.tables.contract.AbstractTable`)."""
  return table.row_parts()
