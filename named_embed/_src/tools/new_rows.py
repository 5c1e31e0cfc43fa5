"""How the rows added to a table start: ``init=`` of the resizing methods.

``"mean"`` (the float32 mean of the token rows, the pad row left out),
``"zeros"``, ``"normal"`` (the spread of the token rows), an initializer
``(key, shape, dtype)`` or penzai-style, or an array of the rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from named_embed._src.base import validation
from named_embed._src.base.initializers import initialize
from named_embed._src.rows import row_source
from named_embed._src.tools import row_scan

INITS = ("mean", "zeros", "normal")
"""The named ways to initialise new rows."""

Init = str | Callable[..., Any] | np.ndarray | jax.Array


def new_rows(
  table: Any,
  row_shape: tuple[int, ...],
  dtype: Any,
  count: int,
  init: Init,
  key: jax.Array | None,
  stats: Callable[[], tuple[jax.Array, jax.Array]],
) -> jax.Array:
  """``count`` new rows ``[count, *row_shape]`` in ``dtype``, initialised by
  ``init``; ``stats()`` gives the float32 mean row and the standard
  deviation of the token rows (`token_stats`, `source_token_stats`), called
  only for ``"mean"`` and ``"normal"``."""
  shape = (count, *row_shape)
  if isinstance(init, str):
    validation.check_choice("init", init, INITS)
  elif not callable(init) and not isinstance(init, np.ndarray | jax.Array):
    raise TypeError(
      f"`init` must be one of {INITS}, an initializer (key, shape, dtype),"
      f" or an array of the new rows; got {init!r}."
    )
  if isinstance(init, np.ndarray | jax.Array):
    if tuple(init.shape) != shape:
      raise ValueError(
        f"`init` holds rows of shape {tuple(init.shape)}; the {count} new"
        f" rows need shape {shape}."
      )
    return jnp.asarray(init).astype(dtype)
  if count == 0 or init == "zeros":
    return jnp.zeros(shape, dtype)
  if init == "mean":
    return jnp.broadcast_to(stats()[0][None], shape).astype(dtype)
  key = check_key(key, init)
  if init == "normal":
    std = stats()[1]
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  axes = dict(zip(table.embedding_axes, shape[1:]))
  value = initialize(init, key, table.vocabulary_axis, count, axes, dtype)
  return value.order_as(table.vocabulary_axis, *axes).data_array.astype(dtype)


def check_key(key: Any, init: Init) -> jax.Array:
  if not isinstance(key, jax.Array):
    raise TypeError(
      f"`init={init!r}` draws random numbers: pass a random key, e.g."
      f" `key=jax.random.key(0)`; got key={key!r}."
    )
  return key


@functools.partial(jax.jit, static_argnums=(1, 2))
def token_stats(rows, vocab_size: int, padding_index: int | None):
  """The float32 mean row of the token rows (the pad row left out), and
  the standard deviation of their entries. Masked, not sliced: the rows
  may be split over devices at any boundary."""
  _check_has_tokens(vocab_size, padding_index)
  ids = jnp.arange(rows.shape[0])
  mask = (ids < vocab_size) & (
    ids != (-1 if padding_index is None else padding_index)
  )
  mask = mask.reshape(-1, *([1] * (rows.ndim - 1)))
  values = jnp.where(mask, rows.astype(jnp.float32), 0.0)
  count = jnp.sum(mask).astype(jnp.float32)
  mean_row = jnp.sum(values, axis=0) / count
  mean = jnp.sum(mean_row) / mean_row.size
  square = jnp.where(mask, jnp.square(values - mean), 0.0)
  return mean_row, jnp.sqrt(jnp.sum(square) / (count * mean_row.size))


def _check_has_tokens(vocab_size: int, padding_index: int | None) -> None:
  if vocab_size == 1 and padding_index == 0:
    raise ValueError(
      "The table has no token rows besides the pad row to take the mean or"
      " the spread of; pass `init='zeros'`, an initializer or rows."
    )


def source_token_stats(table: Any) -> tuple[jax.Array, jax.Array]:
  """`token_stats` of any kind of table, from its rows as lookups read them
  (dequantised, adapters added), one chunk at a time on the devices that
  hold them (`named_embed._src.tools.row_scan`): the float table is never built.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools.new_rows import source_token_stats
  >>> q = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[0, 0], [1, 2], [3, 4]], np.float32), padding_index=0
  ... ).quantized()
  >>> mean, std = source_token_stats(q)
  >>> mean.round(1).tolist(), round(float(std), 1)
  ([2.0, 3.0], 1.1)
  """
  _check_has_tokens(table.vocab_size, table.padding_index)
  source, arrays = table.row_parts()
  chunk = row_scan.chunk_rows(source, source.num_rows)
  facts = (table.vocab_size, table.padding_index, chunk)
  total, count = _token_sums(arrays, source, table.rows_sharding, *facts)
  mean_row = total / count
  mean = jnp.sum(mean_row) / mean_row.size
  square = _token_squares(arrays, mean, source, table.rows_sharding, *facts)
  std = jnp.sqrt(square / (count * mean_row.size))
  return mean_row.reshape(source.row_shape), std


def _token_mask(ids, vocab_size, padding_index):
  pad = -1 if padding_index is None else padding_index
  return (ids < vocab_size) & (ids != pad)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _token_sums(
  arrays, source, rows_sharding, vocab_size, padding_index, chunk
):
  """The float32 sum of the token rows (pad row left out) and their count."""
  arrays = row_source.prepare(source, arrays, rows_sharding)
  width = math.prod(source.row_shape)

  def body(reader, offset, axis):
    def step(total, start, size):
      rows = reader.rows(start, size).astype(jnp.float32)
      ids = offset + start + jnp.arange(size)
      keep = _token_mask(ids, vocab_size, padding_index)[:, None]
      return total + jnp.sum(jnp.where(keep, rows, 0.0), axis=0)

    rows = reader.num_rows
    total = row_scan.fold_chunks(
      step, jnp.zeros((width,), jnp.float32), rows, min(chunk, rows)
    )
    return total if axis is None else lax.psum(total, axis)

  count = vocab_size - (padding_index is not None)
  total = row_scan.over_shards(body, source, arrays, rows_sharding)
  return total, jnp.float32(count)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _token_squares(
  arrays, mean, source, rows_sharding, vocab_size, padding_index, chunk
):
  """The float32 sum of squared deviations from ``mean`` of the entries of
  the token rows (pad row left out)."""
  arrays = row_source.prepare(source, arrays, rows_sharding)

  def body(reader, offset, axis, mean):
    def step(total, start, size):
      rows = reader.rows(start, size).astype(jnp.float32)
      ids = offset + start + jnp.arange(size)
      keep = _token_mask(ids, vocab_size, padding_index)[:, None]
      return total + jnp.sum(jnp.where(keep, jnp.square(rows - mean), 0.0))

    rows = reader.num_rows
    total = row_scan.fold_chunks(
      step, jnp.zeros((), jnp.float32), rows, min(chunk, rows)
    )
    return total if axis is None else lax.psum(total, axis)

  return row_scan.over_shards(body, source, arrays, rows_sharding, mean)
