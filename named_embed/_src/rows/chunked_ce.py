"""Softmax cross-entropy over a vocabulary, chunk by chunk, on raw arrays.

``hidden`` is ``[N, E]``, ``table`` is ``[R, E]`` (``R`` rows: the whole
vocabulary, or one device's contiguous shard of it), ``targets`` is
``[N]``. The loss never builds the ``[N, V]`` logits: a loop over chunks of
``C`` rows keeps an online log-sum-exp (running max and running sum of
exponentials), the target logit and, for label smoothing, the running sum
of logits. The backward pass (a custom_vjp) recomputes each chunk's logits
from the saved log-sum-exp, accumulates ``d hidden`` in the loop carry and
writes ``d table`` chunk by chunk in place. Peak temporary memory is a few
``[N, C]`` buffers instead of ``[N, V]`` ones.

Chunks are read with ``dynamic_slice`` of the rows as stored: the table is
never padded, copied or cast as a whole (a ragged last chunk is handled
outside the loop). Arithmetic is float32 (float64 for float64 inputs).
Rows whose global id is ``>= vocab_size`` (alignment rows) get ``-inf``
logits and no gradient.

Per position the loss is, with ``z`` the (soft-capped) logits, ``t`` the
target, ``eps`` the label smoothing and ``lse = logsumexp(z)``::

  loss = lse - (1 - eps) * z[t] - eps * mean(z) + z_loss * lse**2

`local_stats` / `combine_stats` / `local_grads` are shared with the
vocabulary-parallel loss (`named_embed._src.rows.vocab_parallel`), where each device
runs them on its own rows and combines the statistics with collectives.

The rows are read through a *loss reader* (`named_embed._src.rows.row_chunks.
LossReader`, made by the table's row source: ``source.loss_reader(arrays,
hidden, offset)``): each chunk's logits forwards, and backwards each
chunk's ``d logits`` turned into ``d hidden`` and the gradients of the
source's trainable arrays. A plain table's reader slices its rows; a
quantised one dequantises each chunk; LoRA adds its low-rank term at the
logit level. One kernel serves every kind of table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from named_embed._src.base import norms
from named_embed._src.rows.row_chunks import over_chunks


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static options of the chunked loss (hashable).

  Attributes:
    chunk_size: Rows per chunk.
    vocab_size: Number of real tokens; rows at or past it are alignment rows.
    soft_cap: Logit soft cap, or None.
    label_smoothing: ``eps``.
    z_loss: Weight of ``lse**2``.
  """

  chunk_size: int
  vocab_size: int
  soft_cap: float | None = None
  label_smoothing: float = 0.0
  z_loss: float = 0.0


def _chunk_logits(reader, start, rows, offset, config: LossConfig):
  """Capped logits ``[N, rows]`` of rows ``start:start+rows``, the
  reader's chunk context, and which columns are real tokens (None if all
  may be)."""
  z, context = reader.logits(start, rows)
  if config.soft_cap is not None:
    cap = jnp.asarray(config.soft_cap, z.dtype)
    z = cap * jnp.tanh(z / cap)
  real = None
  if config.vocab_size < reader.num_rows or not isinstance(offset, int):
    real = (offset + start + jnp.arange(rows)) < config.vocab_size
    z = jnp.where(real[None, :], z, jnp.full((), -jnp.inf, z.dtype))
  return z, context, real


def _target_logit(logits, targets, first_id, rows):
  """``logits[i, targets[i] - first_id]`` where the target is in the chunk."""
  local = targets - first_id
  inside = (local >= 0) & (local < rows)
  picked = jnp.take_along_axis(
    logits, jnp.clip(local, 0, rows - 1)[:, None], axis=1
  )[:, 0]
  return jnp.where(inside, picked, jnp.zeros_like(picked))


def local_stats(reader, targets, offset, config: LossConfig):
  """``(max, sum_exp, target_logit, logit_sum)`` over the reader's rows,
  each [N], in the reader's hidden dtype.

  ``offset`` is the global id of row 0 (0, or a traced shard offset).
  """
  n = targets.shape[0]
  acc = reader.hidden.dtype
  zeros = jnp.zeros((n,), acc)
  carry = (jnp.full((n,), -jnp.inf, acc), zeros, zeros, zeros)

  def step(carry, start, rows):
    m, s, t, total = carry
    z, _, real = _chunk_logits(reader, start, rows, offset, config)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    # A shard holding only alignment rows keeps m = -inf: guard exp(-inf+inf).
    shift = jnp.where(jnp.isfinite(m_new), m_new, jnp.zeros_like(m_new))
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
    t = t + _target_logit(z, targets, offset + start, rows)
    if config.label_smoothing:
      finite = z if real is None else jnp.where(real[None, :], z, 0.0)
      total = total + jnp.sum(finite, axis=1)
    return (m_new, s, t, total)

  return over_chunks(step, carry, reader.num_rows, config.chunk_size)


def combine_stats(stats, axis_name: str | None):
  """Merges per-device statistics over ``axis_name`` (none: as they are).

  Returns ``(lse, target_logit, logit_sum)``. One ``pmax`` of the maxima,
  then one fused ``psum`` of the rescaled sums, target logits and logit
  sums: three ``[N]`` vectors, whatever the vocabulary size.
  """
  m, s, t, total = stats
  if not axis_name:
    return m + jnp.log(s), t, total
  m_all = lax.pmax(lax.stop_gradient(m), axis_name)
  s = s * jnp.exp(m - m_all)
  s, t, total = lax.psum((s, t, total), axis_name)
  return m_all + jnp.log(s), t, total


def position_loss(lse, target_logit, logit_sum, config: LossConfig):
  """The per-position loss from the combined statistics."""
  eps = config.label_smoothing
  loss = lse - (1.0 - eps) * target_logit
  if eps:
    loss = loss - eps * logit_sum / config.vocab_size
  if config.z_loss:
    loss = loss + config.z_loss * lse * lse
  return loss


def local_grads(reader, targets, lse, g, offset, config: LossConfig):
  """``(d_hidden [N, E] from the reader's rows, d_arrays)`` (None for the
  arrays that do not train).

  ``g`` is the per-position cotangent (zero where a position must not
  train anything), in the reader's hidden dtype.
  """
  acc = reader.hidden.dtype
  eps = config.label_smoothing
  # d loss / d z_v = g * (p_v * (1 + 2 z_loss lse) - q_v)
  p_scale = g * (1.0 + 2.0 * config.z_loss * lse)
  q_target = g * (1.0 - eps)
  q_uniform = g * (eps / config.vocab_size)

  def step(carry, start, rows):
    z, context, real = _chunk_logits(reader, start, rows, offset, config)
    dz = jnp.exp(z - lse[:, None]) * p_scale[:, None] - q_uniform[:, None]
    local = targets - (offset + start)
    column = jnp.arange(rows, dtype=local.dtype)
    dz = dz - jnp.where(
      column[None, :] == local[:, None], q_target[:, None], jnp.zeros((), acc)
    )
    if config.soft_cap is not None:
      cap = jnp.asarray(config.soft_cap, acc)
      dz = dz * (1.0 - (z / cap) ** 2)
    if real is not None:  # alignment rows: no gradient (and no inf * 0)
      dz = jnp.where(real[None, :], dz, jnp.zeros((), acc))
    return reader.add_grads(carry, start, rows, dz, context)

  carry = over_chunks(
    step, reader.zero_grads(), reader.num_rows, config.chunk_size
  )
  return reader.grads(carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_cross_entropy(hidden, arrays, targets, config: LossConfig, source):
  """Per-position loss ``[N]`` on one device (see the module docstring),
  in the accumulation dtype (float32, or float64 for float64 hidden), of
  a table given as its row source and arrays
  (`named_embed._src.rows.row_source.RowSource`). The gradient reaches the
  source's trainable arrays only (None for the others).

  ``targets`` must already be in ``[0, vocab_size)``; positions are not
  masked here.
  """
  return _forward(hidden, arrays, targets, config, source)[0]


def _forward(hidden, arrays, targets, config, source):
  acc = norms.accumulation_dtype(hidden.dtype)
  reader = source.loss_reader(arrays, hidden.astype(acc))
  stats = local_stats(reader, targets, 0, config)
  lse, t, total = combine_stats(stats, None)
  loss = position_loss(lse, t, total, config)
  return loss, (hidden, arrays, targets, lse)


def _bwd(config: LossConfig, source, residuals, g):
  hidden, arrays, targets, lse = residuals
  acc = lse.dtype
  reader = source.loss_reader(arrays, hidden.astype(acc))
  d_hidden, d_arrays = local_grads(
    reader, targets, lse, g.astype(acc), 0, config
  )
  return d_hidden.astype(hidden.dtype), d_arrays, None


chunked_cross_entropy.defvjp(_forward, _bwd)
