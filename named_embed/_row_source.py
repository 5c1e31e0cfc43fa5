"""Row sources: how a compressed or adapted table makes its rows.

A plain `EmbeddingTable` hands kernels one ``[V, *embedding]`` array. The
other kinds of table (`QuantizedTable`, `LoraTable`, `TrainableRowsTable`)
hand them a static, hashable `RowSource` and a tuple of raw arrays
(``table.row_parts()``). For each array the source says whether its first
axis is the vocabulary (*row-aligned*: sliced, gathered and sharded with
the rows) and whether it trains; and it makes rows three ways, never
building the float ``[V, *embedding]`` table:

- `RowSource.gather` (lookups): the rows of some ids. A quantised table
  gathers codes and scales and dequantises those rows only; LoRA adds
  ``A[ids] @ B``; trainable rows pick the trained row where an id is one
  of theirs.
- `RowSource.logits` (decodes): ``[N, R]`` logits of ``hidden [N, E]``. A
  quantised table dequantises one chunk of rows at a time
  (`named_embed._row_chunks.chunked_logits`); LoRA adds
  ``(hidden . B) . A^T``; trainable rows overwrite their own columns.
- `RowSource.rows_of` (the fused loss): the float rows of one vocabulary
  chunk, from the row-aligned arrays sliced to it. `RowSource.reader`
  wraps a source for the chunked loss (`named_embed._row_chunks.Reader`).

Adapted tables wrap a frozen base source (`DenseSource` or
`QuantizedSource`); their arrays are the base's followed by their own.
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
from penzai import pz

from named_embed import _layout, _quantization, _row_chunks

DECODE_CHUNK_BYTES = 8 * 2**20
"""A quantised decode dequantises chunks of rows of about this many bytes."""


def _take(array: jax.Array, ids: jax.Array) -> jax.Array:
  """``array[ids]`` along axis 0, ids already in range."""
  return array.at[ids].get(
    mode="promise_in_bounds",
    wrap_negative_indices=False,
    out_sharding=_layout.gather_sharding(array, ids),
  )


class RowSource:
  """The static half of a table that is not one float array (hashable: a
  jit cache key). Subclasses are frozen dataclasses."""

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

  def logits(self, arrays, hidden: jax.Array, offset=0) -> jax.Array:
    """``[N, R]`` logits of ``hidden [N, E]`` against the ``R`` rows of
    ``arrays`` (the first has global id ``offset``), in hidden's dtype."""
    raise NotImplementedError

  def reader(self, arrays, offset=0) -> _row_chunks.Reader:
    """A `named_embed._row_chunks.Reader` of ``arrays`` for the chunked
    loss."""
    return _row_chunks.Reader(self, tuple(arrays), offset)


@dataclasses.dataclass(frozen=True)
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
    return _take(arrays[0], ids)

  def rows_of(self, arrays, first_id):
    del first_id
    return arrays[0]

  def logits(self, arrays, hidden, offset=0):
    del offset
    rows = arrays[0]
    return _row_chunks.contract(hidden, rows.reshape(rows.shape[0], -1))


@dataclasses.dataclass(frozen=True)
class QuantizedSource(RowSource):
  """Integer codes and float32 scales (`named_embed._quantization`)."""

  num_rows: int
  row_shape: tuple[int, ...]
  dtype: np.dtype
  bits: int
  group_size: int | None

  row_aligned = (True, True)
  trainable = (False, False)

  def _dequantize(self, codes, scales):
    return _quantization.dequantize(
      codes, scales, self.bits, self.group_size, self.dtype
    )

  def gather(self, arrays, ids):
    codes, scales = arrays
    return self._dequantize(_take(codes, ids), _take(scales, ids))

  def rows_of(self, arrays, first_id):
    del first_id
    return self._dequantize(*arrays)

  def logits(self, arrays, hidden, offset=0):
    del offset
    row_bytes = math.prod(self.row_shape) * 4
    chunk = max(
      256, 2 ** int(math.log2(max(DECODE_CHUNK_BYTES // row_bytes, 1)))
    )
    return _row_chunks.chunked_logits(hidden, tuple(arrays), self, chunk)


@dataclasses.dataclass(frozen=True)
class LoraSource(RowSource):
  """A frozen base plus ``scale * A @ B``: arrays ``(*base, A, B)`` with
  ``A [V, rank]`` and ``B [rank, *embedding]``."""

  base: RowSource
  scale: float
  trainable_a: bool
  trainable_b: bool

  @property
  def num_rows(self):
    return self.base.num_rows

  @property
  def row_shape(self):
    return self.base.row_shape

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def row_aligned(self):
    return (*self.base.row_aligned, True, False)

  @property
  def trainable(self):
    return (*self.base.trainable, self.trainable_a, self.trainable_b)

  def _delta(self, a_rows, b):
    """``scale * a_rows @ B`` in float32, ``[*lead, *row_shape]``."""
    flat_b = b.reshape(b.shape[0], -1).astype(jnp.float32)
    delta = jnp.einsum("...r,re->...e", a_rows.astype(jnp.float32), flat_b)
    delta = delta * jnp.float32(self.scale)
    return delta.reshape(*a_rows.shape[:-1], *self.row_shape)

  def gather(self, arrays, ids):
    *base, a, b = arrays
    rows = self.base.gather(base, ids).astype(jnp.float32)
    return (rows + self._delta(_take(a, ids), b)).astype(self.dtype)

  def rows_of(self, arrays, first_id):
    *base, a, b = arrays
    rows = self.base.rows_of(base, first_id).astype(jnp.float32)
    return (rows + self._delta(a, b)).astype(self.dtype)

  def logits(self, arrays, hidden, offset=0):
    *base, a, b = arrays
    z = self.base.logits(base, hidden, offset)
    hb = _row_chunks.contract(hidden, b.reshape(b.shape[0], -1))  # [N, rank]
    low_rank = _row_chunks.contract(hb, a) * jnp.asarray(
      self.scale, hidden.dtype
    )
    return z + low_rank


@dataclasses.dataclass(frozen=True)
class TrainableRowsSource(RowSource):
  """A frozen base whose rows ``row_ids`` (sorted) are replaced by trained
  ones: arrays ``(*base, values)`` with ``values [k, *embedding]``."""

  base: RowSource
  row_ids: tuple[int, ...]
  trainable_values: bool

  @property
  def num_rows(self):
    return self.base.num_rows

  @property
  def row_shape(self):
    return self.base.row_shape

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def row_aligned(self):
    return (*self.base.row_aligned, False)

  @property
  def trainable(self):
    return (*self.base.trainable, self.trainable_values)

  def _select(self, ids, base_rows, values):
    """``values[j]`` where ``ids`` is ``row_ids[j]``, else ``base_rows``."""
    chosen = jnp.asarray(self.row_ids, jnp.int32)
    # "compare_all" (no scan) also runs on ids split over Explicit mesh
    # axes; a scan costs less for many rows.
    method = "compare_all" if len(self.row_ids) <= 1024 else "scan"
    position = jnp.searchsorted(chosen, ids.astype(jnp.int32), method=method)
    position = jnp.minimum(position, len(self.row_ids) - 1)
    hit = _take(chosen, position) == ids
    picked = _take(values, position).astype(base_rows.dtype)
    hit = hit.reshape(hit.shape + (1,) * (base_rows.ndim - hit.ndim))
    return jnp.where(hit, picked, base_rows)

  def gather(self, arrays, ids):
    *base, values = arrays
    return self._select(ids, self.base.gather(base, ids), values)

  def rows_of(self, arrays, first_id):
    *base, values = arrays
    rows = self.base.rows_of(base, first_id)
    ids = first_id + jnp.arange(rows.shape[0], dtype=jnp.int32)
    return self._select(ids, rows, values)

  def logits(self, arrays, hidden, offset=0):
    *base, values = arrays
    z = self.base.logits(base, hidden, offset)
    own = _row_chunks.contract(
      hidden, values.reshape(values.shape[0], -1)
    )  # [N, k]
    columns = jnp.asarray(self.row_ids, jnp.int32) - offset
    inside = (columns >= 0) & (columns < z.shape[1])
    columns = jnp.where(inside, columns, z.shape[1])  # dropped below
    return z.at[:, columns].set(own, mode="drop")


class NoFloatRows:
  """Mixin of the tables that hold no float ``[V, *embedding]`` array: the
  plain table's accessors of that array (read by inspection and the
  exporters) refuse with a message saying what to call instead."""

  def _no_float_rows(self, what: str):
    fix = "dequantized()" if hasattr(self, "dequantized") else "merged()"
    raise TypeError(
      f"{type(self).__name__} holds no float table, so it has no {what}:"
      " its kernels read its parts (lookups, decodes and the fused loss"
      f" work on it directly). For inspection or export, use"
      f" `table.{fix}` (which builds the float table)."
    )

  def rows_array(self):
    self._no_float_rows("rows_array()")

  def token_rows(self):
    self._no_float_rows("token_rows()")

  def rows_and_axes(self):
    self._no_float_rows("rows_and_axes()")


class BaseFacts:
  """Mixin of the adapted tables (LoRA, trainable rows): what a table is
  (its axes, vocabulary, pad token row, alignment rows, placement) is its
  frozen ``base``'s."""

  @property
  def vocabulary_axis(self) -> str:
    """The base's vocabulary axis name."""
    return self.base.vocabulary_axis

  @property
  def padding_index(self):
    """The base's pad token row, or None."""
    return self.base.padding_index

  @property
  def vocabulary(self):
    """The base's `Vocabulary`, or None."""
    return self.base.vocabulary

  @property
  def true_vocab_size(self):
    """The base's token count when it has alignment rows, else None."""
    return self.base.true_vocab_size

  @property
  def rows_sharding(self):
    """The base's recorded row sharding, or None."""
    return self.base.rows_sharding

  @property
  def vocab_size(self) -> int:
    """The number of tokens."""
    return self.base.vocab_size

  @property
  def num_rows(self) -> int:
    """The number of rows, alignment rows included."""
    return self.base.num_rows

  @property
  def embedding_axes(self) -> dict[str, int]:
    """The embedding axes and their sizes."""
    return self.base.embedding_axes

  @property
  def dtype(self) -> np.dtype:
    """The dtype of the rows as read (the base's)."""
    return np.dtype(self.base.dtype)

  def float_table(self, rows: jax.Array):
    """A frozen float `EmbeddingTable` of ``rows`` that is otherwise the
    base (pad token row, vocabulary, alignment rows, placement)."""
    from named_embed.table import EmbeddingTable

    base = self.base
    value = pz.nx.wrap(rows, self.vocabulary_axis, *self.embedding_axes)
    return EmbeddingTable(
      value,
      self.vocabulary_axis,
      base.padding_index,
      vocabulary=base.vocabulary,
      true_vocab_size=base.true_vocab_size,
      rows_sharding=base.rows_sharding,
    )


# ------------------------------------------------------------ kernel helpers


def prepare(source: RowSource, arrays, rows_sharding) -> tuple:
  """The arrays as every kernel reads them: frozen ones without gradient,
  row-aligned ones pinned to the vocabulary split that `named_embed.shard`
  recorded (which pins their gradients too)."""
  pin = None
  if rows_sharding is not None and tuple(rows_sharding.spec):
    pin = NamedSharding(
      rows_sharding.mesh, PartitionSpec(rows_sharding.spec[0])
    )
  out = []
  for array, aligned, trains in zip(
    arrays, source.row_aligned, source.trainable
  ):
    if not trains:
      array = lax.stop_gradient(array)
    if aligned and pin is not None:
      array = _layout.pin_rows(array, pin)
    out.append(array)
  return tuple(out)


def raw_in_order(array, names: tuple[str, ...]) -> jax.Array:
  """The data of a `NamedArray` with axes ``names``, in that order (no
  transpose, nor penzai call, when it is stored so: the eager hot path)."""
  if tuple(getattr(array, "named_axes", ())) == names:
    return array.data_array
  return array.untag(*names).unwrap()


def table_parts(table) -> tuple[RowSource, tuple]:
  """``table.row_parts()``: the static source and raw arrays of any kind of
  table (`named_embed._table_kind.AbstractTable`)."""
  return table.row_parts()


@functools.lru_cache(maxsize=256)
def dense_source(num_rows, row_shape, dtype, trains: bool = False):
  """The (cached) `DenseSource` of a ``[num_rows, *row_shape]`` array."""
  return DenseSource(num_rows, row_shape, np.dtype(dtype), trains)
