"""Argument checks shared by the constructors, layers and functions.

One rule for every check: a `TypeError` when the argument has the wrong
*type* (a string where a number is expected, a bool where an int is, a
float where an int is), a `ValueError` when the type is right but the
*value* is not (a negative size, an unknown policy name, a NaN). Each
message names the argument, shows the value, and says what was expected.

>>> check_number("label_smoothing", "0.1", minimum=0.0, maximum=1.0)
Traceback (most recent call last):
  ...
TypeError: `label_smoothing` must be a number, got '0.1'.
>>> check_number("label_smoothing", 1.5, minimum=0.0, maximum=1.0)
Traceback (most recent call last):
  ...
ValueError: `label_smoothing` must be in [0, 1], got 1.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def _is_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_positive_int(argument: str, value: Any) -> int:
  """Returns ``value`` as an int, raising unless it is a positive int."""
  if not _is_int(value):
    raise TypeError(f"`{argument}` must be a positive int, got {value!r}.")
  if value <= 0:
    raise ValueError(f"`{argument}` must be a positive int, got {value}.")
  return int(value)


def check_optional_positive_int(argument: str, value: Any) -> int | None:
  """`check_positive_int`, letting None through."""
  return None if value is None else check_positive_int(argument, value)


def check_bool(argument: str, value: Any) -> bool:
  """Returns ``value``, raising `TypeError` unless it is a bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{argument}` must be a bool, got {value!r}.")
  return bool(value)


def check_choice(argument: str, value: Any, choices: Sequence[str]) -> str:
  """Returns ``value`` if it is one of the strings ``choices``."""
  if not isinstance(value, str):
    raise TypeError(
      f"`{argument}` must be one of {tuple(choices)}, got {value!r}."
    )
  if value not in choices:
    raise ValueError(
      f"`{argument}` must be one of {tuple(choices)}, got {value!r}."
    )
  return value


def check_number(
  argument: str,
  value: Any,
  *,
  minimum: float | None = None,
  maximum: float | None = None,
  positive: bool = False,
  finite: bool = False,
) -> float:
  """Returns ``value`` as a float, raising unless it is a real number in
  range (``[minimum, maximum]``, ``> 0`` if ``positive``, finite if
  ``finite``). NaN is never accepted."""
  if isinstance(value, bool) or not isinstance(
    value, (int, float, np.integer, np.floating)
  ):
    raise TypeError(f"`{argument}` must be a number, got {value!r}.")
  value = float(value)
  if math.isnan(value):
    raise ValueError(f"`{argument}` must not be NaN.")
  if finite and not math.isfinite(value):
    raise ValueError(f"`{argument}` must be finite, got {value}.")
  if positive and not value > 0:
    raise ValueError(f"`{argument}` must be positive, got {value}.")
  if minimum is not None and maximum is not None:
    if not minimum <= value <= maximum:
      raise ValueError(
        f"`{argument}` must be in [{minimum:g}, {maximum:g}], got {value}."
      )
  elif minimum is not None and not value >= minimum:
    expected = "non-negative" if minimum == 0 else f"at least {minimum:g}"
    raise ValueError(f"`{argument}` must be {expected}, got {value}.")
  elif maximum is not None and not value <= maximum:
    raise ValueError(f"`{argument}` must be at most {maximum:g}, got {value}.")
  return value


def check_renorm(max_norm: Any, norm_type: Any) -> tuple[float | None, float]:
  """Validates the ``max_norm`` (None, or a non-negative number) and
  ``norm_type`` (any number but NaN) of a renorm."""
  if max_norm is not None:
    max_norm = check_number("max_norm", max_norm, minimum=0.0)
  return max_norm, check_number("norm_type", norm_type)


def check_soft_cap(soft_cap: Any) -> float | None:
  """Validates a logit ``soft_cap``: None, or a positive finite number."""
  if soft_cap is None:
    return None
  return check_number("soft_cap", soft_cap, positive=True, finite=True)


def check_float_dtype(argument: str, dtype: Any) -> np.dtype:
  """Returns ``dtype`` as a numpy dtype, raising unless it is floating."""
  try:
    dtype = np.dtype(dtype)
  except TypeError:
    raise TypeError(
      f"`{argument}` must be a floating dtype (float32, bfloat16, ...),"
      f" got {dtype!r}."
    ) from None
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
  if not isinstance(embedding_axes, Mapping):
    raise TypeError(
      "`embedding_axes` must be a dict of axis names to sizes, e.g."
      f" {{'embedding': 64}}; got {embedding_axes!r}."
    )
  if not embedding_axes:
    raise ValueError(
      "`embedding_axes` must name at least one axis, e.g."
      " {'embedding': 64}; got an empty dict."
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
  """Maps the pad token's row ``padding_index`` in ``[-V, V)`` to
  ``[0, V)``, as torch does."""
  if padding_index is None:
    return None
  if not _is_int(padding_index):
    raise TypeError(
      f"`padding_index` must be an int or None, got {padding_index!r}."
    )
  if not -vocab_size <= padding_index < vocab_size:
    raise ValueError(
      f"`padding_index` {padding_index} is outside [-{vocab_size},"
      f" {vocab_size}) for a vocabulary of {vocab_size} tokens."
    )
  return int(padding_index) % vocab_size


def check_name(argument: str, value: Any) -> str:
  """Returns ``value`` if it is a non-empty string (a parameter label
  prefix, an axis name)."""
  if not isinstance(value, str):
    raise TypeError(f"`{argument}` must be a string, got {value!r}.")
  if not value:
    raise ValueError(f"`{argument}` must be a non-empty string.")
  return value
