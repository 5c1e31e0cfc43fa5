"""Pooled lookups split over devices, with `jax.shard_map`.

Vocabulary-parallel: each device owns a contiguous range of table rows. It
sees every member of its bags (the ids are replicated over the vocabulary
mesh axis), pools the members whose row it owns with the one-device kernel
of `_pooling`, and one all-reduce over the vocabulary axis combines the
partial results: a ``psum`` of the ``[bags, F]`` sums, or for ``"max"`` a
``pmax`` of the maxima and a ``pmin`` of the first member holding each (so
ties still go to the first member of the bag). The table is never
gathered. Fixed-size bags may be split over other mesh axes too.

Under Explicit mesh axes every split computation comes here (the
one-device kernel's gathers would need output shardings at every step): a
replicated table with split bags (data parallel), and a table whose
embedding axis is split (gathered first, as FSDP does).

Backwards, each device writes the gradient of its own rows, which stays
sharded (summed over the mesh axes that split the bags), and with weights
its members' share of the weights' gradient, summed by one ``psum``. As in
`_vocab_parallel`, the custom_vjp sits outside the shard_maps, so autodiff
never transposes a collective.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from named_embed import _layout, _pooling


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
  """How a pooled lookup maps onto the mesh (hashable: a static argument).

  Attributes:
    mesh: The (abstract or concrete) mesh; the shard_maps are manual over
      all its axes.
    vocab_axis: Mesh axis (or axes) splitting the table's rows, or None
      (a replicated table, with the bags split).
    bag_axes: Mesh axes splitting the bags of fixed-size bags (each device
      pools its own bags); empty for ragged bags, which every device pools
      whole.
  """

  mesh: object
  vocab_axis: str | tuple[str, ...] | None
  bag_axes: tuple[str, ...] = ()

  def specs(self, ragged: bool, table_ndim: int):
    """Specs of the table ``[R, *embedding]``, chunked members ``[n, B,
    C]`` (or ``[n, C]``) and pooled rows ``[bags, F]``."""
    entry = None
    if self.bag_axes:
      entry = self.bag_axes[0] if len(self.bag_axes) == 1 else self.bag_axes
    table = PartitionSpec(self.vocab_axis, *([None] * (table_ndim - 1)))
    members = PartitionSpec() if ragged else PartitionSpec(None, entry, None)
    return table, members, PartitionSpec(entry, None)


def plan_for(table, ids, rows_sharding, ragged: bool) -> ParallelPlan | None:
  """A `ParallelPlan` when the computation is split over devices.

  With Explicit mesh axes (read from the operands' types): whenever the
  table or the ids are split (an embedding axis split too is gathered
  first, as FSDP does). With Auto axes (the table's recorded
  ``rows_sharding``): when the table's rows are split; GSPMD partitions
  the rest. None otherwise: the one-device kernel.

  Raises:
    NotImplementedError: if the bags and the vocabulary are split over the
      same mesh axis.
  """
  table_spec, ids_spec = (
    _layout.explicit_spec(table),
    _layout.explicit_spec(ids),
  )
  if table_spec is not None or ids_spec is not None:
    if not _layout.spans_devices(table, ids):
      return None
    mesh = jax.typeof(table if table_spec is not None else ids).sharding.mesh
    vocab = None if table_spec is None else table_spec[0]
  elif rows_sharding is not None and _layout.splits(rows_sharding):
    mesh, vocab = rows_sharding.mesh, tuple(rows_sharding.spec)[0]
    if (
      vocab is None
      or math.prod(mesh.shape[a] for a in _layout.mesh_axes(vocab)) <= 1
    ):
      return None
  else:
    return None
  vocab_axes = _layout.mesh_axes(vocab)
  bag_axes = () if ragged else _bag_axes(ids, mesh, vocab_axes)
  shared = set(bag_axes) & set(vocab_axes)
  if shared:
    raise NotImplementedError(
      "named_embed.pooled_lookup: the vocabulary and the bags are both"
      f" split over mesh axes {sorted(shared)}. Split them over different"
      " mesh axes."
    )
  return ParallelPlan(mesh, vocab, bag_axes)


def _bag_axes(ids, mesh, vocab_axes) -> tuple[str, ...]:
  """Mesh axes splitting the bags: the ids' own (Explicit axes), or every
  other mesh axis when they divide the number of bags (Auto axes)."""
  spec = _layout.explicit_spec(ids)
  if spec is not None:
    return _layout.mesh_axes(spec[0])
  axes = tuple(
    a for a in mesh.axis_names if a not in vocab_axes and mesh.shape[a] > 1
  )
  if ids.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def _shard_map(body, plan: ParallelPlan, in_specs, out_specs):
  """`jax.shard_map` manual over every mesh axis. Under Explicit axes, the
  operands are first resharded to ``in_specs`` where they differ."""
  # check_vma=False: the bodies are never differentiated (the custom_vjp
  # is outside), and their collectives are written out explicitly.
  mapped = jax.shard_map(
    body,
    mesh=plan.mesh,
    in_specs=in_specs,
    out_specs=out_specs,
    check_vma=False,
  )

  def call(*args):
    return mapped(
      *(
        jax.tree.map(lambda x, spec=spec: _fit(x, spec, plan.mesh), arg)
        for arg, spec in zip(args, in_specs)
      )
    )

  return call


def _fit(x, spec: PartitionSpec, mesh):
  """``x`` resharded to ``spec`` on a mesh with Explicit axes, unless it
  is laid out so already (under Auto axes the shard_map reshards)."""
  if AxisType.Explicit not in mesh.axis_types:
    return x
  want = PartitionSpec(*spec, *([None] * (x.ndim - len(spec))))
  if _layout.explicit_spec(x) == want:
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, want))


def _local(policy, table, m: _pooling.Members):
  """The local rows ``[R / M, F]``, and ``m`` restricted to them (in local
  row ids)."""
  local_rows = table.shape[0]
  flat = table.reshape(local_rows, -1)
  vocab_axis = policy.parallel.vocab_axis
  if vocab_axis is None:
    return flat, m
  start = lax.axis_index(vocab_axis) * local_rows
  shifted = m.ids - start
  owned = (shifted >= 0) & (shifted < local_rows)
  ids = jnp.where(owned, shifted, jnp.zeros_like(shifted))
  return flat, m._replace(ids=ids, keep=m.keep & owned)


def _over_vocab(reduce, x, policy):
  """``reduce`` (a collective) over the vocabulary mesh axis, if split."""
  axis = policy.parallel.vocab_axis
  return x if axis is None else reduce(x, axis)


def _specs(policy, table, weights):
  plan = policy.parallel
  table_spec, members, out = plan.specs(policy.num_bags is not None, table.ndim)
  weights = None if weights is None else members
  return plan, table_spec, members, out, weights


def pooled_sum(policy, table, weights, m):
  """`_pooling.pooled_sum` on a split computation (``table`` is ``[R,
  *embedding]``)."""
  table_spec = _specs(policy, table, None)[1]
  table = _fit(table, table_spec, policy.parallel.mesh)
  return _pooled_sum(policy, table, weights, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled_sum(policy, table, weights, m):
  plan, table_spec, member_spec, out_spec, w_spec = _specs(
    policy, table, weights
  )

  def body(table, weights, m):
    flat, local = _local(policy, table, m)
    total = _pooling.sum_forward(policy, flat, weights, local)
    return _over_vocab(lax.psum, total, policy)

  return _shard_map(body, plan, (table_spec, w_spec, member_spec), out_spec)(
    table, weights, m
  )


def _sum_fwd(policy, table, weights, m):
  return _pooled_sum(policy, table, weights, m), (table, weights, m)


def _sum_bwd(policy, residuals, g):
  table, weights, m = residuals
  plan, table_spec, member_spec, out_spec, w_spec = _specs(
    policy, table, weights
  )

  def body(table, weights, m, g):
    flat, local = _local(policy, table, m)
    d_table, d_weights = _pooling.sum_backward(policy, flat, weights, local, g)
    d_table = d_table.reshape(table.shape)
    if plan.bag_axes:
      d_table = lax.psum(d_table, plan.bag_axes)
    if d_weights is not None:
      d_weights = _over_vocab(lax.psum, d_weights, policy)
    return d_table, d_weights

  specs = (table_spec, w_spec, member_spec, out_spec)
  d_table, d_weights = _shard_map(body, plan, specs, (table_spec, w_spec))(
    table, weights, m, g
  )
  return d_table, d_weights, None


_pooled_sum.defvjp(_sum_fwd, _sum_bwd)


def _max_forward(policy, table, m):
  plan, table_spec, member_spec, out_spec, _ = _specs(policy, table, None)
  none = jnp.iinfo(jnp.int32).max

  def body(table, m):
    flat, local = _local(policy, table, m)
    best, arg = _pooling.max_and_argmax(policy, flat, local)
    top = _over_vocab(lax.pmax, best, policy)
    holds = (best == top) & (arg >= 0)
    first = jnp.where(holds, arg, jnp.full((), none, arg.dtype))
    first = _over_vocab(lax.pmin, first, policy)
    return top, jnp.where(first == none, jnp.full((), -1, arg.dtype), first)

  return _shard_map(
    body, plan, (table_spec, member_spec), (out_spec, out_spec)
  )(table, m)


def pooled_max(policy, table, m):
  """`_pooling.pooled_max` on a split computation."""
  table_spec = _specs(policy, table, None)[1]
  table = _fit(table, table_spec, policy.parallel.mesh)
  return _pooled_max(policy, table, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled_max(policy, table, m):
  return _max_forward(policy, table, m)[0]


def _max_fwd(policy, table, m):
  best, arg = _max_forward(policy, table, m)
  return best, (table, m, arg)


def _max_bwd(policy, residuals, g):
  table, m, arg = residuals
  plan, table_spec, member_spec, out_spec, _ = _specs(policy, table, None)

  def body(table, m, arg, g):
    flat, local = _local(policy, table, m)
    rows, found = _pooling.winner_rows(local.ids, arg)
    owned = _pooling.winner_rows(local.keep, arg)[0]
    d_table = _pooling.max_backward(flat, rows, found & owned, g)
    d_table = d_table.reshape(table.shape)
    if plan.bag_axes:
      d_table = lax.psum(d_table, plan.bag_axes)
    return d_table

  specs = (table_spec, member_spec, out_spec, out_spec)
  d_table = _shard_map(body, plan, specs, table_spec)(table, m, arg, g)
  return d_table, None


_pooled_max.defvjp(_max_fwd, _max_bwd)
