"""Reading a row source one vocabulary chunk at a time.

Two readers, both made by the source (`named_embed._src.rows.row_source`):

- `Reader`: float rows ``[C, E]`` of any chunk, made from the source's
  arrays sliced to it, and, backwards, a chunk's row gradient pulled back
  to the trainable arrays with `jax.vjp` (``A``'s rows of the chunk and
  ``B`` for LoRA, the trained rows). `chunked_logits` is the decode of a
  frozen source (a quantised table) on it: only one chunk of float rows
  exists at once, forwards and backwards.
- a loss reader (`LossReader`), what the fused loss
  (`named_embed._src.rows.chunked_ce`) reads: one chunk's logits of the hidden
  states, and backwards that chunk's ``d logits`` turned into ``d hidden``
  and the gradients of the trainable arrays. `RowsLossReader` makes both
  from a `Reader`'s rows; a kind may give a faster one (LoRA adds its
  low-rank term at the logit level, never rebuilding rows backwards).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _runs(num_rows: int, chunk_size: int) -> list[tuple[int, int, int]]:
  """``(first_row, chunk_rows, count)`` runs: full chunks, then a ragged one."""
  full, rest = divmod(num_rows, chunk_size)
  runs = []
  if full:
    runs.append((0, chunk_size, full))
  if rest:
    runs.append((full * chunk_size, rest, 1))
  return runs


def over_chunks(step, carry, num_rows: int, chunk_size: int):
  """Folds ``step(carry, first_row, rows)`` over the chunks of the rows."""
  for first, rows, count in _runs(num_rows, chunk_size):
    if count == 1:
      carry = step(carry, first, rows)
    else:
      carry = lax.fori_loop(
        0,
        count,
        lambda i, c, rows=rows, first=first: step(c, first + i * rows, rows),
        carry,
      )
  return carry


def contract(hidden: jax.Array, rows: jax.Array) -> jax.Array:
  """``hidden [N, E] . rows [R, E]^T`` in ``hidden``'s dtype."""
  return lax.dot_general(
    hidden,
    rows.astype(hidden.dtype),
    (((1,), (1,)), ((), ())),
    preferred_element_type=hidden.dtype,
  )


class Reader:
  """A source's arrays read one chunk of float rows ``[C, E]`` at a time,
  and, backwards, the gradient of a chunk's rows pulled back to the
  trainable arrays."""

  def __init__(self, source, arrays: tuple, offset=0):
    self.source = source
    self.arrays = arrays
    self.offset = offset
    self.num_rows = source.first_aligned(arrays).shape[0]

  def _slice(self, start, size) -> tuple:
    return tuple(
      lax.dynamic_slice_in_dim(a, start, size, axis=0) if aligned else a
      for a, aligned in zip(self.arrays, self.source.row_aligned)
    )

  def rows(self, start, size) -> jax.Array:
    """The float rows ``[size, E]`` from row ``start`` (local)."""
    rows = self.source.rows_of(self._slice(start, size), self.offset + start)
    return rows.reshape(size, -1)

  def zero_grads(self) -> tuple:
    """Zero gradients of the trainable arrays (None for the others)."""
    return tuple(
      jnp.zeros_like(a) if trains else None
      for a, trains in zip(self.arrays, self.source.trainable)
    )

  def add_grads(self, grads: tuple, start, size, d_chunk) -> tuple:
    """``grads`` plus the pull-back of ``d_chunk [size, E]`` (the gradient
    of the chunk's rows) to the trainable arrays."""
    trained = [i for i, t in enumerate(self.source.trainable) if t]
    if not trained:
      return grads
    sliced = self._slice(start, size)

    def chunk_rows(*parts):
      arrays = list(sliced)
      for i, part in zip(trained, parts):
        arrays[i] = part
      rows = self.source.rows_of(tuple(arrays), self.offset + start)
      return rows.reshape(size, -1)

    _, pull = jax.vjp(chunk_rows, *(sliced[i] for i in trained))
    pulled = pull(d_chunk.astype(self.source.dtype))
    grads = list(grads)
    for i, d in zip(trained, pulled):
      d = d.astype(grads[i].dtype)
      if self.source.row_aligned[i]:
        grads[i] = lax.dynamic_update_slice_in_dim(grads[i], d, start, axis=0)
      else:
        grads[i] = grads[i] + d
    return tuple(grads)


class LossReader:
  """What the fused loss reads of a table, for hidden states ``[N, E]``
  (in the accumulation dtype) bound when the reader is made.

  ``num_rows`` is the number of local rows; ``logits(start, size)`` gives
  ``(z [N, size], context)``; ``zero_grads()`` the gradient carry;
  ``add_grads(carry, start, size, dz, context)`` adds one chunk's ``d z``;
  ``grads(carry)`` returns ``(d hidden, d arrays)`` (None for arrays that
  do not train).
  """

  num_rows: int

  def logits(self, start, size):
    raise NotImplementedError

  def zero_grads(self):
    raise NotImplementedError

  def add_grads(self, carry, start, size, dz, context):
    raise NotImplementedError

  def grads(self, carry):
    raise NotImplementedError


class RowsLossReader(LossReader):
  """A loss reader made from a `Reader`'s float rows: ``z = h . rows^T``,
  ``d h += dz . rows``, ``d rows = dz^T . h`` pulled back to the arrays."""

  def __init__(self, reader: Reader, hidden: jax.Array):
    self.reader = reader
    self.hidden = hidden
    self.num_rows = reader.num_rows
    self.trains = any(reader.source.trainable)

  def logits(self, start, size):
    rows = self.reader.rows(start, size)
    return contract(self.hidden, rows), rows

  def zero_grads(self):
    return jnp.zeros(self.hidden.shape, self.hidden.dtype), (
      self.reader.zero_grads()
    )

  def add_grads(self, carry, start, size, dz, context):
    d_hidden, grads = carry
    rows = context
    d_hidden = d_hidden + dz @ rows.astype(dz.dtype)
    if self.trains:
      d_rows = lax.dot_general(dz, self.hidden, (((0,), (0,)), ((), ())))
      grads = self.reader.add_grads(grads, start, size, d_rows)
    return d_hidden, grads

  def grads(self, carry):
    return carry


def _logits_loop(hidden, arrays, source, chunk_size):
  reader = Reader(source, arrays)
  n = hidden.shape[0]

  def step(out, start, size):
    z = contract(hidden, reader.rows(start, size))
    return lax.dynamic_update_slice_in_dim(out, z, start, axis=1)

  out = jnp.zeros((n, reader.num_rows), hidden.dtype)
  return over_chunks(step, out, reader.num_rows, chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def chunked_logits(hidden, arrays, source, chunk_size: int):
  """``[N, R]`` logits against a frozen source (no trainable arrays), one
  chunk of ``chunk_size`` rows at a time: only one chunk of float rows
  exists at once, forwards and backwards (``d hidden`` is accumulated
  chunk by chunk, recomputing each chunk's rows)."""
  return _logits_loop(hidden, arrays, source, chunk_size)


def _chunked_logits_fwd(hidden, arrays, source, chunk_size):
  return _logits_loop(hidden, arrays, source, chunk_size), (hidden, arrays)


def _chunked_logits_bwd(source, chunk_size, residuals, g):
  hidden, arrays = residuals
  reader = Reader(source, arrays)

  def step(d_hidden, start, size):
    g_chunk = lax.dynamic_slice_in_dim(g, start, size, axis=1)
    rows = reader.rows(start, size).astype(g.dtype)
    return d_hidden + g_chunk @ rows

  d_hidden = over_chunks(
    step, jnp.zeros(hidden.shape, g.dtype), reader.num_rows, chunk_size
  )
  return d_hidden.astype(hidden.dtype), None


chunked_logits.defvjp(_chunked_logits_fwd, _chunked_logits_bwd)
