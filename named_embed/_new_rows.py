"""How the rows added to a table start: ``init=`` of the resizing methods.

``"mean"`` (the float32 mean of the token rows, the pad row left out),
``"zeros"``, ``"normal"`` (the spread of the token rows), an initializer
``(key, shape, dtype)`` or penzai-style, or an array of the rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from named_embed._initializers import initialize
from named_embed._validation import check_choice
from named_embed.table import EmbeddingTable

INITS = ("mean", "zeros", "normal")
"""The named ways to initialise new rows."""

Init = str | Callable[..., Any] | np.ndarray | jax.Array


def new_rows(
  table: EmbeddingTable,
  rows: jax.Array,
  count: int,
  init: Init,
  key: jax.Array | None,
) -> jax.Array:
  """``count`` new rows in the table's dtype, initialised by ``init``."""
  shape = (count, *rows.shape[1:])
  dtype = rows.dtype
  if isinstance(init, str):
    check_choice("init", init, INITS)
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
  stats = functools.partial(
    token_stats, rows, table.vocab_size, table.padding_index
  )
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
  if vocab_size == 1 and padding_index == 0:
    raise ValueError(
      "The table has no token rows besides the pad row to take the mean or"
      " the spread of; pass `init='zeros'`, an initializer or rows."
    )
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
