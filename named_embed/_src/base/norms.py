"""Row p-norms and torch's ``max_norm`` renormalisation, on raw arrays."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

RENORM_EPS = 1e-7
"""torch's ``embedding_renorm_`` adds this to the norm before dividing."""


def accumulation_dtype(dtype: object) -> np.dtype:
  """float64 for float64 input, float32 for every narrower float."""
  return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def row_norms(rows: jax.Array, norm_type: float, n_row_axes: int) -> jax.Array:
  """p-norm over the last ``rows.ndim - n_row_axes`` axes, in float32 or wider.

  Follows ``torch.linalg.vector_norm``: ``inf`` is the largest magnitude,
  ``-inf`` the smallest, ``0`` counts the non-zero entries, any other p is
  ``sum(|x|**p) ** (1/p)``.
  """
  axes = tuple(range(n_row_axes, rows.ndim))
  magnitudes = jnp.abs(rows.astype(accumulation_dtype(rows.dtype)))
  if norm_type == math.inf:
    return jnp.max(magnitudes, axis=axes)
  if norm_type == -math.inf:
    return jnp.min(magnitudes, axis=axes)
  if norm_type == 0:
    return jnp.sum(magnitudes != 0, axis=axes, dtype=magnitudes.dtype)
  if norm_type == 1:
    return jnp.sum(magnitudes, axis=axes)
  if norm_type == 2:
    return jnp.sqrt(jnp.sum(magnitudes * magnitudes, axis=axes))
  total = jnp.sum(magnitudes**norm_type, axis=axes)
  return total ** (1.0 / norm_type)


def renorm_scale(
  rows: jax.Array, max_norm: float, norm_type: float, n_row_axes: int
) -> jax.Array:
  """Per-row factor: ``max_norm / (norm + 1e-7)`` where ``norm > max_norm``.

  The result has shape ``rows.shape[:n_row_axes]`` plus singleton axes, so it
  broadcasts against ``rows``; its dtype is `accumulation_dtype`.
  """
  norms = row_norms(rows, norm_type, n_row_axes)
  scale = jnp.where(
    norms > max_norm, max_norm / (norms + RENORM_EPS), jnp.ones_like(norms)
  )
  scale = scale.reshape(scale.shape + (1,) * (rows.ndim - n_row_axes))
  return scale


def renorm_rows(
  rows: jax.Array, max_norm: float, norm_type: float
) -> jax.Array:
  """Scales every row (axis 0) of ``rows`` whose norm exceeds ``max_norm``."""
  scale = renorm_scale(rows, max_norm, norm_type, 1)
  return (rows.astype(scale.dtype) * scale).astype(rows.dtype)
