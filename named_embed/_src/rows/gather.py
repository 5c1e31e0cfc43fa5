"""The row-gathering kernel and its gradient rules, on raw arrays.

Every lookup goes through `gather_rows`: the out-of-range policy (whose
id mapping is `range_policy`'s), the pad token row, ``max_norm`` and
``scale_grad_by_freq`` are applied once, here. Layout: ``table`` is
``[V, *embedding]``, ``ids`` has any shape, the result is
``[*ids.shape, *embedding]`` (token axes first, as ``jnp.take`` gives; no
transpose of the table, ever).

How each rule costs no more than its own arithmetic:

- ids are first mapped to in-range ``safe`` ids, so the gather itself runs
  with ``mode="promise_in_bounds"`` (the fastest formulation, and the one
  whose gradient is a plain scatter-add);
- ``"fill"`` adds one select on the output's bits (NaN rows; backwards, a
  select keeps their gradient away from the table);
- the pad token row and ``scale_grad_by_freq`` only reweight the *gradient*: a
  custom_vjp that is the identity forwards and multiplies the cotangent by
  a per-token weight backwards;
- ``max_norm`` scales rows forwards and passes the cotangent through
  unchanged backwards (torch's renorm happens outside autograd).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from named_embed._src.base import (
  mesh_layout,
  norms,
  range_policy,
  static,
  validation,
)
from named_embed._src.rows import row_source

STRATEGIES = ("gather", "one_hot")


@dataclasses.dataclass(frozen=True, eq=False)
class LookupConfig(static.Static):
  """Static configuration of a lookup (hashable: a jit cache key).

  Attributes:
    out_of_range: One of `named_embed._src.base.range_policy.POLICIES`.
    padding_index: The pad token's row, which receives no gradient, in
      ``[0, V)``, or None.
    max_norm: Renorm bound, or None.
    norm_type: p of the renorm p-norm.
    scale_grad_by_freq: Divide each row's gradient by its count.
    dtype: Compute dtype of the returned rows, or None for the table's.
    frozen: Stop the table's gradient.
    runtime_check: Check ids inside the kernel (``"error"`` on traced ids).
    strategy: ``"gather"`` (index the rows) or ``"one_hot"`` (contract a
      one-hot ``[tokens, V]`` matrix with the table: a matmul forwards and
      backwards, no scatter).
    vocab_size: Number of tokens when the table has alignment rows at the
      end (`EmbeddingTable.padded_to_multiple`); None when every row is a
      token.
    rows_sharding: The table's recorded `NamedSharding` (see
      `EmbeddingTable.rows_sharding`), or None.
  """

  out_of_range: str = "fill"
  padding_index: int | None = None
  max_norm: float | None = None
  norm_type: float = 2.0
  scale_grad_by_freq: bool = False
  dtype: np.dtype | None = None
  frozen: bool = False
  runtime_check: bool = False
  strategy: str = "gather"
  vocab_size: int | None = None
  rows_sharding: object = None


@functools.lru_cache(maxsize=256, typed=True)
def lookup_config(
  out_of_range: str = "fill",
  max_norm: float | None = None,
  norm_type: float = 2.0,
  scale_grad_by_freq: bool = False,
  dtype: object = None,
  strategy: str = "gather",
) -> LookupConfig:
  """Validates a lookup's options, once per distinct combination, into a
  `LookupConfig` (the table's fields are filled in per call).

  Raises:
    ValueError: for an unknown ``out_of_range`` or ``strategy``, or a
      negative ``max_norm``.
    TypeError: for options of the wrong type.
  """
  max_norm, norm_type = validation.check_renorm(max_norm, norm_type)
  return LookupConfig(
    out_of_range=range_policy.check_policy(out_of_range),
    max_norm=max_norm,
    norm_type=norm_type,
    scale_grad_by_freq=validation.check_bool(
      "scale_grad_by_freq", scale_grad_by_freq
    ),
    dtype=None
    if dtype is None
    else validation.check_float_dtype("dtype", dtype),
    strategy=validation.check_choice("strategy", strategy, STRATEGIES),
  )


@jax.custom_vjp
def _scale_gradient(rows: jax.Array, weight: jax.Array) -> jax.Array:
  """Identity on ``rows``; multiplies the cotangent by ``weight`` per token."""
  del weight
  return rows


def _scale_gradient_fwd(rows, weight):
  return rows, weight


def _scale_gradient_bwd(weight, g):
  expanded = weight.reshape(weight.shape + (1,) * (g.ndim - weight.ndim))
  accumulate = norms.accumulation_dtype(g.dtype)
  scaled = g.astype(accumulate) * expanded.astype(accumulate)
  return scaled.astype(g.dtype), jnp.zeros_like(weight)


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


@jax.custom_vjp
def _fill_nan(rows: jax.Array, keep: jax.Array) -> jax.Array:
  """``rows`` where ``keep``, else NaN; the cotangent of dropped rows is 0.

  For 16-bit floats the select runs on the raw bits: XLA:CPU would
  otherwise widen bf16 rows to f32 and back for a float select (measured:
  the gather ran at half speed).
  """
  if jnp.dtype(rows.dtype).itemsize != 2:
    return jnp.where(keep, rows, jnp.full((), jnp.nan, rows.dtype))
  bits = jnp.uint16
  raw = jax.lax.bitcast_convert_type(rows, bits)
  nan = jax.lax.bitcast_convert_type(jnp.full((), jnp.nan, rows.dtype), bits)
  return jax.lax.bitcast_convert_type(jnp.where(keep, raw, nan), rows.dtype)


def _fill_nan_fwd(rows, keep):
  return _fill_nan(rows, keep), keep


def _fill_nan_bwd(keep, g):
  return jnp.where(keep, g, jnp.zeros((), g.dtype)), None


_fill_nan.defvjp(_fill_nan_fwd, _fill_nan_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _renorm_straight_through(rows, max_norm, norm_type, n_token_axes):
  """Rows scaled down to ``max_norm``; gradient as if unscaled."""
  scale = norms.renorm_scale(rows, max_norm, norm_type, n_token_axes)
  return (rows.astype(scale.dtype) * scale).astype(rows.dtype)


def _renorm_fwd(rows, max_norm, norm_type, n_token_axes):
  return _renorm_straight_through(rows, max_norm, norm_type, n_token_axes), None


def _renorm_bwd(max_norm, norm_type, n_token_axes, residual, g):
  del max_norm, norm_type, n_token_axes, residual
  return (g,)


_renorm_straight_through.defvjp(_renorm_fwd, _renorm_bwd)


def _gradient_weight(
  safe: jax.Array,
  valid: jax.Array | None,
  vocab_size: int,
  policy: LookupConfig,
) -> jax.Array | None:
  """Per-token gradient weight: 0 on the padding row, 1/count by frequency.

  Counts are of rows actually read; ids dropped by ``"fill"`` count for
  nothing.
  """
  weight = None
  if policy.scale_grad_by_freq:
    ones = jnp.ones((), jnp.int32) if valid is None else valid.astype(jnp.int32)
    ones = jnp.broadcast_to(ones, safe.shape)
    counts = jnp.zeros((vocab_size,), jnp.int32).at[safe].add(ones)[safe]
    # Ids dropped by "fill" may read a row nobody counted: weight 0, not
    # 1/0 (their cotangent is already 0, and 0 * inf would be NaN).
    weight = jnp.where(
      counts > 0, 1.0 / jnp.maximum(counts, 1).astype(jnp.float32), 0.0
    )
  if policy.padding_index is not None:
    keep = safe != policy.padding_index
    if weight is None:
      weight = keep.astype(jnp.float32)
    else:
      weight = jnp.where(keep, weight, jnp.zeros_like(weight))
  return weight


def renorm(rows: jax.Array, policy: LookupConfig, n_token_axes: int):
  """``rows`` scaled down to ``policy.max_norm`` (unchanged when it is None),
  with the gradient as if unscaled: the rule every lookup applies, for
  kernels that read rows themselves (pooled lookups)."""
  if policy.max_norm is None:
    return rows
  return _renorm_straight_through(
    rows, policy.max_norm, policy.norm_type, n_token_axes
  )


def gradient_weight(
  safe: jax.Array, valid: jax.Array | None, num_rows: int, policy: LookupConfig
) -> jax.Array | None:
  """The per-token gradient weight of a lookup (0 on the padding row,
  1/count under ``scale_grad_by_freq``, counted over the tokens where
  ``valid``), for kernels that write row gradients themselves."""
  return _gradient_weight(safe, valid, num_rows, policy)


def gather_rows(
  arrays: tuple,
  ids: jax.Array,
  policy: LookupConfig,
  source: row_source.RowSource,
):
  """Looks up ``ids`` in a table given as its row source and arrays
  (`named_embed._src.rows.row_source`) under ``policy``: the source makes the rows
  of the safe ids (`RowSource.gather`, or `RowSource.one_hot` under the
  ``"one_hot"`` strategy), and every rule applies to those rows."""
  num_rows = source.num_rows
  vocab_size = policy.vocab_size or num_rows
  sharded = mesh_layout.spans_devices(*arrays, ids) or mesh_layout.splits(
    policy.rows_sharding
  )
  arrays = source.prepare(arrays, policy.rows_sharding)
  safe, valid = range_policy.safe_ids(
    ids, vocab_size, policy.out_of_range, policy.runtime_check, sharded
  )
  if policy.strategy == "one_hot":
    rows = source.one_hot(arrays, safe)
  else:
    rows = source.gather(arrays, safe)
  if policy.max_norm is not None:
    rows = _renorm_straight_through(
      rows, policy.max_norm, policy.norm_type, ids.ndim
    )
  weight = _gradient_weight(safe, valid, num_rows, policy)
  if weight is not None:
    rows = _scale_gradient(rows, weight)
  if valid is not None:
    mask = valid.reshape(valid.shape + (1,) * (rows.ndim - valid.ndim))
    rows = _fill_nan(rows, mask)
  if policy.dtype is not None:
    rows = rows.astype(policy.dtype)
  return rows


def compile_gather(
  policy: LookupConfig, scope: str, source: row_source.RowSource
):
  """`gather_rows` under ``policy`` and ``source``, jitted.

  Inlined under an outer `jax.jit`; an executable when called eagerly. The
  policy and source are closed over rather than passed to `jax.jit` as
  static arguments: the jitted call sees only the arrays. Callers cache
  the result (the lookup's per-call plan).
  """

  def gather_rows_kernel(arrays, ids):
    with jax.named_scope(scope):
      return gather_rows(arrays, ids, policy, source)

  return jax.jit(gather_rows_kernel)
