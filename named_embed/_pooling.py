"""Pooled lookups on raw arrays: rows gathered and reduced chunk by chunk.

Layouts (the embedding axes flattened to ``F``, a bitcast):

- fixed-size bags: ``ids [B, L]``; bag ``b`` holds the ``L`` ids of row ``b``;
- ragged bags: flat ``ids [N]`` and the ``offsets`` where bags start,
  turned into the bag of each member by `bag_index`.

`members` applies the lookup's rules to the ids once (the out-of-range
policy's `safe_ids`, the pad token row, the ``scale_grad_by_freq`` weight
of `_gather.gradient_weight`) and cuts every per-member array into chunks
of ``C`` members along the member axis (padded with skipped members). A
`jax.lax.scan` then reads one chunk's rows (``[B, C, F]`` or ``[C, F]``),
reduces them into the ``[bags, F]`` accumulator, and moves on: the
``[B, L, F]`` rows of a take-then-reduce never exist.

Two custom_vjp ops own the gradients, so that the backward pass is chunked
too (autodiff of the scan would store every chunk's rows for the weights'
gradient):

- `pooled_sum` (``"sum"`` and ``"mean"``): ``sum_j coef_j * w_j * row_j``
  over kept members, accumulated in float32. Backwards, one scan
  scatter-adds ``g_bag * coef_j * w_j * scale_j`` into the table's gradient
  and, when there are weights, recomputes each chunk's rows for
  ``d w_j = coef_j * <g_bag, row_j>``.
- `pooled_max`: per feature, the largest kept row value and the first
  member that holds it; backwards, the cotangent goes to that member's row
  only (ties go to the first member, as in torch).

``max_norm`` rows are scaled by `_gather.renorm` when read (their gradient
is as without it), in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from named_embed import _gather, _layout, _norms, _out_of_range

MODES = ("sum", "mean", "max")
CHUNK_TARGET_BYTES = 4 * 2**20
"""Default chunks keep one chunk's float32 rows near this size."""


def default_chunk_size(bags: int, members: int, features: int) -> int:
  """Members per chunk: a power of two whose ``[bags, C, F]`` float32 rows
  stay near `CHUNK_TARGET_BYTES`, at most ``members``.

  >>> default_chunk_size(64, 512, 1024), default_chunk_size(1, 100, 16)
  (16, 100)
  """
  budget = max(1, CHUNK_TARGET_BYTES // (4 * max(bags * features, 1)))
  return max(1, min(1 << (budget.bit_length() - 1), members))


@dataclasses.dataclass(frozen=True)
class PoolPolicy:
  """Static configuration of a pooled lookup (hashable: a jit cache key).

  Attributes:
    rows: The lookup options and the table's facts (`_gather.RowPolicy`).
    mode: One of `MODES`.
    chunk_size: Members per chunk.
    num_bags: Number of ragged bags; None for fixed-size bags.
    include_last_offset: Ragged: the last offset ends the last bag.
    parallel: How a vocabulary-split table maps onto the mesh (a
      `named_embed._pooled_parallel.ParallelPlan`, set at trace time), or
      None.
  """

  rows: _gather.RowPolicy
  mode: str
  chunk_size: int
  num_bags: int | None = None
  include_last_offset: bool = False
  parallel: object = None


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


def chunks(x, size: int):
  """``x`` (member axis last) padded to a positive multiple of ``size``
  with zeros (False), as ``[n, ..., size]``."""
  if x is None:
    return None
  pad = -x.shape[-1] % size if x.shape[-1] else size  # at least one chunk
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  x = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
  return jnp.moveaxis(x, -2, 0)


def _per_bag(values, bag, num_bags: int):
  """Sums ``values`` (int32) over each bag's members."""
  if bag is None:
    return values.sum(axis=-1)
  return jnp.zeros((num_bags,), values.dtype).at[bag].add(values)


def members(
  ids, offsets, num_rows: int, policy: PoolPolicy, sharded: bool, dtype
):
  """The chunked `Members` (factors in ``dtype``), each bag's count of
  pooled members, and which bags hold an id dropped by ``"fill"`` (None
  under other policies)."""
  rules = policy.rows
  bag = in_bag = None
  num_bags = policy.num_bags if policy.num_bags is not None else ids.shape[0]
  if policy.num_bags is not None:
    bag, in_bag = bag_index(
      offsets, ids.shape[0], num_bags, policy.include_last_offset
    )
    ids = jnp.where(in_bag, ids, jnp.zeros_like(ids))  # never checked
  safe, valid = _out_of_range.safe_ids(
    ids,
    rules.vocab_size or num_rows,
    rules.out_of_range,
    rules.runtime_check,
    sharded,
  )
  read = _both(in_bag, valid)
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
    scale = _gather.gradient_weight(*whole, num_rows, rules).astype(dtype)
  size = policy.chunk_size
  chunked = Members(
    ids=chunks(safe, size),
    keep=chunks(keep, size),
    coef=chunks(coef, size),
    scale=chunks(scale, size),
    bag=chunks(bag, size),
  )
  return chunked, count, bad


def replicated(x):
  """``x`` replicated over its mesh if it is split over Explicit mesh axes
  (None stays None)."""
  if x is None or not _layout.spans_devices(x):
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def _both(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def _times(*factors):
  """The product of the factors that are not None (None if all are)."""
  present = [f for f in factors if f is not None]
  if not present:
    return None
  return functools.reduce(lambda a, b: a * b, present)


def _read(table, ids, policy: PoolPolicy):
  """The (renormed) rows ``table[ids]`` of one chunk."""
  rows = table.at[ids].get(
    mode="promise_in_bounds",
    wrap_negative_indices=False,
    out_sharding=_layout.gather_sharding(table, ids),
  )
  return _gather.renorm(rows, policy.rows, ids.ndim)


def _select(keep, values, factor):
  """``values * factor`` where ``keep``, else 0 (a select: 0 * inf is NaN)."""
  if factor is not None:
    values = values * factor[..., None].astype(values.dtype)
  zero = jnp.zeros((), values.dtype)
  return jnp.where(keep[..., None], values, zero)


def _num_bags(policy: PoolPolicy, m: Members) -> int:
  return policy.num_bags if policy.num_bags is not None else m.ids.shape[1]


def sum_forward(policy: PoolPolicy, table, weights, m: Members):
  """``[bags, F]`` weighted sums of kept rows, in the accumulation dtype.

  ``table`` is ``[R, F]``; ``weights`` is None or chunked like ``m.ids``.
  """
  accumulate = _norms.accumulation_dtype(table.dtype)

  def body(total, chunk):
    ids, keep, coef, bag, w = chunk
    rows = _read(table, ids, policy).astype(accumulate)
    part = _select(keep, rows, _times(coef, w))
    if bag is None:
      return total + part.sum(axis=1), None
    return total.at[bag].add(part, indices_are_sorted=True), None

  start = jnp.zeros((_num_bags(policy, m), table.shape[1]), accumulate)
  xs = (m.ids, m.keep, m.coef, m.bag, weights)
  return lax.scan(body, start, xs)[0]


def sum_backward(policy: PoolPolicy, table, weights, m: Members, g):
  """The table's gradient (scatter-added chunk by chunk) and, with
  weights, theirs (each chunk's rows read again), for the cotangent
  ``g [bags, F]`` of `sum_forward`."""

  def body(d_table, chunk):
    ids, keep, coef, scale, bag, w = chunk
    g_rows = g[:, None, :] if bag is None else g[bag]
    update = _select(keep, g_rows, _times(coef, w, scale))
    d_table = d_table.at[ids].add(
      update.astype(table.dtype), mode="promise_in_bounds"
    )
    if w is None:
      return d_table, None
    rows = _read(table, ids, policy).astype(g.dtype)
    d_w = jnp.sum(_select(keep, rows * g_rows, coef), axis=-1)
    return d_table, d_w.astype(w.dtype)

  xs = (m.ids, m.keep, m.coef, m.scale, m.bag, weights)
  return lax.scan(body, jnp.zeros_like(table), xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pooled_sum(policy: PoolPolicy, table, weights, m: Members):
  """`sum_forward` with a chunked backward pass (`sum_backward`)."""
  return sum_forward(policy, table, weights, m)


def _sum_fwd(policy, table, weights, m):
  return sum_forward(policy, table, weights, m), (table, weights, m)


def _sum_bwd(policy, residuals, g):
  table, weights, m = residuals
  d_table, d_weights = sum_backward(policy, table, weights, m, g)
  return d_table, d_weights, None


pooled_sum.defvjp(_sum_fwd, _sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pooled_max(policy: PoolPolicy, table, m: Members):
  """``[bags, F]`` per-feature maxima of kept rows (-inf for none)."""
  return max_and_argmax(policy, table, m)[0]


def max_and_argmax(policy: PoolPolicy, table, m: Members):
  """The maxima, and the first member (its index in the chunked layout,
  ``chunk * C + c``) holding each; -1 where the bag has no kept member."""
  size = m.ids.shape[-1]
  shape = (_num_bags(policy, m), table.shape[1])
  low = jnp.full((), -jnp.inf, table.dtype)
  none = jnp.full((), jnp.iinfo(jnp.int32).max, jnp.int32)

  def body(carry, chunk):
    best, arg = carry
    index, ids, keep, bag = chunk
    rows = jnp.where(keep[..., None], _read(table, ids, policy), low)
    member = index * size + lax.broadcasted_iota(
      jnp.int32, ids.shape, ids.ndim - 1
    )
    member = member[..., None]
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


def _max_fwd(policy, table, m):
  best, arg = max_and_argmax(policy, table, m)
  return best, (table, m.ids, arg)


def winner_rows(ids, arg):
  """The row read by member ``arg`` (chunked index) of each bag and
  feature, and whether there is one."""
  size = ids.shape[-1]
  found = arg >= 0
  arg = jnp.maximum(arg, 0)
  if ids.ndim == 3:  # fixed-size bags: [n, B, C]
    bags = lax.broadcasted_iota(jnp.int32, arg.shape, 0)
    return ids[arg // size, bags, arg % size], found
  return ids[arg // size, arg % size], found


def max_backward(table, rows, found, g):
  """The table's gradient: ``g [bags, F]`` added to ``rows [bags, F]``
  (the winners of `winner_rows`) where ``found``."""
  features = lax.broadcasted_iota(jnp.int32, rows.shape, 1)
  g = jnp.where(found, g, jnp.zeros((), g.dtype)).astype(table.dtype)
  return jnp.zeros_like(table).at[rows, features].add(g)


def _max_bwd(policy, residuals, g):
  del policy
  table, ids, arg = residuals
  return max_backward(table, *winner_rows(ids, arg), g), None


pooled_max.defvjp(_max_fwd, _max_bwd)


def finish(pooled, count, bad, policy: PoolPolicy, dtype):
  """Zeros for bags with nothing pooled (``"max"``), NaN for bags holding
  an id dropped by ``"fill"``, and the table's dtype."""
  if policy.mode == "max":
    pooled = jnp.where(count[:, None] > 0, pooled, jnp.zeros((), pooled.dtype))
  if bad is not None:
    pooled = jnp.where(
      bad[:, None], jnp.full((), jnp.nan, pooled.dtype), pooled
    )
  return pooled.astype(dtype)
