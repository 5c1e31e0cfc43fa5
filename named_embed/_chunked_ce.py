"""Softmax cross-entropy over a vocabulary, chunk by chunk, on raw arrays.

``hidden`` is ``[N, E]``, ``table`` is ``[V, E]``, ``targets`` and ``mask``
are ``[N]``. The loss never builds the ``[N, V]`` logits: a loop over
vocabulary chunks of ``C`` rows keeps an online log-sum-exp (running max and
running sum of exponentials), the target logit and, for label smoothing, the
running sum of logits. The backward pass (a custom_vjp) recomputes each
chunk's logits from the saved log-sum-exp and accumulates ``d hidden`` in
the loop carry and ``d table`` chunk by chunk in place. Peak temporary
memory is a few ``[N, C]`` buffers instead of ``[N, V]`` ones.

Chunks are read with ``dynamic_slice`` of the table as stored: the table is
never padded, copied or cast as a whole (a ragged last chunk is handled
outside the loop). Arithmetic is float32 (float64 for float64 inputs).

Per position the loss is, with ``z`` the (soft-capped) logits, ``t`` the
target, ``eps`` the label smoothing and ``lse = logsumexp(z)``::

  loss = lse - (1 - eps) * z[t] - eps * mean(z) + z_loss * lse**2
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from named_embed import _norms


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static options of the chunked loss (hashable)."""

  chunk_size: int
  soft_cap: float | None = None
  label_smoothing: float = 0.0
  z_loss: float = 0.0


def _chunks(vocab_size: int, chunk_size: int) -> list[tuple[int, int, int]]:
  """``(first_row, chunk_rows, count)`` runs: full chunks, then a ragged one."""
  full, rest = divmod(vocab_size, chunk_size)
  runs = []
  if full:
    runs.append((0, chunk_size, full))
  if rest:
    runs.append((full * chunk_size, rest, 1))
  return runs


def _chunk_logits(hidden, table, start, rows, config: LossConfig):
  """Capped logits ``[N, rows]`` of table rows ``start:start+rows``."""
  chunk = lax.dynamic_slice_in_dim(table, start, rows, axis=0)
  raw = lax.dot_general(
    hidden,
    chunk.astype(hidden.dtype),
    (((1,), (1,)), ((), ())),
    preferred_element_type=hidden.dtype,
  )
  if config.soft_cap is None:
    return raw, chunk
  cap = jnp.asarray(config.soft_cap, raw.dtype)
  return cap * jnp.tanh(raw / cap), chunk


def _target_logit(logits, targets, start, rows):
  """``logits[i, targets[i] - start]`` where the target is in this chunk."""
  local = targets - start
  inside = (local >= 0) & (local < rows)
  picked = jnp.take_along_axis(
    logits, jnp.clip(local, 0, rows - 1)[:, None], axis=1
  )[:, 0]
  return jnp.where(inside, picked, jnp.zeros_like(picked))


def _forward_stats(hidden, table, targets, config: LossConfig):
  """Returns ``(lse, target_logit, logit_sum)``, each ``[N]``."""
  n = hidden.shape[0]
  acc = hidden.dtype
  carry = (
    jnp.full((n,), -jnp.inf, acc),  # running max
    jnp.zeros((n,), acc),  # running sum of exp(z - max)
    jnp.zeros((n,), acc),  # target logit
    jnp.zeros((n,), acc),  # sum of logits
  )

  def step(carry, start, rows):
    m, s, t, total = carry
    z, _ = _chunk_logits(hidden, table, start, rows, config)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
    t = t + _target_logit(z, targets, start, rows)
    if config.label_smoothing:
      total = total + jnp.sum(z, axis=1)
    return (m_new, s, t, total)

  for first, rows, count in _chunks(table.shape[0], config.chunk_size):
    if count == 1:
      carry = step(carry, first, rows)
    else:
      carry = lax.fori_loop(
        0,
        count,
        lambda i, c, rows=rows, first=first: step(c, first + i * rows, rows),
        carry,
      )
  m, s, t, total = carry
  return m + jnp.log(s), t, total


def _position_loss(lse, target_logit, logit_sum, vocab_size, config):
  eps = config.label_smoothing
  loss = lse - (1.0 - eps) * target_logit
  if eps:
    loss = loss - eps * logit_sum / vocab_size
  if config.z_loss:
    loss = loss + config.z_loss * lse * lse
  return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_cross_entropy(hidden, table, targets, config: LossConfig):
  """Per-position loss ``[N]`` (see the module docstring).

  ``targets`` must already be in ``[0, V)``; positions are not masked here.
  """
  return _forward(hidden, table, targets, config)[0]


def _forward(hidden, table, targets, config):
  acc = _norms.accumulation_dtype(hidden.dtype)
  hidden_acc = hidden.astype(acc)
  lse, t, total = _forward_stats(hidden_acc, table, targets, config)
  loss = _position_loss(lse, t, total, table.shape[0], config)
  return loss.astype(hidden.dtype), (hidden, table, targets, lse)


def _fwd(hidden, table, targets, config):
  return _forward(hidden, table, targets, config)


def _bwd(config: LossConfig, residuals, g):
  hidden, table, targets, lse = residuals
  acc = lse.dtype
  hidden_acc = hidden.astype(acc)
  g = g.astype(acc)
  vocab_size = table.shape[0]
  eps = config.label_smoothing
  # d loss / d z_v = g * (p_v * (1 + 2 z_loss lse) - q_v)
  p_scale = g * (1.0 + 2.0 * config.z_loss * lse)
  q_target = g * (1.0 - eps)
  q_uniform = g * (eps / vocab_size)

  def step(carry, start, rows):
    d_hidden, d_table = carry
    z, chunk = _chunk_logits(hidden_acc, table, start, rows, config)
    dz = jnp.exp(z - lse[:, None]) * p_scale[:, None] - q_uniform[:, None]
    local = targets - start
    column = jnp.arange(rows, dtype=local.dtype)
    dz = dz - jnp.where(
      column[None, :] == local[:, None], q_target[:, None], jnp.zeros((), acc)
    )
    if config.soft_cap is not None:
      cap = jnp.asarray(config.soft_cap, acc)
      dz = dz * (1.0 - (z / cap) ** 2)
    d_hidden = d_hidden + dz @ chunk.astype(acc)
    d_chunk = lax.dot_general(dz, hidden_acc, (((0,), (0,)), ((), ())))
    d_table = lax.dynamic_update_slice_in_dim(
      d_table, d_chunk.astype(d_table.dtype), start, axis=0
    )
    return d_hidden, d_table

  carry = (jnp.zeros(hidden.shape, acc), jnp.zeros(table.shape, table.dtype))
  for first, rows, count in _chunks(vocab_size, config.chunk_size):
    if count == 1:
      carry = step(carry, first, rows)
    else:
      carry = lax.fori_loop(
        0,
        count,
        lambda i, c, rows=rows, first=first: step(c, first + i * rows, rows),
        carry,
      )
  d_hidden, d_table = carry
  return d_hidden.astype(hidden.dtype), d_table, None


chunked_cross_entropy.defvjp(_fwd, _bwd)
