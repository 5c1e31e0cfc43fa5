"""Reading a row source one vocabulary chunk at a time.

`Reader` is how the chunked loss (`named_embed._chunked_ce`, and its
vocabulary-parallel form) reads a compressed or adapted table: float rows
``[C, E]`` of one chunk at a time, made by the source from its arrays
sliced to the chunk, and, backwards, each chunk's gradient pulled back to
the source's trainable arrays with `jax.vjp` (``A``'s rows of the chunk
and ``B`` for LoRA, the trained rows). `chunked_logits` is the decode of a
frozen source (a quantised table) on the same reader: only one chunk of
float rows exists at once, forwards and backwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from named_embed import _chunked_ce


def contract(hidden: jax.Array, rows: jax.Array) -> jax.Array:
  """``hidden [N, E] . rows [R, E]^T`` in ``hidden``'s dtype."""
  return lax.dot_general(
    hidden,
    rows.astype(hidden.dtype),
    (((1,), (1,)), ((), ())),
    preferred_element_type=hidden.dtype,
  )


class Reader:
  """A source's arrays as the chunked loss reads them: chunks of float rows
  ``[C, E]`` and, backwards, the gradient of each chunk pulled back to the
  trainable arrays (the protocol of `named_embed._chunked_ce`)."""

  def __init__(self, source, arrays: tuple, offset=0):
    self.source = source
    self.arrays = arrays
    self.offset = offset
    first = source.row_aligned.index(True)
    self.num_rows = arrays[first].shape[0]

  def _slice(self, start, size) -> tuple:
    return tuple(
      lax.dynamic_slice_in_dim(a, start, size, axis=0) if aligned else a
      for a, aligned in zip(self.arrays, self.source.row_aligned)
    )

  def rows(self, start, size) -> jax.Array:
    rows = self.source.rows_of(self._slice(start, size), self.offset + start)
    return rows.reshape(size, -1)

  def zero_grads(self) -> tuple:
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


def _logits_loop(hidden, arrays, source, chunk_size):
  reader = Reader(source, arrays)
  n = hidden.shape[0]

  def step(out, start, size):
    z = contract(hidden, reader.rows(start, size))
    return lax.dynamic_update_slice_in_dim(out, z, start, axis=1)

  out = jnp.zeros((n, reader.num_rows), hidden.dtype)
  return _chunked_ce.over_chunks(step, out, reader.num_rows, chunk_size)


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

  d_hidden = _chunked_ce.over_chunks(
    step, jnp.zeros(hidden.shape, g.dtype), reader.num_rows, chunk_size
  )
  return d_hidden.astype(hidden.dtype), None


chunked_logits.defvjp(_chunked_logits_fwd, _chunked_logits_bwd)
