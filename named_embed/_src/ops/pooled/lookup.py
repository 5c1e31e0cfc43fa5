"""`pooled_lookup` and `EmbeddingBag`: one pooled vector per bag of ids.

torch's ``nn.EmbeddingBag`` by axis name, without the ``[bags, members,
embedding]`` rows of a take-then-reduce: the kernel (`reductions`) gathers
and reduces one chunk of members at a time, forwards and backwards.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
from penzai import pz

from named_embed._src.base import named_arrays, validation
from named_embed._src.ops.pooled import bag_inputs, reductions
from named_embed._src.ops.pooled import kernel as pool_kernel
from named_embed._src.rows import table_arrays
from named_embed._src.tables import contract


def pooled_lookup(
  table: contract.AbstractTable,
  tokens: pz.nx.NamedArrayBase | jax.typing.ArrayLike,
  *,
  over: str | None = None,
  offsets: jax.typing.ArrayLike | None = None,
  mode: str = "mean",
  weights: pz.nx.NamedArrayBase | jax.typing.ArrayLike | None = None,
  bag_axis: str = "bag",
  include_last_offset: bool = False,
  out_of_range: str = "fill",
  max_norm: float | None = None,
  norm_type: float = 2.0,
  scale_grad_by_freq: bool = False,
  chunk_size: int | None = None,
  dtype: jax.typing.DTypeLike | None = None,
) -> pz.nx.NamedArray:
  """Pools the rows of each bag of ids: torch's ``F.embedding_bag``, by name.

  Two forms. Fixed-size bags: ``tokens`` is an integer `NamedArray` and
  ``over`` names the axis holding each bag's members; ``{"batch": B,
  "member": L}`` gives ``{"batch": B, **embedding axes}``. Ragged bags (as
  in torch): ``tokens`` holds flat ids ``[N]`` and ``offsets`` where each
  bag starts; the result is ``{bag_axis: len(offsets), **embedding axes}``
  (``len(offsets) - 1`` with ``include_last_offset``).

  The member rows are never all in memory: the kernel reads and reduces
  one chunk of members at a time, forwards and backwards (at 64 bags of
  512 ids of 1024 floats, 1/30 of the temporary memory of
  ``jnp.take(...).sum(axis)``, and faster; see ``docs/performance.md``).

  Every kind of table pools: a plain `EmbeddingTable`, a `QuantizedTable`
  (int8 or int4: each chunk's rows are dequantised as they are read, the
  float table is never built), a `LoraTable` and a `TrainableRowsTable`.
  Values and gradients are those of the pooled lookup of the rows as the
  table reads them (its ``dequantized()`` or ``merged()`` float table):
  the gradient reaches what trains (a trainable plain table's rows, LoRA's
  ``A`` and ``B``, the trained rows), never a frozen base.

  Semantics (torch's, with its bugs fixed):

  - ``"sum"``, ``"mean"`` or ``"max"`` (per feature) of the kept members.
    The table's pad token row (`EmbeddingTable.padding_index`) is skipped
    everywhere: not summed, not counted in the mean, not a max candidate,
    no gradient. A bag with no kept member is zeros in every mode.
  - ``weights`` (``"sum"`` only) multiply each member's row; their
    gradient is ``<d bag, row>`` (the row after ``max_norm``).
  - ``"max"``: the gradient of each feature goes to the first member of
    the bag holding the maximum.
  - Sums are accumulated in float32 (bf16 tables too); the result has the
    table's dtype, or ``dtype``: each member's row is cast to it as it is
    read (as `named_embed.lookup` casts rows), then pooled.
  - Out-of-range ids follow ``out_of_range`` as in `named_embed.lookup`:
    under ``"fill"`` a bag holding one is NaN (as a NaN row makes a sum or
    a max NaN) and sends no gradient; ``"clip"`` and ``"wrap"`` read the
    mapped row (which may be the pad token row, then skipped).
  - Offsets must start at 0, be non-decreasing and not exceed ``N``
    (checked when concrete). Traced offsets (under `jax.jit`) are clamped
    to ``[0, N]`` and made non-decreasing by a running maximum: an offset
    below its predecessor gives an empty bag, and ids before the first
    offset belong to no bag. With ``include_last_offset``, the last offset
    ends the last bag; ids after it belong to no bag (not read, checked or
    counted).
  - On a table whose vocabulary axis is split over devices
    (`named_embed.shard`), each device pools the members whose rows it
    owns and one all-reduce of the ``[bags, embedding]`` result combines
    them; the table is never gathered.

  Args:
    table: The embedding table.
    tokens: Integer ids: a `NamedArray` with the axis ``over`` (fixed-size
      bags), or flat 1-D ids with ``offsets``.
    over: The named axis of ``tokens`` that holds each bag's members. It is
      reduced away; the other token axes are kept (positional ones first).
    offsets: Ragged bags: 1-D integer start of each bag in the flat ids.
    mode: ``"mean"`` (default, as torch), ``"sum"`` or ``"max"``.
    weights: Per-member weights (``"sum"`` only): a `NamedArray` with the
      tokens' axes, or an array of the tokens' (data) shape.
    bag_axis: Name of the bag axis of ragged results.
    include_last_offset: Ragged bags: ``offsets`` has one more entry, the
      end of the last bag.
    out_of_range: ``"fill"``, ``"clip"``, ``"wrap"`` or ``"error"``, as in
      `named_embed.lookup` (see above for ``"fill"``).
    max_norm: If set, each member's row whose ``norm_type``-norm exceeds it
      is scaled by ``max_norm / (norm + 1e-7)`` before pooling; the
      gradient is as without the scaling; the table is not changed.
    norm_type: p of that p-norm, over all embedding axes.
    scale_grad_by_freq: Divide the gradient reaching each row by the number
      of times the row occurs among all the ids of the call (not with
      ``"max"``).
    chunk_size: Members read per step; None picks one that keeps a chunk's
      float32 rows near 4 MiB.
    dtype: Cast each member's row (never the whole table) to this floating
      dtype before pooling; the result has it. None: the table's dtype.

  Returns:
    A `NamedArray`: the bag axes (the token axes but ``over``, or
    ``bag_axis``) followed by the table's embedding axes.

  Raises:
    TypeError: for a ``table`` that is not a named_embed table (the message
      names what was given), non-integer ids or offsets, non-floating
      weights, a non-floating ``dtype``, fixed-size tokens that are not a
      `NamedArray`, or neither ``over`` nor ``offsets``.
    ValueError: for an unknown ``mode``, ``weights`` without ``"sum"``,
      ``scale_grad_by_freq`` with ``"max"``, an ``over`` that is not a
      token axis, axis names clashing with the table's, bad offsets, or
      both ``over`` and ``offsets``.
    IndexError: for out-of-range ids under ``"error"``.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[0, 0], [1, 2], [3, 4], [5, 6]], np.float32),
  ...     padding_index=0)
  >>> ids = pz.nx.wrap(np.array([[1, 2, 0], [0, 0, 0]])).tag("batch", "member")
  >>> out = ne.pooled_lookup(table, ids, over="member", mode="mean")
  >>> out.named_shape, out.untag("batch", "embedding").unwrap().tolist()
  ({'batch': 2, 'embedding': 2}, [[2.0, 3.0], [0.0, 0.0]])
  >>> flat, starts = np.array([3, 1, 2, 2]), np.array([0, 1, 1])
  >>> out = ne.pooled_lookup(table, flat, offsets=starts, mode="sum")
  >>> out.named_shape, out.untag("bag", "embedding").unwrap().tolist()
  ({'bag': 3, 'embedding': 2}, [[5.0, 6.0], [0.0, 0.0], [7.0, 10.0]])
  """
  contract.check_table(table, "ne.pooled_lookup")
  options = bag_inputs.options(
    mode,
    out_of_range,
    max_norm,
    norm_type,
    scale_grad_by_freq,
    chunk_size,
    dtype,
  )
  if over is None and offsets is None:
    raise TypeError(
      "named_embed.pooled_lookup needs `over=` (the named axis of"
      " fixed-size bags) or `offsets=` (where each ragged bag starts in"
      " flat ids)."
    )
  if over is not None and offsets is not None:
    raise ValueError(
      "named_embed.pooled_lookup takes `over=` (fixed-size bags) or"
      f" `offsets=` (ragged bags), not both; got over={over!r}."
    )
  if offsets is None:
    if validation.check_bool("include_last_offset", include_last_offset):
      raise ValueError(
        "`include_last_offset` applies to ragged bags (with `offsets=`);"
        f" fixed-size bags along over={over!r} have no offsets."
      )
    bags = _fixed(tokens, over, weights, options, "pooled_lookup")
  else:
    bag_inputs.check_axis_name("bag_axis", bag_axis)
    validation.check_bool("include_last_offset", include_last_offset)
    bag_inputs.check_weights_mode(weights, options.mode)
    bags = bag_inputs.ragged_bags(
      tokens, offsets, weights, include_last_offset, bag_axis, "pooled_lookup"
    )
  return _pooled(table, bags, options, "pooled_lookup")


def _fixed(tokens, over, weights, options: bag_inputs.PoolOptions, caller: str):
  bag_inputs.check_axis_name("over", over)
  bag_inputs.check_weights_mode(weights, options.mode)
  return bag_inputs.fixed_bags(tokens, over, weights, caller)


def _pooled(
  table: Any,
  bags: bag_inputs.Bags,
  options: bag_inputs.PoolOptions,
  caller: str,
) -> pz.nx.NamedArray:
  """Runs the cached kernel of ``bags``' static configuration on any kind
  of table (its row source: ``table.row_parts()``).

  The hot path of every eager call: it reads the table's parts, builds the
  plan's cache key from static facts, and calls the cached kernel.
  """
  source, facts, arrays = table.call_parts()
  bags, runtime_check = bag_inputs.admit_ids(
    bags, options.rows.out_of_range, facts.true_vocab_size or source.num_rows
  )
  plan = _plan(
    options,
    source,
    facts,
    bags.layout,
    tuple(bags.ids.shape),
    runtime_check,
    caller,
  )
  pooled = plan.kernel(arrays, bags.ids, bags.weights, bags.offsets)
  return named_arrays.wrap_named(pooled, plan.output_axes)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a pooled lookup call needs beyond its arrays, built once per
  static configuration: the jitted kernel and the output's axis names."""

  kernel: Any
  output_axes: collections.OrderedDict  # shared by results; never mutated


@functools.lru_cache(maxsize=1024)
def _plan(
  options: bag_inputs.PoolOptions,
  source: Any,
  facts: contract.StaticFacts,
  layout: tuple,
  ids_shape: tuple[int, ...],
  runtime_check: bool,
  caller: str,
) -> _Plan:
  """Checks what can be checked once (the bags' axes against the table's)
  and builds the kernel for one static configuration: every later call
  with the same configuration costs one cache lookup."""
  bags = bag_inputs.bag_layout(layout, ids_shape, caller)
  vocabulary_axis, embedding_axes = facts.vocabulary_axis, facts.embedding_axes
  true_vocab_size, padding_index = facts.true_vocab_size, facts.padding_index
  rows_sharding = facts.rows_sharding
  num_rows = source.num_rows
  table_arrays.check_bound_rows(true_vocab_size, num_rows)
  named_arrays.check_no_clash(
    f"named_embed.{caller}",
    bags.token_axes,
    (vocabulary_axis, *dict(embedding_axes)),
  )
  rows = dataclasses.replace(
    options.rows,
    padding_index=validation.resolve_padding_index(
      padding_index, true_vocab_size or num_rows
    ),
    frozen=not any(source.trainable),
    runtime_check=runtime_check,
    vocab_size=true_vocab_size,
    rows_sharding=rows_sharding,
  )
  if bags.member_dim is None:  # ragged: all ids are members of one "row"
    num_bags = bags.out_shape[0]
    members, bag_count = ids_shape[0], 1
  else:
    members, num_bags = ids_shape[bags.member_dim], None
    bag_count = max(1, math.prod(bags.out_shape))
  chunk = options.chunk_size or reductions.default_chunk_size(
    bag_count, members, math.prod(source.row_shape)
  )
  policy = reductions.PoolConfig(
    rows=rows,
    source=source,
    mode=options.mode,
    chunk_size=max(1, min(chunk, members)),
    num_bags=num_bags,
    include_last_offset=bags.include_last_offset,
  )
  kernel = pool_kernel.compile_pool(
    policy, bags.member_dim, bags.out_shape, f"named_embed.{caller}"
  )
  output_axes = collections.OrderedDict(
    (*bags.out_axes.items(), *embedding_axes)
  )
  return _Plan(kernel, output_axes)


@pz.pytree_dataclass
class EmbeddingBag(pz.nn.Layer):
  """Pools the looked-up rows of fixed-size bags: torch's ``nn.EmbeddingBag``.

  Bag-of-words classifiers, recommender features and mean-pooled sentence
  vectors all reduce the rows of a bag of ids to one vector. This layer
  does it by axis name: ``over`` names the token axis that holds each
  bag's members, and it is reduced away, so ``{"batch": 32, "member": 50}``
  ids become ``{"batch": 32, "embedding": 64}`` vectors, without the
  ``[32, 50, 64]`` member rows ever being in memory (see
  `named_embed.pooled_lookup` for the semantics of every option; ragged
  bags with offsets are the function's). The table is a field, as in
  `EmbeddingLookup`: pass the same table to an `EmbeddingDecode` to tie
  them (one parameter, whose gradient sums both uses). The table may be
  of any kind (plain, quantised, LoRA, trained rows; checked when the
  layer is built): a bag over a `LoraTable` trains its adapters.

  Per-member weights (``mode="sum"``) come as a side input: set
  ``weights_input_name`` and pass ``layer(tokens, **{name: weights})``, as
  penzai's attention masks do.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=100,
  ...     embedding_axes={"embedding": 8}, padding_index=0)
  >>> layer = ne.EmbeddingBag(table, over="member", mode="max")
  >>> ids = pz.nx.wrap(np.array([[5, 7, 0], [3, 0, 0]])).tag("batch", "member")
  >>> layer(ids).named_shape
  {'batch': 2, 'embedding': 8}
  >>> ne.EmbeddingBag(table.quantized("int8"), over="member")(ids).named_shape
  {'batch': 2, 'embedding': 8}

  Attributes:
    table: The embedding table (any kind).
    over: The token axis holding each bag's members.
    mode: ``"mean"`` (default), ``"sum"`` or ``"max"``.
    out_of_range: ``"fill"`` (default), ``"clip"``, ``"wrap"`` or
      ``"error"``; see `named_embed.pooled_lookup`.
    max_norm: Renorm bound for member rows, or None.
    norm_type: p of the renorm p-norm (default 2).
    scale_grad_by_freq: Divide each row's gradient by its count in the call
      (not with ``"max"``).
    weights_input_name: Name of the side input holding per-member weights
      (``"sum"`` only), or None for none.
    chunk_size: Members read per step, or None for the default.
    dtype: Dtype of the member rows and the result, or None for the
      table's.
  """

  table: contract.AbstractTable
  over: str = dataclasses.field(metadata={"pytree_node": False})
  mode: str = dataclasses.field(default="mean", metadata={"pytree_node": False})
  out_of_range: str = dataclasses.field(
    default="fill", metadata={"pytree_node": False}
  )
  max_norm: float | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  norm_type: float = dataclasses.field(
    default=2.0, metadata={"pytree_node": False}
  )
  scale_grad_by_freq: bool = dataclasses.field(
    default=False, metadata={"pytree_node": False}
  )
  weights_input_name: str | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  chunk_size: int | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  dtype: Any = dataclasses.field(default=None, metadata={"pytree_node": False})

  def __post_init__(self):
    contract.check_table(self.table, "EmbeddingBag")
    options = self.options  # validates
    bag_inputs.check_axis_name("over", self.over)
    if self.weights_input_name is not None:
      bag_inputs.check_axis_name("weights_input_name", self.weights_input_name)
      bag_inputs.check_weights_mode(True, options.mode)

  @property
  def options(self) -> bag_inputs.PoolOptions:
    """The validated options (cached per distinct combination)."""
    return bag_inputs.options(
      self.mode,
      self.out_of_range,
      self.max_norm,
      self.norm_type,
      self.scale_grad_by_freq,
      self.chunk_size,
      self.dtype,
    )

  def __call__(
    self, tokens: pz.nx.NamedArrayBase, /, **side_inputs
  ) -> pz.nx.NamedArray:
    """Pools ``tokens`` over ``over``.

    Args:
      tokens: Integer ids, a `NamedArray` with the axis ``over``.
      **side_inputs: Ignored, except the weights named by
        ``weights_input_name``.

    Returns:
      The token axes but ``over``, followed by the table's embedding axes.
    """
    weights = None
    name = self.weights_input_name
    if name is not None:
      if name not in side_inputs:
        raise TypeError(
          f"named_embed.EmbeddingBag reads per-member weights from the side"
          f" input {name!r} (weights_input_name), which the call lacks; got"
          f" side inputs {sorted(side_inputs)}."
        )
      weights = side_inputs[name]
    options = self.options
    bags = bag_inputs.fixed_bags(tokens, self.over, weights, "EmbeddingBag")
    return _pooled(self.table, bags, options, "EmbeddingBag")
