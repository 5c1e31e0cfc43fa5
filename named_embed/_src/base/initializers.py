"""Initialisers for embedding tables: penzai-style and `jax.nn.initializers`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from penzai import pz

default_initializer = functools.partial(
  pz.nn.variance_scaling_initializer,
  scale=1.0,
  mode="fan_out",
  distribution="normal",
)
"""Penzai's embedding default: normal, std ``1/sqrt(prod(embedding sizes))``."""


def _is_penzai_style(initializer: Callable[..., Any]) -> bool:
  """True if ``initializer`` takes penzai's named-axis keyword arguments."""
  try:
    parameters = inspect.signature(initializer).parameters
  except (TypeError, ValueError):
    return False
  return "parallel_axes" in parameters or "output_axes" in parameters


def initialize(
  initializer: Callable[..., Any],
  key: jax.Array,
  vocabulary_axis: str,
  vocab_size: int,
  embedding_axes: Mapping[str, int],
  dtype: np.dtype,
) -> pz.nx.NamedArray:
  """Calls ``initializer`` and returns a ``[vocabulary, *embedding]`` array.

  Penzai initialisers see the vocabulary as a parallel axis and the
  embedding axes as output axes; ``jax.nn.initializers`` functions get the
  shape ``(vocab_size, *embedding sizes)``.
  """
  order = (vocabulary_axis, *embedding_axes)
  shape = (vocab_size, *embedding_axes.values())
  if _is_penzai_style(initializer):
    value = initializer(
      key,
      input_axes={},
      output_axes=dict(embedding_axes),
      parallel_axes={vocabulary_axis: vocab_size},
      convolution_spatial_axes={},
      dtype=dtype,
    )
  else:
    value = initializer(key, shape, dtype)
  if isinstance(value, pz.nx.NamedArrayBase):
    if dict(value.named_shape) != dict(zip(order, shape)):
      raise ValueError(
        f"The initializer returned axes {dict(value.named_shape)}; expected"
        f" {dict(zip(order, shape))}."
      )
    return value.order_as(*order)
  if tuple(value.shape) != shape:
    raise ValueError(
      f"The initializer returned shape {tuple(value.shape)}; expected {shape}"
      f" for axes {order}."
    )
  return pz.nx.wrap(value, *order)
