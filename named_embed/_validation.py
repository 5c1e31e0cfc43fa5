"""Argument checks shared by the constructors and layers.

Each raises with a message that names the argument, shows the value, and
says what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def check_positive_int(argument: str, value: Any) -> int:
  """Raises unless ``value`` is a positive Python int."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{argument}` must be a positive int, got {value!r}.")
  if value <= 0:
    raise ValueError(f"`{argument}` must be a positive int, got {value}.")
  return int(value)


def check_float_dtype(argument: str, dtype: Any) -> np.dtype:
  """Returns ``dtype`` as a numpy dtype, raising unless it is floating."""
  dtype = np.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f"`{argument}` must be a floating dtype (float32, bfloat16, ...),"
      f" got {dtype}."
    )
  return dtype


def check_embedding_axes(
  embedding_axes: Mapping[str, int], vocabulary_axis: str
) -> dict[str, int]:
  """Validates ``embedding_axes`` against the vocabulary axis name."""
  if not isinstance(embedding_axes, Mapping) or not embedding_axes:
    raise ValueError(
      "`embedding_axes` must be a non-empty dict of axis names to sizes,"
      f" e.g. {{'embedding': 64}}; got {embedding_axes!r}."
    )
  if vocabulary_axis in embedding_axes:
    raise ValueError(
      f"`vocabulary_axis` {vocabulary_axis!r} must not appear in"
      f" `embedding_axes` {dict(embedding_axes)}: the vocabulary axis is"
      " indexed by token ids, the embedding axes are what each row holds."
    )
  for name, size in embedding_axes.items():
    if not isinstance(name, str):
      raise TypeError(
        f"`embedding_axes` names must be strings, got {name!r} in"
        f" {dict(embedding_axes)}."
      )
    check_positive_int(f"embedding_axes[{name!r}]", size)
  return {name: int(size) for name, size in embedding_axes.items()}


def resolve_padding_index(padding_index: Any, vocab_size: int) -> int | None:
  """Maps ``padding_index`` in ``[-V, V)`` to ``[0, V)``, as torch does."""
  if padding_index is None:
    return None
  if isinstance(padding_index, bool) or not isinstance(
    padding_index, (int, np.integer)
  ):
    raise TypeError(
      f"`padding_index` must be an int or None, got {padding_index!r}."
    )
  if not -vocab_size <= padding_index < vocab_size:
    raise ValueError(
      f"`padding_index` {padding_index} is outside [-{vocab_size},"
      f" {vocab_size}) for a vocabulary of size {vocab_size}."
    )
  return int(padding_index) % vocab_size
