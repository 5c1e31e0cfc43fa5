"""The jitted kernel of a pooled lookup: layout, rules, reduction, finish.

One kernel per static configuration (`compile_pool`, cached by the caller's
per-call plan): the fixed-size layout is made ``[B, L]`` inside it (no
eager transpose), the table's arrays are prepared as every kernel reads
them (`named_embed._src.rows.row_source.prepare`), `reductions.members` applies the
lookup's rules to the ids, the reduction runs on one device (`reductions`)
or, when the computation is split over devices, vocabulary-parallel
(`parallel`), and `reductions.finish` gives empty bags zeros and
``"fill"`` bags NaN. The table is any kind's row source: nothing here
asks which.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from named_embed._src.base import mesh_layout
from named_embed._src.ops.pooled import parallel, reductions
from named_embed._src.rows import row_source


def compile_pool(
  policy: reductions.PoolConfig,
  member_dim: int | None,
  out_shape: tuple[int, ...],
  scope: str,
):
  """``(arrays, ids, weights, offsets) -> [*out_shape, *row_shape]``,
  jitted; ``arrays`` are the raw arrays of ``policy.source``.
  ``member_dim`` is the member axis of fixed-size ids (None for ragged
  ids)."""

  def pooled_lookup_kernel(arrays, ids, weights, offsets):
    with jax.named_scope(scope):
      if member_dim is not None:
        ids, weights = (members_last(x, member_dim) for x in (ids, weights))
      pooled = pool(arrays, ids, weights, offsets, policy)
      return pooled.reshape(*out_shape, *policy.source.row_shape)

  return jax.jit(pooled_lookup_kernel)


def members_last(x, member_dim: int):
  """``x`` with the member axis last and the others flattened: ``[B, L]``."""
  if x is None:
    return None
  x = jnp.moveaxis(x, member_dim, -1)
  return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def pool(arrays, ids, weights, offsets, policy: reductions.PoolConfig):
  """``[bags, F]`` pooled rows of the table ``policy.source`` reads from
  ``arrays``, in the rows' dtype."""
  rules = policy.rows
  ragged = policy.num_bags is not None
  num_bags = policy.num_bags if ragged else ids.shape[0]
  if num_bags == 0:
    return jnp.zeros((0, policy.features), policy.row_dtype)
  if ragged:  # every device pools whole bags
    ids, weights = reductions.replicated(ids), reductions.replicated(weights)
  arrays = tuple(arrays)
  sharded = mesh_layout.spans_devices(*arrays, ids) or mesh_layout.splits(
    rules.rows_sharding
  )
  arrays = row_source.prepare(policy.source, arrays, rules.rows_sharding)
  m, count, bad = reductions.members(ids, offsets, policy, sharded)
  if weights is not None:
    weights = weights.astype(policy.accumulation_dtype)
    weights = reductions.chunks(weights, policy.chunk_size)
  plan = parallel.split_for(
    policy.source, arrays, ids, rules.rows_sharding, ragged
  )
  ops = reductions
  if plan is not None:
    policy, ops = dataclasses.replace(policy, parallel=plan), parallel
  if policy.mode == "max":
    pooled = ops.pooled_max(policy, arrays, m)
  else:
    pooled = ops.pooled_sum(policy, arrays, weights, m)
  return reductions.finish(pooled, count, bad, policy)
