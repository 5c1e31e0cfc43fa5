"""Pooled lookups split over devices, with `jax.shard_map`.

Vocabulary-parallel: each device owns a contiguous range of table rows
(its share of every *row-aligned* array of the table's row source; the
other arrays, such as LoRA's ``B`` or trained rows, are replicated). It
sees every member of its bags (the ids are replicated over the vocabulary
mesh axis), pools the members whose row it owns with the scan bodies of
`reductions`, and one all-reduce over the vocabulary axis combines the
partial results: a ``psum`` of the ``[bags, F]`` sums, or for ``"max"`` a
``pmax`` of the maxima and a ``pmin`` of the first member holding each (so
ties still go to the first member of the bag). The table is never
gathered. Fixed-size bags may be split over other mesh axes too.

A device reads the rows it owns with `owned_reader`: its shares of the
row-aligned arrays gathered at the local ids, and the source's
``rows_of`` of each member's one-row slice at the member's *global* id
(a source's ``gather`` takes ids into the arrays it is given, and some
sources, such as trained rows, read the id itself).

Under Explicit mesh axes every split computation comes here (the
one-device kernel's gathers would need output shardings at every step): a
replicated table with split bags (data parallel), and a table whose
embedding axis is split (gathered first, as FSDP does).

Backwards, each device pulls the row cotangent of its own members back to
the arrays (`reductions.pull_rows`): the gradient of its share of each
row-aligned array stays sharded (summed over the mesh axes that split the
bags); the gradients of the replicated arrays, and with weights theirs,
are summed by one ``psum``. As in `vocab_parallel`, the custom_vjp sits
outside the shard_maps, so autodiff never transposes a collective.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from named_embed._src.base import mesh_layout
from named_embed._src.ops.pooled import reductions


@dataclasses.dataclass(frozen=True)
class PoolSplit:
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

  def array_specs(self, source, arrays) -> tuple[PartitionSpec, ...]:
    """Specs of the source's arrays: row-aligned ones split over the
    vocabulary axis, the others replicated."""
    return tuple(
      PartitionSpec(self.vocab_axis, *([None] * (a.ndim - 1)))
      if aligned
      else PartitionSpec(*([None] * a.ndim))
      for a, aligned in zip(arrays, source.row_aligned)
    )

  def specs(self, ragged: bool):
    """Specs of chunked members ``[n, B, C]`` (or ``[n, C]``) and pooled
    rows ``[bags, F]``."""
    entry = None
    if self.bag_axes:
      entry = self.bag_axes[0] if len(self.bag_axes) == 1 else self.bag_axes
    members = PartitionSpec() if ragged else PartitionSpec(None, entry, None)
    return members, PartitionSpec(entry, None)


def _aligned(source, arrays) -> list:
  return [a for a, aligned in zip(arrays, source.row_aligned) if aligned]


def split_for(
  source, arrays, ids, rows_sharding, ragged: bool
) -> PoolSplit | None:
  """A `PoolSplit` when the computation is split over devices.

  With Explicit mesh axes (read from the operands' types): whenever the
  table's arrays or the ids are split (an embedding axis split too is
  gathered first, as FSDP does). With Auto axes (the table's recorded
  ``rows_sharding``): when the table's rows are split; GSPMD partitions
  the rest. None otherwise: the one-device kernel.

  Raises:
    NotImplementedError: if the bags and the vocabulary are split over the
      same mesh axis.
  """
  aligned = _aligned(source, arrays)
  rows = aligned[0] if aligned else None
  table_spec = None if rows is None else mesh_layout.explicit_spec(rows)
  explicit = [
    x for x in (*arrays, ids) if mesh_layout.explicit_spec(x) is not None
  ]
  if explicit:
    if not mesh_layout.spans_devices(*arrays, ids):
      return None
    mesh = jax.typeof(explicit[0]).sharding.mesh
    vocab = None if table_spec is None else table_spec[0]
  elif rows is not None and mesh_layout.splits(rows_sharding):
    mesh, vocab = rows_sharding.mesh, tuple(rows_sharding.spec)[0]
    if (
      vocab is None
      or math.prod(mesh.shape[a] for a in mesh_layout.mesh_axes(vocab)) <= 1
    ):
      return None
  else:
    return None
  vocab_axes = mesh_layout.mesh_axes(vocab)
  bag_axes = () if ragged else _bag_axes(ids, mesh, vocab_axes)
  shared = set(bag_axes) & set(vocab_axes)
  if shared:
    raise NotImplementedError(
      "named_embed.pooled_lookup: the vocabulary and the bags are both"
      f" split over mesh axes {sorted(shared)}. Split them over different"
      " mesh axes."
    )
  return PoolSplit(mesh, vocab, bag_axes)


def _bag_axes(ids, mesh, vocab_axes) -> tuple[str, ...]:
  """Mesh axes splitting the bags: the ids' own (Explicit axes), or every
  other mesh axis when they divide the number of bags (Auto axes)."""
  spec = mesh_layout.explicit_spec(ids)
  if spec is not None:
    return mesh_layout.mesh_axes(spec[0])
  axes = tuple(
    a for a in mesh.axis_names if a not in vocab_axes and mesh.shape[a] > 1
  )
  if ids.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def _shard_map(body, plan: PoolSplit, in_specs, out_specs):
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
      *(_fit_tree(arg, spec, plan.mesh) for arg, spec in zip(args, in_specs))
    )

  return call


def _fit_tree(arg, spec, mesh):
  """`_fit` of every array of ``arg`` to its spec in ``spec`` (a spec, a
  tuple of specs, or None for an absent argument)."""

  def fit(s, sub):
    if s is None:
      return sub
    return jax.tree.map(lambda x: _fit(x, s, mesh), sub)

  return jax.tree.map(
    fit,
    spec,
    arg,
    is_leaf=lambda s: s is None or isinstance(s, PartitionSpec),
  )


def _fit(x, spec: PartitionSpec, mesh):
  """``x`` resharded to ``spec`` on a mesh with Explicit axes, unless it
  is laid out so already (under Auto axes the shard_map reshards)."""
  if AxisType.Explicit not in mesh.axis_types:
    return x
  want = PartitionSpec(*spec, *([None] * (x.ndim - len(spec))))
  if mesh_layout.explicit_spec(x) == want:
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, want))


def _fit_arrays(policy, arrays) -> tuple:
  """The table's arrays laid out as the shard_maps take them (Explicit
  axes; under Auto axes the shard_map reshards)."""
  plan = policy.parallel
  specs = plan.array_specs(policy.source, arrays)
  return tuple(_fit(a, s, plan.mesh) for a, s in zip(arrays, specs))


def owned_reader(source, start, local_rows: int) -> reductions.RowReader:
  """The `reductions.RowReader` of the rows a device owns, global ids
  ``[start, start + local_rows)``, from its shares of the arrays.

  Each member's row is the source's ``rows_of`` of its one-row slice of
  the row-aligned arrays (gathered at the local id) and the replicated
  arrays, at its global id. Ids of rows the device does not own read its
  first row (their members are not kept).
  """
  features = math.prod(source.row_shape)
  aligned = source.row_aligned

  def read(arrays, ids):
    owned = (ids >= start) & (ids < start + local_rows)
    local = jnp.where(owned, ids - start, jnp.zeros_like(ids)).reshape(-1)
    first = jnp.where(owned, ids, jnp.full_like(ids, start)).reshape(-1)
    parts = tuple(
      a.at[local[:, None]].get(
        mode="promise_in_bounds", wrap_negative_indices=False
      )
      if is_aligned
      else a
      for a, is_aligned in zip(arrays, aligned)
    )  # row-aligned parts: [n, 1, ...], one-row slices
    in_axes = (tuple(0 if is_aligned else None for is_aligned in aligned), 0)
    rows = jax.vmap(source.rows_of, in_axes=in_axes)(parts, first)
    return rows.reshape(*ids.shape, features)

  return read


def _local(policy, arrays, m: reductions.Members):
  """The reader of this device's rows, and ``m`` keeping only the members
  whose rows they are."""
  vocab_axis = policy.parallel.vocab_axis
  source = policy.source
  if vocab_axis is None:  # the whole table on every device
    return functools.partial(reductions.gathered, source), m
  local_rows = _aligned(source, arrays)[0].shape[0]
  start = lax.axis_index(vocab_axis) * local_rows
  owned = (m.ids >= start) & (m.ids < start + local_rows)
  read = owned_reader(source, start, local_rows)
  return read, m._replace(keep=m.keep & owned)


def _over_vocab(reduce, x, policy):
  """``reduce`` (a collective) over the vocabulary mesh axis, if split."""
  axis = policy.parallel.vocab_axis
  return x if axis is None else reduce(x, axis)


def _trained(policy, values) -> tuple:
  """The entries of ``values`` (one per array) whose array trains."""
  return tuple(v for v, t in zip(values, policy.source.trainable) if t)


def _untrained_as_none(policy, trained) -> tuple:
  """The inverse of `_trained`: None for the arrays that do not train."""
  given = iter(trained)
  return tuple(next(given) if t else None for t in policy.source.trainable)


def _combine_grads(policy, grads) -> tuple:
  """A device's gradients of the trainable arrays, combined over the mesh:
  replicated arrays summed over every mesh axis that splits the members
  (vocabulary and bags), shares of row-aligned ones over the bag axes."""
  plan = policy.parallel
  out = []
  for grad, aligned, trains in zip(
    grads, policy.source.row_aligned, policy.source.trainable
  ):
    if not trains:
      continue
    if not aligned:
      grad = _over_vocab(lax.psum, grad, policy)
    if plan.bag_axes:
      grad = lax.psum(grad, plan.bag_axes)
    out.append(grad)
  return tuple(out)


def _specs(policy, arrays, weights):
  plan = policy.parallel
  member_spec, out_spec = plan.specs(policy.num_bags is not None)
  array_specs = plan.array_specs(policy.source, arrays)
  weights_spec = None if weights is None else member_spec
  return plan, array_specs, member_spec, out_spec, weights_spec


# ------------------------------------------------------------ sum and mean


def pooled_sum(policy, arrays, weights, m):
  """`reductions.pooled_sum` on a split computation."""
  return _pooled_sum(policy, _fit_arrays(policy, arrays), weights, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled_sum(policy, arrays, weights, m):
  plan, array_specs, member_spec, out_spec, w_spec = _specs(
    policy, arrays, weights
  )

  def body(arrays, weights, m):
    read, local = _local(policy, arrays, m)
    total = reductions.sum_forward(policy, read, arrays, weights, local)
    return _over_vocab(lax.psum, total, policy)

  in_specs = (array_specs, w_spec, member_spec)
  return _shard_map(body, plan, in_specs, out_spec)(arrays, weights, m)


def _sum_fwd(policy, arrays, weights, m):
  return _pooled_sum(policy, arrays, weights, m), (arrays, weights, m)


def _sum_bwd(policy, residuals, g):
  arrays, weights, m = residuals
  if weights is None and not any(policy.source.trainable):
    return _untrained_as_none(policy, ()), None, None
  plan, array_specs, member_spec, out_spec, w_spec = _specs(
    policy, arrays, weights
  )

  def body(arrays, weights, m, g):
    read, local = _local(policy, arrays, m)
    grads, d_weights = reductions.sum_backward(
      policy, read, arrays, weights, local, g
    )
    if d_weights is not None:
      d_weights = _over_vocab(lax.psum, d_weights, policy)
    return _combine_grads(policy, grads), d_weights

  in_specs = (array_specs, w_spec, member_spec, out_spec)
  out_specs = (_trained(policy, array_specs), w_spec)
  trained, d_weights = _shard_map(body, plan, in_specs, out_specs)(
    arrays, weights, m, g
  )
  return _untrained_as_none(policy, trained), d_weights, None


_pooled_sum.defvjp(_sum_fwd, _sum_bwd)


# ------------------------------------------------------------ max


def _max_forward(policy, arrays, m):
  plan, array_specs, member_spec, out_spec, _ = _specs(policy, arrays, None)
  none = jnp.iinfo(jnp.int32).max

  def body(arrays, m):
    read, local = _local(policy, arrays, m)
    best, arg = reductions.max_and_argmax(policy, read, arrays, local)
    top = _over_vocab(lax.pmax, best, policy)
    holds = (best == top) & (arg >= 0)
    first = jnp.where(holds, arg, jnp.full((), none, arg.dtype))
    first = _over_vocab(lax.pmin, first, policy)
    return top, jnp.where(first == none, jnp.full((), -1, arg.dtype), first)

  in_specs = (array_specs, member_spec)
  return _shard_map(body, plan, in_specs, (out_spec, out_spec))(arrays, m)


def pooled_max(policy, arrays, m):
  """`reductions.pooled_max` on a split computation."""
  return _pooled_max(policy, _fit_arrays(policy, arrays), m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled_max(policy, arrays, m):
  return _max_forward(policy, arrays, m)[0]


def _max_fwd(policy, arrays, m):
  best, arg = _max_forward(policy, arrays, m)
  return best, (arrays, m, arg)


def _max_bwd(policy, residuals, g):
  arrays, m, arg = residuals
  if not any(policy.source.trainable):
    return _untrained_as_none(policy, ()), None
  plan, array_specs, member_spec, out_spec, _ = _specs(policy, arrays, None)

  def body(arrays, m, arg, g):
    read, local = _local(policy, arrays, m)
    grads = reductions.max_backward(policy, read, arrays, local, arg, g)
    return _combine_grads(policy, grads)

  in_specs = (array_specs, member_spec, out_spec, out_spec)
  out_specs = _trained(policy, array_specs)
  trained = _shard_map(body, plan, in_specs, out_specs)(arrays, m, arg, g)
  return _untrained_as_none(policy, trained), None


_pooled_max.defvjp(_max_fwd, _max_bwd)
