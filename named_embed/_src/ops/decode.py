"""`EmbeddingDecode` and `decode`: vectors to vocabulary logits, by name."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.base import named_arrays, validation
from named_embed._src.ops import decode_inputs
from named_embed._src.tables import contract


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
  """Static configuration of a decode kernel (hashable: a jit cache key)."""

  layout: decode_inputs.HiddenLayout
  soft_cap: float | None = None
  dtype: np.dtype | None = None
  vocab_size: int | None = None
  rows_sharding: object = None


@functools.lru_cache(maxsize=256, typed=True)
def _decode_options(soft_cap: Any = None, dtype: Any = None):
  """Validates decode options once per distinct combination.

  Raises:
    ValueError: for a non-positive or infinite ``soft_cap``.
    TypeError: for options of the wrong type.
  """
  if dtype is not None:
    dtype = validation.check_float_dtype("dtype", dtype)
  return validation.check_soft_cap(soft_cap), dtype


def _cap_and_mask(logits, config: _DecodeConfig, num_rows: int):
  """Soft-caps the logits (last axis: the vocabulary) and gives alignment
  rows ``-inf``."""
  if config.soft_cap is not None:
    cap = jnp.asarray(config.soft_cap, logits.dtype)
    logits = cap * jnp.tanh(logits / cap)
  if config.vocab_size is not None and config.vocab_size < num_rows:
    # Alignment rows are not tokens: -inf keeps them out of any softmax.
    real = jnp.arange(num_rows) < config.vocab_size
    logits = jnp.where(real, logits, jnp.full((), -jnp.inf, logits.dtype))
  return logits


@functools.lru_cache(maxsize=512)
def _compiled_decode(config: _DecodeConfig, source: Any, scope: str):
  """The decode of one static configuration, jitted once (see
  `named_embed._src.rows.gather.compile_gather`): the source contracts ``hidden``
  as stored with its rows (`named_embed._src.rows.row_source.RowSource.decode`)."""

  def decode_kernel(hidden, arrays):
    with jax.named_scope(scope):
      arrays = source.prepare(arrays, config.rows_sharding)
      logits = source.decode(
        arrays, hidden, config.layout, config.dtype, config.rows_sharding
      )
      return _cap_and_mask(logits, config, source.num_rows)

  return jax.jit(decode_kernel)


def decode(
  table: contract.AbstractTable,
  hidden: pz.nx.NamedArrayBase,
  *,
  soft_cap: float | None = None,
  dtype: jax.typing.DTypeLike | None = None,
) -> pz.nx.NamedArray:
  """Vocabulary logits of ``hidden``; the functional form of `EmbeddingDecode`.

  Contracts every embedding axis of the table against ``hidden``:
  ``logits[..., v] = sum_e hidden[..., e] * table[v, e]``.

  Args:
    table: The embedding table.
    hidden: A `NamedArray` holding all of the table's embedding axes, plus
      any batch axes (named or positional).
    soft_cap: If set, logits become ``soft_cap * tanh(logits / soft_cap)``.
    dtype: Compute dtype. By default hidden and table are promoted jointly
      (flax's ``attend`` rule: bf16 table with f32 hidden gives f32).

  Returns:
    A `NamedArray` with the batch axes of ``hidden`` followed by the
    vocabulary axis.

  Raises:
    TypeError: if ``hidden`` is not a `NamedArray`.
    ValueError: for a missing or mis-sized embedding axis, or bad options.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32))
  >>> hidden = pz.nx.wrap(np.array([[3.0, 4.0]], np.float32)
  ...                     ).tag("seq", "embedding")
  >>> logits = ne.decode(table, hidden)
  >>> logits.named_shape, logits.untag("seq", "vocabulary").unwrap().tolist()
  ({'seq': 1, 'vocabulary': 3}, [[3.0, 8.0, 7.0]])
  """
  options = _decode_options(soft_cap, dtype)
  return _decode(table, hidden, options, "decode")


def _decode(
  table: Any, hidden: Any, options: tuple, caller: str
) -> pz.nx.NamedArray:
  """`decode` with options already validated by `_decode_options`."""
  contract.check_table(table, f"named_embed.{caller}")
  soft_cap, dtype = options
  source, arrays = table.row_parts()
  embedding_axes = table.embedding_axes
  prefix = decode_inputs.check_hidden(table, embedding_axes, hidden, caller)
  hidden_named = tuple(prefix.named_axes)
  if dtype is None:
    dtype = decode_inputs.joint_dtype(prefix.dtype, source.dtype)
  config = _DecodeConfig(
    layout=decode_inputs.hidden_layout(
      prefix.data_array.ndim - len(hidden_named),  # positional axes
      hidden_named,
      tuple(embedding_axes),
    ),
    soft_cap=soft_cap,
    dtype=dtype,
    vocab_size=table.true_vocab_size,
    rows_sharding=table.rows_sharding,
  )
  kernel = _compiled_decode(config, source, f"named_embed.{caller}")
  logits = kernel(prefix.data_array, arrays)
  batch = {
    name: size
    for name, size in prefix.named_axes.items()
    if name not in embedding_axes
  }
  batch[table.vocabulary_axis] = source.num_rows
  return named_arrays.named_result(logits, batch)


@pz.pytree_dataclass
class EmbeddingDecode(pz.nn.Layer):
  """Maps vectors to vocabulary logits with an `EmbeddingTable`, by name.

  The usual last layer of a language model. Give it the table of the
  model's `EmbeddingLookup` to tie input and output embeddings: the model
  then holds one parameter, and its gradient is the sum of both uses (the
  padding row included, as in torch). The input must hold every embedding
  axis of the table; all other axes are batch axes and are kept.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=100,
  ...     embedding_axes={"embedding": 8})
  >>> model = pz.nn.Sequential([ne.EmbeddingLookup(table),
  ...                           ne.EmbeddingDecode(table, soft_cap=30.0)])
  >>> ids = pz.nx.wrap(np.array([[1, 2, 3]])).tag("batch", "seq")
  >>> model(ids).named_shape
  {'batch': 1, 'seq': 3, 'vocabulary': 100}
  >>> len(pz.unbind_params(model)[1])  # tied: one parameter
  1

  Attributes:
    table: The embedding table.
    soft_cap: If set, logits become ``soft_cap * tanh(logits / soft_cap)``.
    dtype: Compute dtype, or None to promote hidden and table jointly.
  """

  table: contract.AbstractTable
  soft_cap: float | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  dtype: Any = dataclasses.field(default=None, metadata={"pytree_node": False})

  def __post_init__(self):
    contract.check_table(self.table, "EmbeddingDecode")
    _decode_options(self.soft_cap, self.dtype)

  def __call__(
    self, hidden: pz.nx.NamedArrayBase, /, **side_inputs
  ) -> pz.nx.NamedArray:
    """Computes logits; side inputs are accepted and ignored.

    Args:
      hidden: Holds the table's embedding axes plus any batch axes.
      **side_inputs: Ignored, so the layer composes in `pz.nn.Sequential`.

    Returns:
      The batch axes of ``hidden`` followed by the vocabulary axis.
    """
    del side_inputs
    options = _decode_options(self.soft_cap, self.dtype)
    return _decode(self.table, hidden, options, "EmbeddingDecode")
