"""Symmetric integer quantisation of table rows, on raw arrays.

One layout for both schemes (`SCHEMES`): the rows ``[V, *embedding]`` are
cut into groups along the *last* embedding axis (``group_size`` values a
group; None: the whole row is one group), each group gets one float32
scale ``s = max|x| / q_max``, and each value is stored as the integer
``q = round(x / s)`` in ``[-q_max, q_max]`` (``q_max`` is 127 for int8, 7
for int4), so ``x ~ s * q`` with an error of at most ``s / 2`` (for int8,
``max|x| / 254``).

- ``codes``: int8 ``[V, *embedding]``; for int4, uint8 ``[V, *others,
  last / 2]``: two values a byte, two's complement, byte ``j`` holding
  value ``j`` in its low nibble and value ``j + last / 2`` in its high
  nibble (unpacking is then two shifts and a concatenation: an
  interleaved layout, neighbours in one byte, was 1.37x a float32 gather
  against 1.08x for this one, measured at 131072 x 1024);
- ``scales``: float32 ``[V]`` (one group a row) or ``[V, *others,
  last / group_size]``.

Rows are dequantised only where they are read: `dequantize` takes codes
and scales of any leading shape (gathered rows, or one vocabulary chunk),
so no kernel ever holds a float copy of the whole table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = {"int8": 8, "int4": 4}
"""The quantisation schemes and their bits a value."""


def q_max(bits: int) -> int:
  """The largest code: 127 for int8, 7 for int4 (symmetric ranges)."""
  return 2 ** (bits - 1) - 1


def _grouped(x: jax.Array, group_size: int | None, n_lead: int):
  """``x [*lead, *embedding]`` with its last axis split into groups:
  ``[*lead, *others, groups, group_size]``, or ``[*lead, E]`` for one group
  a row."""
  if group_size is None:
    return x.reshape(*x.shape[:n_lead], -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quantize(rows: jax.Array, bits: int, group_size: int | None):
  """``(codes, scales)`` of ``rows`` ``[V, *embedding]`` (see the module
  docstring). Arithmetic is float32; all-zero groups get scale 0."""
  x = _grouped(rows.astype(jnp.float32), group_size, 1)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scales = amax / jnp.float32(q_max(bits))
  safe = jnp.where(scales > 0, scales, jnp.ones_like(scales))
  limit = jnp.float32(q_max(bits))
  q = jnp.clip(jnp.round(x / safe[..., None]), -limit, limit)
  q = q.astype(jnp.int8).reshape(rows.shape)
  if bits == 4:
    q = pack_int4(q)
  return q, scales


def pack_int4(q: jax.Array) -> jax.Array:
  """int8 values in ``[-8, 7]`` ``[..., 2n]`` to uint8 ``[..., n]``: value
  ``j`` in the low nibble of byte ``j``, value ``n + j`` in its high
  nibble."""
  n = q.shape[-1] // 2
  low = q[..., :n].astype(jnp.uint8) & jnp.uint8(0x0F)
  high = q[..., n:].astype(jnp.uint8) & jnp.uint8(0x0F)
  return low | (high << jnp.uint8(4))


def unpack_int4(packed: jax.Array) -> jax.Array:
  """The inverse of `pack_int4`: int8 ``[..., 2n]``, sign-extended."""
  signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
  low = jax.lax.shift_right_arithmetic(
    jax.lax.shift_left(signed, jnp.int8(4)), jnp.int8(4)
  )
  high = jax.lax.shift_right_arithmetic(signed, jnp.int8(4))
  return jnp.concatenate([low, high], axis=-1)


def dequantize(
  codes: jax.Array,
  scales: jax.Array,
  bits: int,
  group_size: int | None,
  dtype: jax.typing.DTypeLike,
) -> jax.Array:
  """Float rows from codes and scales with any leading shape ``lead``
  (``scales.shape`` starts with it): ``[*lead, *embedding]`` in ``dtype``."""
  q = unpack_int4(codes) if bits == 4 else codes
  x = _grouped(q.astype(jnp.float32), group_size, scales.ndim)
  x = x * scales[..., None]
  return x.reshape(q.shape).astype(dtype)


def check_finite(rows: jax.Array) -> None:
  """Raises ValueError when concrete ``rows`` hold a NaN or infinity (their
  scale would be NaN or infinite); traced rows are not checked."""
  if isinstance(rows, jax.core.Tracer):
    return
  finite = np.asarray(
    jnp.all(jnp.isfinite(rows), axis=tuple(range(1, rows.ndim)))
  )
  if not finite.all():
    bad = np.flatnonzero(~finite)
    listed = ", ".join(str(int(i)) for i in bad[:8])
    more = f" and {bad.size - 8} more" if bad.size > 8 else ""
    raise ValueError(
      f"Cannot quantise a table with NaN or infinite values: rows {listed}"
      f"{more}. Fix or zero those rows first."
    )
