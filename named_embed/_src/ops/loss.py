"""`decode_cross_entropy`: decode fused with softmax cross-entropy, by name."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from penzai import pz

from named_embed._src.base import (
  mesh_layout,
  named_arrays,
  range_policy,
  validation,
)
from named_embed._src.ops import decode_inputs
from named_embed._src.ops.decode import EmbeddingDecode
from named_embed._src.rows import chunked_ce, row_source, vocab_parallel
from named_embed._src.tables import contract

REDUCTIONS = ("mean", "sum", "none")
CHUNK_TARGET_BYTES = 32 * 2**20
"""Default chunking keeps one ``[tokens, chunk]`` float32 buffer near this."""


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
  """A power of two in ``[256, 16384]`` with ``tokens * chunk * 4`` bytes
  near `CHUNK_TARGET_BYTES`, or the whole vocabulary if that is smaller.

  >>> from named_embed._src.ops.loss import default_chunk_size
  >>> default_chunk_size(8192, 128_000), default_chunk_size(64, 1000)
  (1024, 1000)
  """
  budget = max(1, CHUNK_TARGET_BYTES // (4 * max(num_tokens, 1)))
  chunk = 2 ** int(math.floor(math.log2(budget)))
  chunk = min(max(chunk, 256), 16384)
  return min(chunk, vocab_size)


def _check_options(chunk_size, label_smoothing, z_loss, reduction):
  validation.check_optional_positive_int("chunk_size", chunk_size)
  validation.check_number(
    "label_smoothing", label_smoothing, minimum=0.0, maximum=1.0
  )
  validation.check_number("z_loss", z_loss, minimum=0.0, finite=True)
  validation.check_choice("reduction", reduction, REDUCTIONS)


def _flatten_inputs(embedding_axes, prefix, targets, where):
  """Raw ``hidden [N, E]``, ``targets [N]``, ``mask [N]`` and the batch axes."""
  batch = {
    n: s for n, s in prefix.named_axes.items() if n not in embedding_axes
  }
  if isinstance(targets, pz.nx.NamedArrayBase):
    target_prefix = named_arrays.as_prefix_layout(targets)
  else:
    target_prefix = named_arrays.wrap_ids(targets)  # host ids stay 64-bit
  if (
    dict(target_prefix.named_shape) != batch
    or target_prefix.positional_shape != prefix.positional_shape
  ):
    raise ValueError(
      "named_embed.decode_cross_entropy: `targets` must have exactly the"
      f" batch axes of `hidden`: named {batch} and positional"
      f" {prefix.positional_shape}; got named"
      f" {dict(target_prefix.named_shape)} and positional"
      f" {target_prefix.positional_shape}."
    )
  order = tuple(target_prefix.named_axes)
  ids, _ = named_arrays.split_tokens(target_prefix, "targets")
  hidden = prefix.order_as(*order, *embedding_axes).data_array
  n = math.prod(prefix.positional_shape) * math.prod(batch.values())
  mask = None
  if where is not None:
    if isinstance(where, pz.nx.NamedArrayBase):
      where = named_arrays.as_prefix_layout(where)
      if dict(where.named_shape) != batch:
        raise ValueError(
          f"`where` has axes {dict(where.named_shape)}; expected the batch"
          f" axes {batch} of `hidden`."
        )
      where = where.order_as(*order).data_array
    elif batch:
      raise TypeError(
        "`where` must be a NamedArray with the batch axes"
        f" {batch} of `hidden`: a plain array has no names to align them."
      )
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape != (
      *prefix.positional_shape,
      *(batch[name] for name in order),
    ):
      raise ValueError(
        f"`where` must be a boolean mask over the batch axes {batch}"
        f" (positional shape {prefix.positional_shape}); got dtype"
        f" {where.dtype} and shape {where.shape}."
      )
    mask = where.reshape(n)
  shape = (*prefix.positional_shape, *(batch[name] for name in order))
  return (
    hidden.reshape(n, math.prod(embedding_axes.values())),
    ids.reshape(n),
    mask,
    shape,
    {name: batch[name] for name in order},
  )


def decode_cross_entropy(
  table_or_decode: contract.AbstractTable | EmbeddingDecode,
  hidden: pz.nx.NamedArrayBase,
  targets: pz.nx.NamedArrayBase | jax.typing.ArrayLike,
  *,
  chunk_size: int | None = None,
  soft_cap: float | None = None,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  where: pz.nx.NamedArrayBase | jax.typing.ArrayLike | None = None,
  reduction: str = "mean",
  out_of_range: str = "fill",
) -> jax.Array | pz.nx.NamedArray:
  """Softmax cross-entropy of decoded logits, without building the logits.

  Equal (within float tolerance, values and gradients with respect to
  ``hidden`` and the table) to ``log_softmax`` of ``decode(table, hidden)``
  followed by the usual cross-entropy, but the ``[tokens, vocabulary]``
  logits never exist: the vocabulary is scanned in chunks with an online
  log-sum-exp, and the backward pass recomputes each chunk.

  Args:
    table_or_decode: An `EmbeddingTable`, or an `EmbeddingDecode` whose table
      (and ``soft_cap``, unless one is given here) is used.
    hidden: A `NamedArray` with the table's embedding axes plus batch axes.
    targets: Integer target ids with exactly the batch axes of ``hidden``.
    chunk_size: Vocabulary rows per chunk; None picks a power of two that
      keeps one ``[tokens, chunk]`` float32 buffer near 32 MiB.
    soft_cap: If set, logits are ``soft_cap * tanh(logits / soft_cap)``.
    label_smoothing: ``eps`` in ``[0, 1]``: the target distribution is
      ``(1 - eps) * one_hot + eps / V``.
    z_loss: Adds ``z_loss * logsumexp(logits) ** 2`` per position.
    where: Boolean mask over the batch axes; masked-out positions contribute
      exactly nothing (no NaN leaks, even from an out-of-range target).
    reduction: ``"mean"`` (over unmasked positions), ``"sum"``, or
      ``"none"`` (a `NamedArray` over the batch axes, zero where masked).
    out_of_range: Policy for targets outside ``[0, V)``, as for lookups:
      ``"fill"`` (NaN loss there, no gradient), ``"clip"``, ``"wrap"``,
      ``"error"``.

  Returns:
    A scalar for ``"mean"`` / ``"sum"``, else a `NamedArray`. The dtype is
    the joint dtype of hidden and table; arithmetic is at least float32.

  Raises:
    ValueError: for mismatched axes or bad options.
    TypeError: for non-integer targets.
    IndexError: for out-of-range targets under ``"error"`` (eagerly; under
      `jax.jit` a runtime error naming them, and on a computation split
      over several devices an error log on the ``named_embed`` logger with
      NaN losses instead, see ``docs/sharding.md``).

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="e", init_base_rng=jax.random.key(0), vocab_size=50,
  ...     embedding_axes={"embedding": 8})
  >>> hidden = pz.nx.wrap(np.ones((3, 8), np.float32)).tag("seq", "embedding")
  >>> targets = pz.nx.wrap(np.array([1, 2, 3])).tag("seq")
  >>> loss = ne.decode_cross_entropy(table, hidden, targets, chunk_size=16)
  >>> logits = ne.decode(table, hidden).untag("seq", "vocabulary").unwrap()
  >>> naive = -jax.nn.log_softmax(logits)[np.arange(3), [1, 2, 3]].mean()
  >>> bool(np.isclose(loss, naive, rtol=1e-5))
  True
  """
  if isinstance(table_or_decode, EmbeddingDecode):
    table = table_or_decode.table
    if soft_cap is None:
      soft_cap = table_or_decode.soft_cap
  else:
    table = table_or_decode
  contract.check_table(table, "ne.decode_cross_entropy", "table_or_decode")
  soft_cap = validation.check_soft_cap(soft_cap)
  _check_options(chunk_size, label_smoothing, z_loss, reduction)
  out_of_range = range_policy.check_policy(out_of_range)
  source, arrays = table.row_parts()
  embedding_axes = table.embedding_axes
  prefix = decode_inputs.check_hidden(
    table, embedding_axes, hidden, "decode_cross_entropy"
  )
  h, ids, mask, shape, batch = _flatten_inputs(
    embedding_axes, prefix, targets, where
  )
  vocab_size = table.true_vocab_size or source.num_rows
  ids, runtime_check = range_policy.admit_ids(
    ids, out_of_range, vocab_size, mask
  )
  target_options = _TargetsConfig(out_of_range, runtime_check)
  config = chunked_ce.LossConfig(
    chunk_size=chunk_size or default_chunk_size(h.shape[0], vocab_size),
    vocab_size=vocab_size,
    soft_cap=soft_cap,
    label_smoothing=float(label_smoothing),
    z_loss=float(z_loss),
  )
  kernel = _compiled_loss(
    target_options, config, reduction, table.rows_sharding, source
  )
  losses = kernel(h, arrays, ids, mask)
  if reduction == "none":
    return named_arrays.named_result(losses.reshape(shape), batch)
  return losses


class _TargetsConfig(NamedTuple):
  """How the loss treats its targets (part of the jit cache key)."""

  out_of_range: str
  runtime_check: bool


@functools.lru_cache(maxsize=256)
def _compiled_loss(
  target_options: _TargetsConfig,
  config: chunked_ce.LossConfig,
  reduction: str,
  rows_sharding: jax.sharding.NamedSharding | None,
  source: row_source.RowSource,
):
  """The whole loss for one static configuration, jitted once: ``arrays``
  are the table's (`named_embed._src.rows.row_source`)."""

  def decode_cross_entropy_kernel(hidden, arrays, ids, mask):
    with jax.named_scope("named_embed.decode_cross_entropy"):
      if mask is not None:  # masked targets are never checked nor NaN-filled
        ids = jnp.where(mask, ids, jnp.zeros_like(ids))
      sharded = mesh_layout.spans_devices(
        *arrays, hidden, ids
      ) or mesh_layout.splits(rows_sharding)
      safe, valid = range_policy.safe_ids(
        ids,
        config.vocab_size,
        target_options.out_of_range,
        target_options.runtime_check,
        sharded,
      )
      if hidden.dtype != source.dtype:  # joint dtype; rows cast per chunk
        hidden = hidden.astype(
          decode_inputs.joint_dtype(hidden.dtype, source.dtype)
        )
      arrays = source.prepare(arrays, rows_sharding)
      first = source.first_aligned(arrays)
      layout = first.reshape(first.shape[0], -1)  # a bitcast, for the split
      split = vocab_parallel.split_for(hidden, layout, safe, rows_sharding)
      if split is None:
        losses = chunked_ce.chunked_cross_entropy(
          hidden, arrays, safe, config, source
        )
      else:
        losses = vocab_parallel.vocab_parallel_cross_entropy(
          hidden, arrays, safe, config, split, source
        )
      out_dtype = hidden.dtype
      return _reduce(losses, valid, mask, reduction).astype(out_dtype)

  return jax.jit(decode_cross_entropy_kernel)


def _reduce(losses, valid, mask, reduction):
  """NaN where ``valid`` is False, zero where ``mask`` is, then reduce (in
  the accumulation dtype: a bf16 mean is rounded once, at the end)."""
  nan = jnp.full((), jnp.nan, losses.dtype)
  zero = jnp.zeros((), losses.dtype)
  if valid is not None:
    losses = jnp.where(valid, losses, nan)
  if mask is not None:
    losses = jnp.where(mask, losses, zero)
  if reduction == "none":
    return losses
  total = jnp.sum(losses)
  if reduction == "sum":
    return total
  count = losses.shape[0] if mask is None else jnp.sum(mask)
  return total / jnp.asarray(count, losses.dtype)
