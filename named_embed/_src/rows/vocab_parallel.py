"""Vocabulary-parallel chunked cross-entropy with `jax.shard_map`.

Each device owns a contiguous range of table rows (the vocabulary axis is
sharded over one mesh axis). Forwards, every device runs the chunked
online log-sum-exp over *its own rows only* (`chunked_ce.local_stats`,
chunks never cross a shard boundary), then one ``pmax`` and one fused
``psum`` of three ``[tokens]`` vectors combine the statistics. Backwards,
every device recomputes its chunks and produces the gradient of its own
rows (which stays sharded) and a partial ``d hidden``, summed by one
all-reduce of ``[tokens, embedding]``. Collectives run outside the chunk
loops; the table is never gathered.

The custom_vjp sits *outside* the two shard_maps, so autodiff never
transposes a collective or a loop (no psum lands inside a while body).

Two ways to map the computation onto the mesh:

- Explicit mesh axes: the specs of the operands are part of their types;
  the shard_map is manual over every mesh axis with exactly those specs.
- Auto mesh axes: the table's `NamedSharding` (recorded by `ne.shard`)
  gives the mesh; the shard_map is manual over the vocabulary mesh axis
  only, and GSPMD keeps partitioning the token axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.sharding import PartitionSpec

from named_embed._src.base import mesh_layout, norms
from named_embed._src.rows import chunked_ce


@dataclasses.dataclass(frozen=True)
class LossSplit:
  """How the loss maps onto the mesh (hashable: a custom_vjp static arg).

  Attributes:
    mesh: The (abstract or concrete) mesh.
    vocab_axis: Mesh axis (or axes) sharding the table's rows; None for a
      replicated table with the tokens split over Explicit axes (each
      device then reduces its table gradient over the token axes once).
    hidden_spec: Spec of ``hidden [N, E]``.
    table_spec: Spec of ``table [R, E]``.
    targets_spec: Spec of ``targets [N]``.
    token_axes: Mesh axes sharding the tokens, over which each device's
      table gradient is a partial sum (manual mode only).
    manual_axes: Mesh axes the shard_map is manual over (None: all).
  """

  mesh: object
  vocab_axis: str | tuple[str, ...] | None
  hidden_spec: PartitionSpec
  table_spec: PartitionSpec
  targets_spec: PartitionSpec
  token_axes: tuple[str, ...] = ()
  manual_axes: frozenset | None = None


def _shard_map(body, plan: LossSplit, in_specs, out_specs):
  kwargs = {}
  if plan.manual_axes is not None:
    kwargs["axis_names"] = plan.manual_axes
  # check_vma=False: the bodies are never differentiated (the custom_vjp
  # is outside), and their collectives are written out explicitly.
  return jax.shard_map(
    body,
    mesh=plan.mesh,
    in_specs=in_specs,
    out_specs=out_specs,
    check_vma=False,
    **kwargs,
  )


def _offset(plan: LossSplit, local_rows: int):
  if plan.vocab_axis is None:  # replicated table, tokens split: data parallel
    return 0
  return lax.axis_index(plan.vocab_axis) * local_rows


def _array_specs(plan: LossSplit, source, arrays) -> tuple:
  """Specs of a row source's arrays: row-aligned ones split like the
  table's rows, the others (``B``, trained rows) replicated."""
  vocab = plan.table_spec[0]
  return tuple(
    PartitionSpec(vocab, *([None] * (a.ndim - 1)))
    if aligned
    else PartitionSpec(*([None] * a.ndim))
    for a, aligned in zip(arrays, source.row_aligned)
  )


def vocab_parallel_logits(hidden, arrays, source, plan: LossSplit):
  """``[N, V]`` logits of a compressed or adapted table whose rows are split
  over ``plan.vocab_axis``: each device makes the logits of its own rows
  (`named_embed._src.rows.row_source.RowSource.logits`, one chunk at a time for a
  quantised table) and the result stays split over the vocabulary. Unlike
  the loss, this map is differentiated by JAX (checked replication), so
  LoRA's ``B`` and trained rows get their summed gradients."""

  def body(h, w):
    if plan.vocab_axis is not None:
      # Each device's logits depend on all of ``h``: mark it as varying
      # over the vocabulary axis, whose transpose sums ``d h`` over it.
      h = lax.pcast(h, plan.vocab_axis, to="varying")
    return source.logits(w, h, _offset(plan, source.first_aligned(w).shape[0]))

  kwargs = {}
  if plan.manual_axes is not None:
    kwargs["axis_names"] = plan.manual_axes
  specs = (plan.hidden_spec, _array_specs(plan, source, arrays))
  out_spec = PartitionSpec(plan.hidden_spec[0], plan.vocab_axis)
  return jax.shard_map(
    body, mesh=plan.mesh, in_specs=specs, out_specs=out_spec, **kwargs
  )(hidden, arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def vocab_parallel_cross_entropy(
  hidden, arrays, targets, config, plan: LossSplit, source
):
  """Per-position loss ``[N]`` of a table given as its row source and
  arrays (`named_embed._src.rows.row_source`), ``targets`` already in ``[0, V)``:
  each device reads its own rows through the source's loss reader;
  gradients of row-aligned arrays (a plain table's rows, LoRA's ``A``)
  stay split, those of the others (``B``, trained rows) are summed over
  the devices once, after the chunk loop."""
  return _forward(hidden, arrays, targets, config, plan, source)[0]


def _forward(hidden, arrays, targets, config, plan, source):
  acc = norms.accumulation_dtype(hidden.dtype)

  def body(h, w, t):
    offset = _offset(plan, source.first_aligned(w).shape[0])
    reader = source.loss_reader(w, h.astype(acc), offset)
    stats = chunked_ce.local_stats(reader, t, offset, config)
    lse, target_logit, total = chunked_ce.combine_stats(stats, plan.vocab_axis)
    loss = chunked_ce.position_loss(lse, target_logit, total, config)
    return loss, lse

  specs = (plan.hidden_spec, _array_specs(plan, source, arrays))
  token = plan.targets_spec
  loss, lse = _shard_map(body, plan, (*specs, token), (token, token))(
    hidden, arrays, targets
  )
  return loss, (hidden, arrays, targets, lse)


def _bwd(config, plan, source, residuals, g):
  hidden, arrays, targets, lse = residuals
  acc = lse.dtype
  trained = [i for i, t in enumerate(source.trainable) if t]
  array_specs = _array_specs(plan, source, arrays)

  def body(h, w, t, lse, g):
    offset = _offset(plan, source.first_aligned(w).shape[0])
    reader = source.loss_reader(w, h.astype(acc), offset)
    d_hidden, d_arrays = chunked_ce.local_grads(
      reader, t, lse, g.astype(acc), offset, config
    )
    if plan.vocab_axis is not None:
      d_hidden = lax.psum(d_hidden, plan.vocab_axis)
    grads = []
    for i in trained:
      axes = plan.token_axes
      if not source.row_aligned[i] and plan.vocab_axis is not None:
        axes = (*mesh_layout.mesh_axes(plan.vocab_axis), *axes)
      grads.append(lax.psum(d_arrays[i], axes) if axes else d_arrays[i])
    return d_hidden.astype(h.dtype), tuple(grads)

  token = plan.targets_spec
  specs = (plan.hidden_spec, array_specs, token, token, token)
  out_specs = (plan.hidden_spec, tuple(array_specs[i] for i in trained))
  d_hidden, grads = _shard_map(body, plan, specs, out_specs)(
    hidden, arrays, targets, lse, g
  )
  d_arrays = [None] * len(arrays)
  for i, grad in zip(trained, grads):
    d_arrays[i] = grad
  return d_hidden, tuple(d_arrays), None


vocab_parallel_cross_entropy.defvjp(_forward, _bwd)


def split_for(hidden, table, targets, table_sharding) -> LossSplit | None:
  """A `LossSplit` if the table's rows are sharded over a mesh axis.

  Reads Explicit shardings from the operands' types; otherwise uses
  ``table_sharding`` (a `NamedSharding` recorded on the table by
  ``ne.shard``), or returns None (one device, or a replicated table).

  Raises:
    NotImplementedError: if an embedding dimension is sharded too.
  """
  table_spec = mesh_layout.explicit_spec(table)
  if table_spec is not None:
    hidden_spec = mesh_layout.explicit_spec(hidden) or PartitionSpec(None, None)
    targets_spec = mesh_layout.explicit_spec(targets) or PartitionSpec(None)
    if table_spec[0] is None and targets_spec[0] is None:
      return None  # nothing split: the one-device kernel
    _check_embedding_unsharded(hidden_spec, table_spec)
    shared = set(mesh_layout.mesh_axes(table_spec[0])) & set(
      mesh_layout.mesh_axes(targets_spec[0])
    )
    if shared:
      raise NotImplementedError(
        "named_embed.decode_cross_entropy: the vocabulary and the tokens are"
        f" both split over mesh axes {sorted(shared)} (table spec"
        f" {table_spec}, targets spec {targets_spec}). Split them over"
        " different mesh axes."
      )
    hidden_spec = PartitionSpec(targets_spec[0], *tuple(hidden_spec)[1:])
    mesh = jax.typeof(table).sharding.mesh
    return LossSplit(
      mesh=mesh,
      vocab_axis=table_spec[0],
      hidden_spec=PartitionSpec(*hidden_spec),
      table_spec=PartitionSpec(*table_spec),
      targets_spec=PartitionSpec(targets_spec[0]),
      token_axes=mesh_layout.mesh_axes(targets_spec[0]),
    )
  if table_sharding is None:
    return None
  spec = tuple(table_sharding.spec) + (None,) * table.ndim
  if spec[0] is None:
    return None
  _check_embedding_unsharded(PartitionSpec(None, None), spec[: table.ndim])
  vocab_axes = mesh_layout.mesh_axes(spec[0])
  mesh = table_sharding.mesh
  # Split the tokens over every other mesh axis, so the table gradient is
  # reduced over them once, after the chunk loop (with GSPMD partitioning
  # the loop body, that reduction would run once per chunk).
  token_axes = tuple(
    a for a in mesh.axis_names if a not in vocab_axes and mesh.shape[a] > 1
  )
  token_devices = math.prod(mesh.shape[a] for a in token_axes)
  if hidden.shape[0] % token_devices:
    return LossSplit(
      mesh=mesh,
      vocab_axis=spec[0],
      hidden_spec=PartitionSpec(),
      table_spec=PartitionSpec(spec[0]),
      targets_spec=PartitionSpec(),
      manual_axes=frozenset(vocab_axes),
    )
  token_entry = (token_axes[0] if len(token_axes) == 1 else token_axes) or None
  return LossSplit(
    mesh=mesh,
    vocab_axis=spec[0],
    hidden_spec=PartitionSpec(token_entry, None),
    table_spec=PartitionSpec(spec[0], None),
    targets_spec=PartitionSpec(token_entry),
    token_axes=token_axes,
  )


def _check_embedding_unsharded(hidden_spec, table_spec) -> None:
  if any(entry is not None for entry in tuple(table_spec)[1:]) or (
    len(hidden_spec) > 1 and hidden_spec[-1] is not None
  ):
    raise NotImplementedError(
      "named_embed.decode_cross_entropy shards the vocabulary axis only;"
      f" got table spec {table_spec} and hidden spec {hidden_spec}. Keep the"
      " embedding axes unsharded (map them to None in the rules)."
    )
