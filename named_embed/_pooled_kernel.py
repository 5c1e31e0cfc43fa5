"""The jitted kernel of a pooled lookup: layout, rules, reduction, finish.

One kernel per static configuration (`compile_pool`, cached by the caller):
the fixed-size layout is made ``[B, L]`` inside it (no eager transpose),
`_pooling.members` applies the lookup's rules to the ids, the reduction
runs on one device (`_pooling`) or, when the computation is split over
devices, vocabulary-parallel (`_pooled_parallel`), and `_pooling.finish`
gives empty bags zeros and ``"fill"`` bags NaN.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from named_embed import (
  _layout,
  _norms,
  _pooled_parallel,
  _pooling,
  _table_arrays,
)


def compile_pool(
  policy: _pooling.PoolPolicy,
  member_dim: int | None,
  out_shape: tuple[int, ...],
  scope: str,
):
  """``(table [R, *embedding], ids, weights, offsets) -> [*out_shape,
  *embedding]``, jitted. ``member_dim`` is the member axis of fixed-size
  ids (None for ragged ids)."""

  def pooled_lookup_kernel(table, ids, weights, offsets):
    with jax.named_scope(scope):
      if member_dim is not None:
        ids, weights = (members_last(x, member_dim) for x in (ids, weights))
      pooled = pool(table, ids, weights, offsets, policy)
      return pooled.reshape(*out_shape, *table.shape[1:])

  return jax.jit(pooled_lookup_kernel)


def members_last(x, member_dim: int):
  """``x`` with the member axis last and the others flattened: ``[B, L]``."""
  if x is None:
    return None
  x = jnp.moveaxis(x, member_dim, -1)
  return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def pool(table, ids, weights, offsets, policy: _pooling.PoolPolicy):
  """``[bags, *embedding]`` pooled rows of ``table [R, *embedding]``."""
  num_rows, embedding = table.shape[0], table.shape[1:]
  rules = policy.rows
  ragged = policy.num_bags is not None
  num_bags = policy.num_bags if ragged else ids.shape[0]
  if num_bags == 0:
    return jnp.zeros((0, *embedding), table.dtype)
  if ragged:  # every device pools whole bags
    ids, weights = _pooling.replicated(ids), _pooling.replicated(weights)
  sharded = _layout.spans_devices(table, ids) or _layout.splits(
    rules.rows_sharding
  )
  table = _table_arrays.kernel_rows(table, rules.frozen, rules.rows_sharding)
  accumulate = _norms.accumulation_dtype(table.dtype)
  m, count, bad = _pooling.members(
    ids, offsets, num_rows, policy, sharded, accumulate
  )
  if weights is not None:
    weights = _pooling.chunks(weights.astype(accumulate), policy.chunk_size)
  plan = _pooled_parallel.plan_for(table, ids, rules.rows_sharding, ragged)
  if plan is None:
    ops, table = _pooling, table.reshape(num_rows, -1)
  else:
    policy, ops = dataclasses.replace(policy, parallel=plan), _pooled_parallel
  if policy.mode == "max":
    pooled = ops.pooled_max(policy, table, m)
  else:
    pooled = ops.pooled_sum(policy, table, weights, m)
  pooled = _pooling.finish(pooled, count, bad, policy, table.dtype)
  return pooled.reshape(num_bags, *embedding)
