"""Pooled lookups on raw arrays: rows read and reduced chunk by chunk.

The table is any kind of table's row source (`named_embed._src.rows.row_source`):
a static `RowSource` and its tuple of raw arrays. Nothing here asks which
kind it is: rows come from a *row reader* (`gathered`: the source's
``gather``; on a vocabulary-split table, `named_embed._src.ops.pooled.parallel`'s
reader of the rows a device owns), and gradients go back through
`jax.vjp` of that reader.

Layouts (the embedding axes flattened to ``F``, a bitcast):

- fixed-size bags: ``ids [B, L]``; bag ``b`` holds the ``L`` ids of row ``b``;
- ragged bags: flat ``ids [N]`` and the ``offsets`` where bags start,
  turned into the bag of each member by `bag_index`.

`members` applies the lookup's rules to the ids once (the out-of-range
policy's `safe_ids`, the pad token row, the ``scale_grad_by_freq`` weight
of `gather.gradient_weight`) and cuts every per-member array into chunks
of ``C`` members along the member axis (padded with skipped members). A
`jax.lax.scan` then reads one chunk's rows (``[B, C, F]`` or ``[C, F]``),
reduces them into the ``[bags, F]`` accumulator, and moves on: the
``[B, L, F]`` rows of a take-then-reduce never exist.

Two custom_vjp ops own the gradients, so that the backward pass is chunked
too (autodiff of the scan would store every chunk's rows):

- `pooled_sum` (``"sum"`` and ``"mean"``): ``sum_j coef_j * w_j * row_j``
  over kept members, accumulated in float32. Backwards, one scan turns
  ``g_bag * coef_j * w_j * scale_j`` into each chunk's row cotangent and
  pulls it back to the source's trainable arrays (`pull_rows`), and, when
  there are weights, uses the chunk's rows for ``d w_j = coef_j * <g_bag,
  row_j>``.
- `pooled_max`: per feature, the largest kept row value and the first
  member that holds it; backwards, one scan gives each chunk's winning
  members the cotangent of their features (ties go to the first member,
  as in torch) and pulls it back the same way.

`pull_rows` is `jax.vjp` of the row reader for one chunk, added to the
scan carry: a row-aligned trainable array (a trainable plain table, LoRA's
``A``) receives a scatter-add into its gradient (XLA writes ``carry +
scatter(zeros, ...)`` as one scatter into the carry), any other trainable
array (LoRA's ``B``, trained rows) a sum.

``max_norm`` rows are scaled by `gather.renorm` when read (their gradient
is as without it), and ``dtype`` casts each row as read, in both
directions, as in `named_embed.lookup`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from named_embed._src.base import mesh_layout, norms, range_policy
from named_embed._src.rows import gather

MODES = ("sum", "mean", "max")
CHUNK_TARGET_BYTES = 4 * 2**20
"""Default chunks keep one chunk's float32 rows near this size."""

RowReader = Callable[[tuple, jax.Array], jax.Array]
"""``read(arrays, ids) -> rows [*ids.shape, F]``: the rows of in-range ids,
in the source's dtype, embedding axes flattened."""


def default_chunk_size(bags: int, members: int, features: int) -> int:
  """Members per chunk: a power of two whose ``[bags, C, F]`` float32 rows
  stay near `CHUNK_TARGET_BYTES`, at most ``members``.

  >>> default_chunk_size(64, 512, 1024), default_chunk_size(1, 100, 16)
  (16, 100)
  """
  budget = max(1, CHUNK_TARGET_BYTES // (4 * max(bags * features, 1)))
  return max(1, min(1 << (budget.bit_length() - 1), members))


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  """Static configuration of a pooled lookup (hashable: a jit cache key).

  Attributes:
    rows: The lookup options and the table's facts (`gather.LookupConfig`).
    source: The table's static row source (`named_embed._src.rows.row_source`).
    mode: One of `MODES`.
    chunk_size: Members per chunk.
    num_bags: Number of ragged bags; None for fixed-size bags.
    include_last_offset: Ragged: the last offset ends the last bag.
    parallel: How a vocabulary-split table maps onto the mesh (a
      `named_embed._src.ops.pooled.parallel.PoolSplit`, set at trace time), or
      None.
  """

  rows: gather.LookupConfig
  source: object
  mode: str
  chunk_size: int
  num_bags: int | None = None
  include_last_offset: bool = False
  parallel: object = None

  @property
  def features(self) -> int:
    """``F``: the number of values in a row (all embedding axes)."""
    return math.prod(self.source.row_shape)

  @property
  def row_dtype(self):
    """The dtype of the rows as pooled (the lookup's ``dtype`` or the
    table's)."""
    return self.rows.dtype or self.source.dtype

  @property
  def accumulation_dtype(self):
    """float32 (float64 for float64 rows): what sums accumulate in."""
    return norms.accumulation_dtype(self.row_dtype)


class Members(NamedTuple):
  """Every member of every bag, cut into chunks (the leading axis).

  Attributes:
    ids: In-range rows to read, ``[n, B, C]`` (fixed-size) or ``[n, C]``.
    keep: Whether the member is pooled (in a bag, in range under
      ``"fill"``, not the pad token).
    coef: The member's factor in its bag's sum (1/count for ``"mean"``),
      or None for 1.
    scale: The factor of its row's gradient (``scale_grad_by_freq``), or
      None for 1.
    bag: Ragged bags: the bag of each member (non-decreasing); else None.
  """

  ids: jax.Array
  keep: jax.Array
  coef: jax.Array | None
  scale: jax.Array | None
  bag: jax.Array | None


def bag_index(offsets, num_ids: int, num_bags: int, include_last_offset: bool):
  """``(bag, in_bag)`` of each of ``num_ids`` flat members.

  Offsets are clamped to ``[0, num_ids]`` and made non-decreasing (a
  running maximum), so that traced offsets always describe bags: an offset
  below its predecessor starts an empty bag, members before the first
  offset (and, with ``include_last_offset``, after the last) are in no bag.
  """
  bounds = lax.cummax(jnp.clip(offsets.astype(jnp.int32), 0, num_ids))
  starts = bounds[:num_bags]
  end = bounds[num_bags] if include_last_offset else num_ids
  marks = jnp.zeros((num_ids + 1,), jnp.int32).at[starts].add(1)
  bag = jnp.cumsum(marks[:num_ids]) - 1
  in_bag = (bag >= 0) & (jnp.arange(num_ids) < end)
  return jnp.clip(bag, 0, num_bags - 1), in_bag


def chunks(x, size: int, edge: bool = False):
  """``x`` (member axis last) padded to a positive multiple of ``size``
  with zeros (False), or with copies of its last value (``edge``: bag
  indices stay sorted, as the scatters over them promise XLA), as
  ``[n, ..., size]``."""
  if x is None:
    return None
  pad = -x.shape[-1] % size if x.shape[-1] else size  # at least one chunk
  widths = [(0, 0)] * (x.ndim - 1) + [(0, pad)]
  x = jnp.pad(x, widths, mode="edge" if edge and x.shape[-1] else "constant")
  x = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
  return jnp.moveaxis(x, -2, 0)


def _per_bag(values, bag, num_bags: int):
  """Sums ``values`` (int32) over each bag's members."""
  if bag is None:
    return values.sum(axis=-1)
  return jnp.zeros((num_bags,), values.dtype).at[bag].add(values)


def members(ids, offsets, policy: PoolConfig, sharded: bool):
  """The chunked `Members` (factors in the accumulation dtype), each bag's
  count of pooled members, and which bags hold an id dropped by
  ``"fill"`` (None under other policies)."""
  rules = policy.rows
  num_rows = policy.source.num_rows
  dtype = policy.accumulation_dtype
  bag = in_bag = None
  num_bags = policy.num_bags if policy.num_bags is not None else ids.shape[0]
  if policy.num_bags is not None:
    bag, in_bag = bag_index(
      offsets, ids.shape[0], num_bags, policy.include_last_offset
    )
    ids = jnp.where(in_bag, ids, jnp.zeros_like(ids))  # never checked
  safe, valid = range_policy.safe_ids(
    ids,
    rules.vocab_size or num_rows,
    rules.out_of_range,
    rules.runtime_check,
    sharded,
  )
  read = mask_and(in_bag, valid)
  keep = jnp.ones(safe.shape, jnp.bool_) if read is None else read
  if rules.padding_index is not None:
    keep = keep & (safe != rules.padding_index)
  count = _per_bag(keep.astype(jnp.int32), bag, num_bags)
  bad = None
  if valid is not None:
    dropped = (~valid) if in_bag is None else (in_bag & ~valid)
    bad = _per_bag(dropped.astype(jnp.int32), bag, num_bags) > 0
  coef = None
  if policy.mode == "mean":
    inverse = 1 / jnp.maximum(count, 1).astype(dtype)
    coef = (
      inverse[bag]
      if bag is not None
      else jnp.broadcast_to(inverse[:, None], keep.shape)
    )
  scale = None
  if rules.scale_grad_by_freq:  # counts over every id: on one device
    whole = [replicated(x) for x in (safe, read)]
    scale = gather.gradient_weight(*whole, num_rows, rules).astype(dtype)
  size = policy.chunk_size
  chunked = Members(
    ids=chunks(safe, size),
    keep=chunks(keep, size),
    coef=chunks(coef, size),
    scale=chunks(scale, size),
    bag=chunks(bag, size, edge=True),
  )
  return chunked, count, bad


def replicated(x):
  """``x`` replicated over its mesh if it is split over Explicit mesh axes
  (None stays None)."""
  if x is None or not mesh_layout.spans_devices(x):
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def mask_and(a, b):
  """``a & b`` of two boolean masks, where None stands for all True (None
  if both are)."""
  if a is None:
    return b
  return a if b is None else a & b


def factor_product(*factors):
  """The product of the factors that are not None (None if all are)."""
  present = [f for f in factors if f is not None]
  if not present:
    return None
  return functools.reduce(lambda a, b: a * b, present)


# ------------------------------------------------------------ reading rows


def gathered(source, arrays: tuple, ids: jax.Array) -> jax.Array:
  """The `RowReader` of a whole table: ``source.gather`` of in-range ids,
  embedding axes flattened to ``[*ids.shape, F]``."""
  rows = source.gather(arrays, ids)
  return rows.reshape(*ids.shape, math.prod(source.row_shape))


def as_pooled(policy: PoolConfig, rows: jax.Array, n_token_axes: int):
  """Rows as read by a reader, as they are pooled: renormed under
  ``max_norm`` (gradient as if not), cast to the lookup's ``dtype``, in
  the accumulation dtype."""
  rows = gather.renorm(rows, policy.rows, n_token_axes)
  return rows.astype(policy.row_dtype).astype(policy.accumulation_dtype)


def read_pooled(policy: PoolConfig, read: RowReader, arrays, ids):
  """`as_pooled` rows of ``ids`` (one chunk)."""
  return as_pooled(policy, read(arrays, ids), ids.ndim)


def zero_grads(policy: PoolConfig, arrays) -> tuple:
  """The gradient carry: zeros for each trainable array, None for others."""
  return tuple(
    jnp.zeros_like(a) if trains else None
    for a, trains in zip(arrays, policy.source.trainable)
  )


def pull_rows(policy: PoolConfig, read: RowReader, arrays, ids, d_rows, grads):
  """Adds to ``grads`` (`zero_grads`' layout) the gradient that the row
  cotangent ``d_rows [*ids.shape, F]`` (accumulation dtype) of one chunk
  gives the trainable arrays, through `jax.vjp` of ``read``.

  Returns ``(rows, grads)``: the chunk's rows as read (the vjp's primal,
  for callers that need them; None when no array trains) and the new
  carry.
  """
  trains = policy.source.trainable
  if not any(trains):
    return None, grads

  def rows_of(*trained):
    given = iter(trained)
    full = tuple(next(given) if t else a for a, t in zip(arrays, trains))
    return read(full, ids)

  rows, vjp = jax.vjp(rows_of, *(a for a, t in zip(arrays, trains) if t))
  # The transposes of the forward casts: to the lookup's dtype, then to the
  # source's.
  d_rows = d_rows.astype(policy.row_dtype).astype(rows.dtype)
  parts = iter(vjp(d_rows))
  return rows, tuple(g + next(parts) if t else g for g, t in zip(grads, trains))


def _select(keep, values, factor):
  """``values * factor`` where ``keep``, else 0 (a select: 0 * inf is NaN)."""
  if factor is not None:
    values = values * factor[..., None].astype(values.dtype)
  zero = jnp.zeros((), values.dtype)
  return jnp.where(keep[..., None], values, zero)


def _num_bags(policy: PoolConfig, m: Members) -> int:
  return policy.num_bags if policy.num_bags is not None else m.ids.shape[1]


# ------------------------------------------------------------ sum and mean


def sum_forward(policy: PoolConfig, read: RowReader, arrays, weights, m):
  """``[bags, F]`` weighted sums of kept rows, in the accumulation dtype.

  ``weights`` is None or chunked like ``m.ids``.
  """

  def body(total, chunk):
    ids, keep, coef, bag, w = chunk
    rows = read_pooled(policy, read, arrays, ids)
    part = _select(keep, rows, factor_product(coef, w))
    if bag is None:
      return total + part.sum(axis=1), None
    return total.at[bag].add(part, indices_are_sorted=True), None

  shape = (_num_bags(policy, m), policy.features)
  start = jnp.zeros(shape, policy.accumulation_dtype)
  xs = (m.ids, m.keep, m.coef, m.bag, weights)
  return lax.scan(body, start, xs)[0]


def sum_backward(policy: PoolConfig, read: RowReader, arrays, weights, m, g):
  """The trainable arrays' gradients (`zero_grads`' layout, pulled back
  chunk by chunk) and, with weights, theirs (from each chunk's rows), for
  the cotangent ``g [bags, F]`` of `sum_forward`."""

  def body(grads, chunk):
    ids, keep, coef, scale, bag, w = chunk
    g_rows = g[:, None, :] if bag is None else g[bag]
    d_rows = _select(keep, g_rows, factor_product(coef, w, scale))
    rows, grads = pull_rows(policy, read, arrays, ids, d_rows, grads)
    if w is None:
      return grads, None
    if rows is None:
      rows = read(arrays, ids)
    rows = as_pooled(policy, rows, ids.ndim).astype(g.dtype)
    d_w = jnp.sum(_select(keep, rows * g_rows, coef), axis=-1)
    return grads, d_w.astype(w.dtype)

  xs = (m.ids, m.keep, m.coef, m.scale, m.bag, weights)
  return lax.scan(body, zero_grads(policy, arrays), xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pooled_sum(policy: PoolConfig, arrays, weights, m: Members):
  """`sum_forward` of the whole table, with a chunked backward pass
  (`sum_backward`)."""
  return sum_forward(policy, _reader(policy), arrays, weights, m)


def _reader(policy: PoolConfig) -> RowReader:
  return functools.partial(gathered, policy.source)


def _sum_fwd(policy, arrays, weights, m):
  return pooled_sum(policy, arrays, weights, m), (arrays, weights, m)


def _sum_bwd(policy, residuals, g):
  arrays, weights, m = residuals
  grads, d_weights = sum_backward(
    policy, _reader(policy), arrays, weights, m, g
  )
  return grads, d_weights, None


pooled_sum.defvjp(_sum_fwd, _sum_bwd)


# ------------------------------------------------------------ max


def max_and_argmax(policy: PoolConfig, read: RowReader, arrays, m: Members):
  """``[bags, F]`` per-feature maxima of kept rows (-inf for none), and the
  first member (its index in the chunked layout, ``chunk * C + c``)
  holding each; -1 where the bag has no kept member."""
  size = m.ids.shape[-1]
  shape = (_num_bags(policy, m), policy.features)
  dtype = policy.accumulation_dtype
  low = jnp.full((), -jnp.inf, dtype)
  none = jnp.full((), jnp.iinfo(jnp.int32).max, jnp.int32)

  def body(carry, chunk):
    best, arg = carry
    index, ids, keep, bag = chunk
    rows = read_pooled(policy, read, arrays, ids)
    rows = jnp.where(keep[..., None], rows, low)
    member = _member_index(index, ids, size)[..., None]
    if bag is None:
      top = rows.max(axis=1)
      first = jnp.where(rows == top[:, None], member, none).min(axis=1)
    else:
      top = best.at[bag].max(rows, indices_are_sorted=True)
      holds = (rows == top[bag]) & keep[:, None]
      first = jnp.full(shape, none).at[bag].min(jnp.where(holds, member, none))
    better = top > best
    return (jnp.where(better, top, best), jnp.where(better, first, arg)), None

  start = (jnp.full(shape, low), jnp.full(shape, -1, jnp.int32))
  numbers = jnp.arange(m.ids.shape[0], dtype=jnp.int32)
  return lax.scan(body, start, (numbers, m.ids, m.keep, m.bag))[0]


def _member_index(index, ids, size: int):
  """The chunked-layout index ``index * C + c`` of each member of chunk
  ``index``."""
  return index * size + lax.broadcasted_iota(jnp.int32, ids.shape, ids.ndim - 1)


def max_backward(policy: PoolConfig, read: RowReader, arrays, m, arg, g):
  """The trainable arrays' gradients (`zero_grads`' layout) for the
  cotangent ``g [bags, F]`` of the maxima: each feature's cotangent goes
  to the row of the member ``arg`` names (`max_and_argmax`), pulled back
  chunk by chunk; members not kept (pad rows; on a split table, rows of
  other devices) get none."""
  size = m.ids.shape[-1]
  zero = jnp.zeros((), g.dtype)

  def body(grads, chunk):
    index, ids, keep, bag = chunk
    member = _member_index(index, ids, size)
    if bag is None:  # [B, C, F]
      wins = arg[:, None, :] == member[..., None]
      g_rows = g[:, None, :]
    else:  # [C, F]
      wins = arg[bag] == member[:, None]
      g_rows = g[bag]
    d_rows = jnp.where(wins & keep[..., None], g_rows, zero)
    return pull_rows(policy, read, arrays, ids, d_rows, grads)[1], None

  numbers = jnp.arange(m.ids.shape[0], dtype=jnp.int32)
  xs = (numbers, m.ids, m.keep, m.bag)
  return lax.scan(body, zero_grads(policy, arrays), xs)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pooled_max(policy: PoolConfig, arrays, m: Members):
  """``[bags, F]`` per-feature maxima of kept rows of the whole table
  (-inf for none), with a chunked backward pass (`max_backward`)."""
  return max_and_argmax(policy, _reader(policy), arrays, m)[0]


def _max_fwd(policy, arrays, m):
  best, arg = max_and_argmax(policy, _reader(policy), arrays, m)
  return best, (arrays, m, arg)


def _max_bwd(policy, residuals, g):
  arrays, m, arg = residuals
  grads = max_backward(policy, _reader(policy), arrays, m, arg, g)
  return grads, None


pooled_max.defvjp(_max_fwd, _max_bwd)


def finish(pooled, count, bad, policy: PoolConfig):
  """Zeros for bags with nothing pooled (``"max"``), NaN for bags holding
  an id dropped by ``"fill"``, and the rows' dtype."""
  if policy.mode == "max":
    pooled = jnp.where(count[:, None] > 0, pooled, jnp.zeros((), pooled.dtype))
  if bad is not None:
    pooled = jnp.where(
      bad[:, None], jnp.full((), jnp.nan, pooled.dtype), pooled
    )
  return pooled.astype(policy.row_dtype)
