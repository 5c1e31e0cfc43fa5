"""Tests for `named_embed.decode`: values, dtypes, errors, tying, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data, raw
from penzai import pz

import named_embed as ne

W = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
H = np.array([[3.0, 4.0], [-1.0, 0.5]], np.float32)


def test_decode_hand_computed(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  hidden = pz.nx.wrap(H).tag("seq", "embedding")
  logits = run(lambda t, h: ne.decode(t, h), table, hidden)
  assert logits.named_shape == {"seq": 2, "vocabulary": 3}
  np.testing.assert_allclose(
    raw(logits, "seq", "vocabulary"), [[3.0, 8.0, 7.0], [-1.0, 1.0, -0.5]]
  )


def test_decode_keeps_positional_batch_axes_in_front(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  hidden = pz.nx.wrap(H.T).tag("embedding", "seq").untag("seq")
  logits = run(lambda t, h: ne.decode(t, h), table, hidden)
  assert logits.positional_shape == (2,)
  np.testing.assert_allclose(raw(logits, "vocabulary"), H @ W.T)


def test_decode_multi_axis_contracts_every_embedding_axis(run):
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(5, 2, 3)).astype(np.float32)
  hidden = rng.normal(size=(4, 3, 2)).astype(np.float32)  # seq, head_dim, heads
  table = ne.EmbeddingTable.from_pretrained(
    rows, embedding_axes=("heads", "head_dim")
  )
  named = pz.nx.wrap(hidden).tag("seq", "head_dim", "heads")
  logits = run(lambda t, h: ne.EmbeddingDecode(t)(h), table, named)
  expected = np.einsum("sdh,vhd->sv", hidden, rows)
  np.testing.assert_allclose(
    raw(logits, "seq", "vocabulary"), expected, rtol=1e-5
  )


def test_soft_cap(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  hidden = pz.nx.wrap(H).tag("seq", "embedding")
  logits = run(lambda t, h: ne.decode(t, h, soft_cap=5.0), table, hidden)
  np.testing.assert_allclose(
    raw(logits, "seq", "vocabulary"), 5.0 * np.tanh(H @ W.T / 5.0), rtol=1e-6
  )


def test_decode_promotes_jointly_unless_dtype_given():
  table = ne.EmbeddingTable.from_pretrained(jnp.asarray(W, jnp.bfloat16))
  f32 = pz.nx.wrap(H).tag("seq", "embedding")
  assert ne.decode(table, f32).dtype == jnp.float32
  bf16 = pz.nx.wrap(jnp.asarray(H, jnp.bfloat16)).tag("seq", "embedding")
  assert ne.decode(table, bf16).dtype == jnp.bfloat16
  assert ne.decode(table, f32, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  layer = ne.EmbeddingDecode(table, dtype=jnp.float32)
  assert layer(bf16).dtype == jnp.float32


def test_decode_errors_name_expected_and_given_axes():
  table = ne.EmbeddingTable.from_pretrained(
    np.ones((3, 2, 4), np.float32), embedding_axes=("heads", "head_dim")
  )
  missing = pz.nx.wrap(np.ones((5, 2), np.float32)).tag("seq", "heads")
  with pytest.raises(ValueError) as info:
    ne.EmbeddingDecode(table)(missing)
  message = str(info.value)
  assert "EmbeddingDecode" in message and "['head_dim']" in message
  assert "{'heads': 2, 'head_dim': 4}" in message
  assert "{'seq': 5, 'heads': 2}" in message
  wrong = pz.nx.wrap(np.ones((2, 3), np.float32)).tag("heads", "head_dim")
  with pytest.raises(ValueError, match=r"sizes \{'head_dim': 3\}.*table's"):
    ne.decode(table, wrong)
  clash = pz.nx.wrap(np.ones((3, 2, 4), np.float32)).tag(
    "vocabulary", "heads", "head_dim"
  )
  with pytest.raises(ValueError, match="already has the vocabulary axis"):
    ne.decode(table, clash)
  with pytest.raises(TypeError, match=r"expects a NamedArray.*shape \(2, 4\)"):
    ne.decode(table, np.ones((2, 4), np.float32))


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (dict(soft_cap=0.0), ValueError, r"`soft_cap` must be positive"),
    (dict(soft_cap="30"), TypeError, r"`soft_cap` must be a number"),
    (dict(dtype=jnp.int32), TypeError, r"`dtype` must be a floating dtype"),
  ],
)
def test_bad_decode_options_fail_at_construction(kwargs, error, pattern):
  table = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(error, match=pattern):
    ne.EmbeddingDecode(table, **kwargs)


def test_frozen_table_decode_has_no_table_gradient_but_hidden_gradient():
  table = ne.EmbeddingTable.from_pretrained(W)
  hidden = pz.nx.wrap(H).tag("seq", "embedding")

  def loss(t, h):
    return jnp.sum(data(ne.decode(t, h), "seq", "vocabulary"))

  grad_t, grad_h = jax.grad(loss, argnums=(0, 1))(table, hidden)
  np.testing.assert_array_equal(grad_t.rows_array(), 0)
  np.testing.assert_allclose(
    raw(grad_h, "seq", "embedding"), np.tile(W.sum(axis=0), (2, 1))
  )


# ---------------------------------------------------------------- tying


def tied_model(padding_index=None):
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=6,
    embedding_axes={"embedding": 4},
    padding_index=padding_index,
  )
  return pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table, soft_cap=10.0)]
  )


def test_one_table_in_both_layers_is_one_parameter():
  unbound, params = pz.unbind_params(tied_model())
  assert [p.label for p in params] == ["embed.embeddings"]
  ids = pz.nx.wrap(jnp.array([[1, 2, 3]])).tag("batch", "seq")
  out = pz.bind_variables(unbound, [p.freeze() for p in params])(ids)
  assert out.named_shape == {"batch": 1, "seq": 3, "vocabulary": 6}


def test_tied_gradient_is_the_sum_of_both_uses(run):
  model = tied_model(padding_index=0)
  unbound, params = pz.unbind_params(model)
  values = [p.freeze() for p in params]
  ids = pz.nx.wrap(jnp.array([0, 2, 2, 5])).tag("seq")
  cotangent = jnp.arange(24.0, dtype=jnp.float32).reshape(4, 6) / 10

  def loss(values):
    logits = pz.bind_variables(unbound, values)(ids)
    return jnp.sum(data(logits, "seq", "vocabulary") * cotangent)

  grad = run(jax.grad(loss), values)[0].value.order_as(
    "vocabulary", "embedding"
  )

  # Independent reference: the same model on raw arrays, differentiated
  # separately through the encoder use and the decoder use.
  w = values[0].value.order_as("vocabulary", "embedding").data_array
  raw_ids = jnp.array([0, 2, 2, 5])

  def raw_loss(w_in, w_out):
    h = w_in[raw_ids]
    logits = 10.0 * jnp.tanh(h @ w_out.T / 10.0)
    return jnp.sum(logits * cotangent)

  g_in, g_out = jax.grad(raw_loss, argnums=(0, 1))(w, w)
  g_in = g_in.at[0].set(0.0)  # padding row: no gradient from the lookup
  np.testing.assert_allclose(
    grad.data_array, g_in + g_out, rtol=1e-5, atol=1e-6
  )
  assert float(jnp.abs(grad.data_array[0]).sum()) > 0  # decode still trains it


def test_training_with_plain_jax_grad_lowers_the_loss():
  model = tied_model()
  unbound, params = pz.unbind_params(model)
  values = [p.freeze() for p in params]
  ids = pz.nx.wrap(jnp.array([1, 2, 3, 4, 5, 1])).tag("seq")
  targets = jnp.array([2, 3, 4, 5, 1, 2])

  @jax.jit
  def loss(values):
    logits = data(pz.bind_variables(unbound, values)(ids), "seq", "vocabulary")
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=1))

  first = float(loss(values))
  step = jax.jit(
    lambda v: jax.tree.map(lambda x, g: x - 0.5 * g, v, jax.grad(loss)(v))
  )
  for _ in range(30):
    values = step(values)
  assert float(loss(values)) < 0.6 * first


def test_variable_jit_and_freeze_params_pipeline():
  model = tied_model()
  ids = pz.nx.wrap(jnp.array([[1, 2]])).tag("batch", "seq")
  expected = raw(model(ids), "batch", "seq", "vocabulary")
  jitted = pz.variable_jit(lambda m, x: m(x))
  np.testing.assert_allclose(
    raw(jitted(model, ids), "batch", "seq", "vocabulary"), expected, rtol=1e-6
  )
  frozen = pz.freeze_params(model)
  np.testing.assert_allclose(
    raw(jax.jit(lambda m, x: m(x))(frozen, ids), "batch", "seq", "vocabulary"),
    expected,
    rtol=1e-6,
  )


def test_compiled_decode_is_the_raw_einsum():
  from conftest import compiled_ops

  rows = jnp.ones((1000, 64), jnp.bfloat16)
  table = ne.EmbeddingTable.from_pretrained(rows)
  hidden = pz.nx.wrap(jnp.ones((8, 16, 64), jnp.bfloat16)).tag(
    "b", "s", "embedding"
  )
  ours = compiled_ops(lambda t, h: ne.decode(t, h).data_array, table, hidden)
  raw_einsum = compiled_ops(
    lambda w, h: jnp.einsum("bsd,vd->bsv", h, w), rows, hidden.data_array
  )
  assert sorted(op for op, _ in ours) == sorted(op for op, _ in raw_einsum)
  assert "transpose" not in {op for op, _ in ours}
