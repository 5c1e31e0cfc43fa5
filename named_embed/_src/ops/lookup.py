"""`EmbeddingLookup` and `lookup`: token ids to embedding vectors, by name."""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
from penzai import pz

from named_embed._src.base import named_arrays, range_policy, validation
from named_embed._src.rows import gather, row_source
from named_embed._src.tables import contract


def lookup(
  table: contract.AbstractTable,
  tokens: pz.nx.NamedArrayBase | jax.typing.ArrayLike,
  *,
  out_of_range: str = "fill",
  max_norm: float | None = None,
  norm_type: float = 2.0,
  scale_grad_by_freq: bool = False,
  dtype: jax.typing.DTypeLike | None = None,
  strategy: str = "gather",
) -> pz.nx.NamedArray:
  """Looks up token ids in ``table``; the functional form of `EmbeddingLookup`.

  Args:
    table: The embedding table.
    tokens: Integer ids: a `NamedArray` (named and/or positional axes) or a
      plain array (positional axes). Named token axes must not clash with
      the table's axis names.
    out_of_range: What an id outside ``[0, V)`` gives (negative ids are out
      of range too): ``"fill"`` a NaN row and no gradient; ``"clip"`` the
      nearest valid row (which gets the gradient); ``"wrap"`` row ``id % V``;
      ``"error"`` an `IndexError` naming the ids and their positions (at run
      time under `jax.jit`; a functionalised check under `checkify`; on a
      computation split over several devices, an error log on the
      ``named_embed`` logger and NaN rows, since raising in one device's
      callback would stall the others; see ``docs/sharding.md``).
    max_norm: If set, rows whose ``norm_type``-norm exceeds it are returned
      scaled by ``max_norm / (norm + 1e-7)``; the gradient is as without
      renorm, and the table is not changed (see
      `EmbeddingTable.renormalized`).
    norm_type: p of the p-norm over all embedding axes.
    scale_grad_by_freq: Divide the gradient reaching each row by the number
      of times the row occurs in ``tokens``.
    dtype: Cast the looked-up rows (never the whole table) to this dtype.
    strategy: ``"gather"`` (default) indexes the rows; ``"one_hot"``
      multiplies a one-hot ``[tokens, V]`` matrix with the table, which
      turns the backward scatter-add into a matmul. It costs
      ``2 * tokens * V * E`` FLOPs: on CPU gather was faster at every
      vocabulary size measured (256 to 32768 rows; see
      ``docs/performance.md``); one-hot is the usual choice for small
      vocabularies on TPU. Values are identical for finite tables (an
      ``inf`` or NaN entry turns that column into NaN for every token of
      the call, since ``0 * inf`` is NaN); gradients are equal up to the
      order of summation.

  Returns:
    A `NamedArray` with the token axes (positional ones first, unnamed)
    followed by the table's embedding axes.

  Raises:
    TypeError: for non-integer ids.
    ValueError: for clashing axis names or bad options.
    IndexError: for out-of-range ids under ``"error"``.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.arange(6.0, dtype=np.float32).reshape(3, 2))
  >>> out = ne.lookup(table, pz.nx.wrap(np.array([2, 0])).tag("seq"))
  >>> out.named_shape, out.untag("seq", "embedding").unwrap().tolist()
  ({'seq': 2, 'embedding': 2}, [[4.0, 5.0], [0.0, 1.0]])
  >>> out = ne.lookup(table, np.array([5, -1]))  # positional token axis
  >>> out.positional_shape, out.named_shape
  ((2,), {'embedding': 2})
  >>> out.data_array.tolist()  # out of range: NaN rows under "fill"
  [[nan, nan], [nan, nan]]
  """
  options = gather.lookup_config(
    out_of_range, max_norm, norm_type, scale_grad_by_freq, dtype, strategy
  )
  return _lookup(table, tokens, options, "lookup")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a lookup call needs beyond its arrays, built once per static
  configuration: the jitted kernel and the output's axis names."""

  kernel: Any
  output_axes: collections.OrderedDict  # shared by results; never mutated


@functools.lru_cache(maxsize=1024)
def _plan(
  options: gather.LookupConfig,
  source: row_source.RowSource,
  facts: contract.StaticFacts,
  token_axes: tuple[tuple[str, int], ...],
  runtime_check: bool,
  caller: str,
) -> _Plan:
  """Checks what can be checked once (axis names) and builds the kernel
  for one static configuration; every later call with the same
  configuration costs one cache lookup."""
  if token_axes:
    named_arrays.check_no_clash(
      f"named_embed.{caller}",
      [name for name, _ in token_axes],
      (facts.vocabulary_axis, *dict(facts.embedding_axes)),
    )
  vocab_size = facts.true_vocab_size or source.num_rows
  policy = dataclasses.replace(
    options,
    # A table bound after construction may hold a negative pad row.
    padding_index=validation.resolve_padding_index(
      facts.padding_index, vocab_size
    ),
    runtime_check=runtime_check,
    vocab_size=facts.true_vocab_size,
    rows_sharding=facts.rows_sharding,
  )
  return _Plan(
    kernel=gather.compile_gather(policy, f"named_embed.{caller}", source),
    output_axes=collections.OrderedDict((*token_axes, *facts.embedding_axes)),
  )


def _lookup(
  table: Any,
  tokens: Any,
  options: gather.LookupConfig,
  caller: str,
) -> pz.nx.NamedArray:
  """`lookup` with options already validated into a `LookupConfig`.

  The hot path of every eager call: it reads the table's row source,
  arrays and static facts (the table contract), and calls the kernel its
  cached plan holds.
  """
  if not isinstance(table, contract.AbstractTable):  # message built on error
    contract.check_table(table, f"named_embed.{caller}")
  source, facts, arrays = table.call_parts()
  ids, token_axes = named_arrays.split_tokens(tokens)
  ids, runtime_check = range_policy.admit_ids(
    ids, options.out_of_range, facts.true_vocab_size or source.num_rows
  )
  plan = _plan(
    options, source, facts, tuple(token_axes.items()), runtime_check, caller
  )
  return named_arrays.wrap_named(plan.kernel(arrays, ids), plan.output_axes)


@pz.pytree_dataclass
class EmbeddingLookup(pz.nn.Layer):
  """Looks up token ids in an `EmbeddingTable`, by axis name.

  The input is an integer `NamedArray` of token ids; the output keeps its
  axes and adds the table's embedding axes, so ``{"batch": 2, "seq": 8}``
  ids become ``{"batch": 2, "seq": 8, "embedding": 64}`` vectors. Positional
  input axes stay positional, in front. Everything torch's ``nn.Embedding``
  offers is here as explicit, documented options, applied functionally: the
  table is never mutated by a call, so the layer is safe under `jax.jit`,
  `jax.grad` and `pz.variable_jit`. Options are checked when the layer is
  built, so a typo fails at model construction, not mid-training.

  The padding row is the table's (`EmbeddingTable.padding_index`): it is
  returned as stored and receives no gradient from this layer (a tied
  `EmbeddingDecode` still trains it, as in torch).

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=100,
  ...     embedding_axes={"embedding": 8}, padding_index=0)
  >>> layer = ne.EmbeddingLookup(table, out_of_range="clip", max_norm=1.0)
  >>> ids = pz.nx.wrap(np.array([[1, 2, 0], [3, 0, 0]])).tag("batch", "seq")
  >>> layer(ids).named_shape
  {'batch': 2, 'seq': 3, 'embedding': 8}

  Attributes:
    table: The embedding table (share it with an `EmbeddingDecode` to tie).
    out_of_range: ``"fill"`` (default), ``"clip"``, ``"wrap"`` or ``"error"``;
      see `named_embed.lookup`.
    max_norm: Renorm bound for looked-up rows, or None.
    norm_type: p of the renorm p-norm (default 2).
    scale_grad_by_freq: Divide each row's gradient by its count in the call.
    dtype: Compute dtype for the returned rows, or None for the table's.
    strategy: ``"gather"`` (default) or ``"one_hot"``; see
      `named_embed.lookup`.
  """

  table: contract.AbstractTable
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
  dtype: Any = dataclasses.field(default=None, metadata={"pytree_node": False})
  strategy: str = dataclasses.field(
    default="gather", metadata={"pytree_node": False}
  )

  def __post_init__(self):
    contract.check_table(self.table, "EmbeddingLookup")
    # Validate the options now, and keep them: the fields are frozen.
    object.__setattr__(self, "_policy", self._validated())

  @property
  def policy(self) -> gather.LookupConfig:
    """The validated options (worked out once per layer)."""
    kept = self.__dict__.get("_policy")
    return kept if kept is not None else self._validated()

  def _validated(self) -> gather.LookupConfig:
    return gather.lookup_config(
      self.out_of_range,
      self.max_norm,
      self.norm_type,
      self.scale_grad_by_freq,
      self.dtype,
      self.strategy,
    )

  def __call__(
    self, tokens: pz.nx.NamedArrayBase | jax.Array, /, **side_inputs
  ) -> pz.nx.NamedArray:
    """Looks up ``tokens``; side inputs are accepted and ignored.

    Args:
      tokens: Integer token ids (see `named_embed.lookup`).
      **side_inputs: Ignored, so the layer composes in `pz.nn.Sequential`.

    Returns:
      The token axes followed by the table's embedding axes.
    """
    del side_inputs
    return _lookup(self.table, tokens, self.policy, "EmbeddingLookup")
