"""Tests for `named_embed._src.ops.loss`: the chunked loss equals the naive one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raw
from penzai import pz

import named_embed as ne

V, D, N = 37, 6, 10
RNG = np.random.default_rng(0)
W = RNG.normal(size=(V, D)).astype(np.float32)
H = RNG.normal(size=(2, N // 2, D)).astype(np.float32)
T = RNG.integers(0, V, size=(2, N // 2))


def naive(w, h, t, *, soft_cap=None, eps=0.0, z=0.0, mask=None, reduce="mean"):
  """The textbook computation on raw arrays: full logits, log_softmax."""
  logits = jnp.einsum("bsd,vd->bsv", h, w)
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
  smooth = -jnp.mean(logp, axis=-1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  loss = (1 - eps) * nll + eps * smooth + z * lse**2
  if mask is not None:
    loss = jnp.where(mask, loss, 0.0)
  if reduce == "none":
    return loss
  if reduce == "sum":
    return jnp.sum(loss)
  count = loss.size if mask is None else jnp.sum(mask).astype(loss.dtype)
  return jnp.sum(loss) / count


def trainable(rows=W):
  return pz.freeze_params(ne.EmbeddingTable.from_pretrained(rows, freeze=False))


def named(h=H, t=T):
  return (
    pz.nx.wrap(h).tag("batch", "seq", "embedding"),
    pz.nx.wrap(t).tag("batch", "seq"),
  )


OPTIONS = [
  dict(),
  dict(soft_cap=2.0),
  dict(label_smoothing=0.1),
  dict(z_loss=1e-2),
  dict(soft_cap=3.0, label_smoothing=0.2, z_loss=1e-3),
]


@pytest.mark.parametrize(
  "options, chunk_size",
  [(options, 8) for options in OPTIONS]
  + [(OPTIONS[0], None), (OPTIONS[0], V), (OPTIONS[4], 5)],
)
def test_value_and_gradients_equal_naive(run, options, chunk_size):
  hidden, targets = named()

  def ours(table, hidden):
    return ne.decode_cross_entropy(
      table, hidden, targets, chunk_size=chunk_size, **options
    )

  def reference(w, h):
    return naive(
      w,
      h,
      T,
      soft_cap=options.get("soft_cap"),
      eps=options.get("label_smoothing", 0.0),
      z=options.get("z_loss", 0.0),
    )

  value, (g_table, g_hidden) = run(
    jax.value_and_grad(ours, argnums=(0, 1)), trainable(), hidden
  )
  ref_value, (ref_w, ref_h) = jax.value_and_grad(reference, argnums=(0, 1))(
    W, H
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(g_table.rows_array(), ref_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    raw(g_hidden, "batch", "seq", "embedding"), ref_h, rtol=1e-4, atol=1e-6
  )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_where_mask(run, reduction):
  hidden, targets = named()
  mask = RNG.random(size=T.shape) > 0.4
  where = pz.nx.wrap(mask).tag("batch", "seq")

  def ours(table):
    out = ne.decode_cross_entropy(
      table, hidden, targets, where=where, reduction=reduction, chunk_size=8
    )
    return out if reduction != "none" else out.order_as("batch", "seq")

  def reference(w):
    return naive(w, H, T, mask=mask, reduce=reduction)

  out = run(ours, trainable())
  expected = reference(W)
  if reduction == "none":
    assert out.named_shape == {"batch": 2, "seq": N // 2}
    out = out.data_array
  np.testing.assert_allclose(out, expected, rtol=1e-5)

  def scalar(f):
    return lambda w: jnp.sum(f(w).data_array if reduction == "none" else f(w))

  grad = run(jax.grad(scalar(ours)), trainable())
  np.testing.assert_allclose(
    grad.rows_array(),
    jax.grad(lambda w: jnp.sum(reference(w)))(W),
    rtol=1e-4,
    atol=1e-6,
  )


def test_fill_gives_nan_at_bad_targets_and_no_gradient_from_them(run):
  bad = T.copy()
  bad[0, 1] = V
  bad[1, 2] = -1
  hidden, targets = named(t=bad)

  def per_position(table):
    return ne.decode_cross_entropy(
      table, hidden, targets, reduction="none"
    ).order_as("batch", "seq")

  out = np.asarray(run(per_position, trainable()).data_array)
  assert np.isnan(out[0, 1]) and np.isnan(out[1, 2])
  good = np.ones_like(bad, bool)
  good[0, 1] = good[1, 2] = False
  np.testing.assert_allclose(
    out[good],
    naive(W, H, np.clip(bad, 0, V - 1), reduce="none")[good],
    rtol=1e-5,
  )

  def masked_sum(table):
    losses = per_position(table).data_array
    return jnp.sum(jnp.where(jnp.asarray(good), losses, 0.0))

  grad = run(jax.grad(masked_sum), trainable()).rows_array()
  expected = jax.grad(
    lambda w: jnp.sum(
      jnp.where(good, naive(w, H, np.clip(bad, 0, V - 1), reduce="none"), 0.0)
    )
  )(W)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_where_mask_hides_out_of_range_targets_completely(run):
  bad = T.copy()
  bad[0, 0] = 10_000
  mask = np.ones_like(bad, bool)
  mask[0, 0] = False
  hidden, targets = named(t=bad)
  where = pz.nx.wrap(mask).tag("batch", "seq")
  for policy in ("fill", "error", "clip", "wrap"):

    def loss(table, hidden, policy=policy):
      return ne.decode_cross_entropy(
        table, hidden, targets, where=where, out_of_range=policy
      )

    value, (g_table, g_hidden) = run(
      jax.value_and_grad(loss, argnums=(0, 1)), trainable(), hidden
    )
    assert np.isfinite(value)
    np.testing.assert_allclose(
      value, naive(W, H, np.where(mask, bad, 0), mask=mask), rtol=1e-5
    )
    assert np.isfinite(np.asarray(g_table.rows_array())).all()
    np.testing.assert_array_equal(
      raw(g_hidden, "batch", "seq", "embedding")[0, 0], 0.0
    )


@pytest.mark.parametrize("policy", ["clip", "wrap"])
def test_clip_and_wrap_targets(policy):
  bad = T.copy()
  bad[1, 1] = V + 3
  bad[0, 3] = -2
  hidden, targets = named(t=bad)
  value = ne.decode_cross_entropy(
    trainable(), hidden, targets, out_of_range=policy
  )
  fixed = np.clip(bad, 0, V - 1) if policy == "clip" else np.mod(bad, V)
  np.testing.assert_allclose(value, naive(W, H, fixed), rtol=1e-5)


def test_error_policy_eager_and_jit():
  bad = T.copy()
  bad[1, 4] = V
  hidden, targets = named(t=bad)
  with pytest.raises(IndexError, match=r"id 37 at position \(9,\)"):
    ne.decode_cross_entropy(trainable(), hidden, targets, out_of_range="error")
  f = jax.jit(
    lambda t, h, y: ne.decode_cross_entropy(t, h, y, out_of_range="error")
  )
  good_hidden, good_targets = named()
  np.testing.assert_allclose(
    f(trainable(), good_hidden, good_targets), naive(W, H, T), rtol=1e-5
  )
  with pytest.raises(Exception, match="id 37"):
    jax.block_until_ready(f(trainable(), hidden, targets))


def test_multi_axis_table_and_decode_layer_soft_cap(run):
  rows = RNG.normal(size=(V, 2, 3)).astype(np.float32)
  table = pz.freeze_params(
    ne.EmbeddingTable.from_pretrained(
      rows, embedding_axes=("heads", "head_dim"), freeze=False
    )
  )
  h = RNG.normal(size=(N, 3, 2)).astype(np.float32)
  hidden = pz.nx.wrap(h).tag("seq", "head_dim", "heads")
  t = T.reshape(N)
  targets = pz.nx.wrap(t).tag("seq")
  layer = ne.EmbeddingDecode(table, soft_cap=4.0)

  def loss(table):
    return ne.decode_cross_entropy(
      ne.EmbeddingDecode(table, soft_cap=4.0), hidden, targets, chunk_size=16
    )

  flat_w = rows.reshape(V, 6)
  flat_h = h.transpose(0, 2, 1).reshape(1, N, 6)

  def reference(w):
    return naive(w, flat_h, t[None], soft_cap=4.0)

  np.testing.assert_allclose(run(loss, table), reference(flat_w), rtol=1e-5)
  np.testing.assert_allclose(
    run(jax.grad(loss), table).rows_array().reshape(V, 6),
    jax.grad(reference)(flat_w),
    rtol=1e-4,
    atol=1e-6,
  )
  assert layer.soft_cap == 4.0


def test_bfloat16_table_accumulates_in_float32():
  table = ne.EmbeddingTable.from_pretrained(jnp.asarray(W, jnp.bfloat16))
  hidden, targets = named(h=H.astype(jnp.bfloat16))
  value = ne.decode_cross_entropy(table, hidden, targets, chunk_size=8)
  assert value.dtype == jnp.bfloat16
  w32 = np.asarray(jnp.asarray(W, jnp.bfloat16), np.float32)
  h32 = np.asarray(jnp.asarray(H, jnp.bfloat16), np.float32)
  np.testing.assert_allclose(np.float32(value), naive(w32, h32, T), rtol=1e-2)


def test_tied_gradient_sums_lookup_and_loss():
  table = trainable()
  ids = pz.nx.wrap(T).tag("batch", "seq")
  targets = pz.nx.wrap(np.roll(T, 1)).tag("batch", "seq")

  def ours(table):
    hidden = ne.lookup(table, ids)
    return ne.decode_cross_entropy(table, hidden, targets, chunk_size=8)

  def reference(w):
    return naive(w, w[T], np.roll(T, 1))

  np.testing.assert_allclose(
    jax.grad(ours)(table).rows_array(),
    jax.grad(reference)(W),
    rtol=1e-4,
    atol=1e-6,
  )


def test_backward_never_builds_full_logits():
  hidden, targets = named()

  def loss(table, hidden):
    return ne.decode_cross_entropy(table, hidden, targets, chunk_size=8)

  jaxpr = str(
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(trainable(), hidden)
  )
  assert f"[{N},{V}]" not in jaxpr and f"{N},{V}]" not in jaxpr


@pytest.mark.parametrize(
  "kwargs, pattern",
  [
    (dict(chunk_size=0), r"`chunk_size` must be a positive int"),
    (dict(label_smoothing=1.5), r"`label_smoothing` must be in \[0, 1\]"),
    (dict(z_loss=-1.0), r"`z_loss` must be non-negative"),
    (dict(reduction="avg"), r"`reduction` must be one of"),
    (dict(out_of_range="ignore"), r"`out_of_range` must be one of"),
    (dict(soft_cap=-1.0), r"`soft_cap` must be positive"),
  ],
)
def test_bad_options(kwargs, pattern):
  hidden, targets = named()
  with pytest.raises(ValueError, match=pattern):
    ne.decode_cross_entropy(trainable(), hidden, targets, **kwargs)


def test_mismatched_targets_and_where_are_named_in_errors():
  hidden, _ = named()
  wrong = pz.nx.wrap(T.reshape(-1)).tag("tokens")
  with pytest.raises(ValueError, match=r"batch axes of `hidden`.*'tokens'"):
    ne.decode_cross_entropy(trainable(), hidden, wrong)
  _, targets = named()
  with pytest.raises(TypeError, match="`targets` must hold integer"):
    ne.decode_cross_entropy(
      trainable(), hidden, pz.nx.wrap(T.astype(np.float32)).tag("batch", "seq")
    )
  where = pz.nx.wrap(np.ones(T.shape, np.int32)).tag("batch", "seq")
  with pytest.raises(ValueError, match="`where` must be a boolean mask"):
    ne.decode_cross_entropy(trainable(), hidden, targets, where=where)


def test_compiled_temporary_memory_is_a_sixteenth_of_naive():
  n, v, d = 1024, 16384, 64
  w = jax.ShapeDtypeStruct((v, d), jnp.float32)
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)

  def ours(w, h, t):
    table = pz.freeze_params(ne.EmbeddingTable.from_pretrained(w, freeze=False))

    def loss(table, h):
      hidden = pz.nx.wrap(h).tag("token", "embedding")
      targets = pz.nx.wrap(t).tag("token")
      return ne.decode_cross_entropy(table, hidden, targets, chunk_size=1024)

    return jax.value_and_grad(loss, argnums=(0, 1))(table, h)

  def textbook(w, h, t):
    def loss(w, h):
      logp = jax.nn.log_softmax(h @ w.T)
      return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    return jax.value_and_grad(loss, argnums=(0, 1))(w, h)

  def temp_bytes(f):
    compiled = jax.jit(f).lower(w, h, t).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(ours) * 16 <= temp_bytes(textbook)


def test_plain_array_where_needs_names_unless_batch_axes_are_positional():
  hidden, targets = named()
  with pytest.raises(TypeError, match="a plain array has no names"):
    ne.decode_cross_entropy(
      trainable(), hidden, targets, where=np.ones(T.shape, bool)
    )
  flat_hidden = pz.nx.wrap(H.reshape(N, D)).tag("t", "embedding").untag("t")
  mask = np.arange(N) % 2 == 0
  value = ne.decode_cross_entropy(
    trainable(), flat_hidden, T.reshape(N), where=mask
  )
  expected = naive(W, H.reshape(1, N, D), T.reshape(1, N), mask=mask[None])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r"got dtype bool and shape \(5,\)"):
    ne.decode_cross_entropy(
      trainable(), flat_hidden, T.reshape(N), where=mask[:5]
    )


def test_bfloat16_mean_is_rounded_once():
  table = ne.EmbeddingTable.from_pretrained(jnp.asarray(W, jnp.bfloat16))
  hidden, targets = named(h=H.astype(jnp.bfloat16))
  per_position = ne.decode_cross_entropy(
    table, hidden, targets, reduction="none"
  )
  mean = ne.decode_cross_entropy(table, hidden, targets)
  # per-position values are bf16-rounded; the mean is computed in float32
  # from the unrounded values and rounded once
  f32 = ne.decode_cross_entropy(
    ne.EmbeddingTable.from_pretrained(
      jnp.asarray(jnp.asarray(W, jnp.bfloat16), jnp.float32)
    ),
    named(h=np.asarray(jnp.asarray(H, jnp.bfloat16), np.float32))[0],
    targets,
  )
  assert per_position.dtype == mean.dtype == jnp.bfloat16
  assert mean == jnp.asarray(f32, jnp.bfloat16)


def test_empty_batches_give_zero_sum():
  hidden = pz.nx.wrap(np.zeros((0, D), np.float32)).tag("seq", "embedding")
  targets = pz.nx.wrap(np.zeros((0,), np.int32)).tag("seq")
  value = ne.decode_cross_entropy(trainable(), hidden, targets, reduction="sum")
  assert float(value) == 0.0
