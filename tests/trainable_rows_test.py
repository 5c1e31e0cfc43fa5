"""Trainable rows: the base everywhere but the chosen rows, gradients to
those rows only, the fused loss, optimiser state, files and errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import treescope
from conftest import raw
from penzai import pz

import named_embed as ne

RNG = np.random.default_rng(2)
V, D = 19, 6
W = RNG.normal(size=(V, D)).astype(np.float32)
TOKENS = [f"w{i}" for i in range(V - 2)] + ["<tool>", "</tool>"]
CHOSEN = (3, 17, 18)


def base(**kwargs):
  return ne.EmbeddingTable.from_pretrained(W, **kwargs).with_vocabulary(
    ne.Vocabulary(TOKENS)
  )


def with_rows(table, values):
  return dataclasses.replace(
    table,
    rows=pz.ParameterValue(
      value=pz.nx.wrap(values).tag("rows", "embedding"), label="r"
    ),
  )


def test_one_parameter_of_the_chosen_rows_and_a_small_optimizer_state():
  table = base().with_trainable_rows(["</tool>", 3, "<tool>"], name="embed")
  assert table.row_ids == CHOSEN
  assert table.tokens == ["w3", "<tool>", "</tool>"]
  (param,) = pz.unbind_params(table)[1]
  assert param.label == "embed.trainable_rows"
  assert dict(param.value.named_shape) == {"rows": 3, "embedding": D}
  np.testing.assert_array_equal(
    raw(param.value, "rows", "embedding"), W[list(CHOSEN)]
  )
  state = optax.adam(1e-3).init(param.value.data_array)
  shapes = {leaf.shape for leaf in jax.tree.leaves(state) if leaf.ndim}
  assert shapes == {(3, D)}  # k x D, not V x D


@pytest.mark.parametrize("quantized", [False, True])
def test_other_rows_and_logits_are_the_base_and_chosen_ones_train(
  run, quantized
):
  start = base(padding_index=0)
  if quantized:
    start = start.quantized("int8")
  table = pz.freeze_params(start.with_trainable_rows(list(CHOSEN), name="r"))
  base_rows = (
    W
    if not quantized
    else raw(start.dequantized().value, "vocabulary", "embedding")
  )
  values = RNG.normal(size=(3, D)).astype(np.float32)
  merged = base_rows.copy()
  merged[list(CHOSEN)] = values
  ids = np.array([[3, 0, 5], [18, 18, 25]])
  h = RNG.normal(size=(4, D)).astype(np.float32)
  targets = np.array([17, 2, 3, 0])
  cot = RNG.normal(size=(2, 3, D)).astype(np.float32)

  def ours(v, h):
    t = with_rows(table, v)
    hidden = pz.nx.wrap(h).tag("seq", "embedding")
    rows = ne.lookup(t, pz.nx.wrap(ids).tag("b", "s"), out_of_range="clip")
    logits = ne.decode(t, hidden).untag("seq", "vocabulary").unwrap()
    loss = ne.decode_cross_entropy(
      t, hidden, pz.nx.wrap(targets).tag("seq"), chunk_size=4
    )
    total = jnp.sum(rows.untag("b", "s", "embedding").unwrap() * cot)
    return total + jnp.sum(jnp.sin(logits)) + loss, (rows, logits)

  def reference(v, h):
    w = jnp.asarray(base_rows).at[np.array(CHOSEN)].set(v)
    rows = w[np.clip(ids, 0, V - 1)]
    pad = (ids == 0)[..., None]  # the pad row sends no lookup gradient
    rows = jnp.where(pad, jax.lax.stop_gradient(rows), rows)
    z = h @ w.T
    loss = jnp.mean(jax.nn.logsumexp(z, axis=1) - z[np.arange(4), targets])
    return jnp.sum(rows * cot) + jnp.sum(jnp.sin(z)) + loss, (rows, z)

  (value, (rows, logits)), grads = run(
    jax.value_and_grad(ours, argnums=(0, 1), has_aux=True), values, h
  )
  (want, (want_rows, z)), want_grads = jax.value_and_grad(
    reference, argnums=(0, 1), has_aux=True
  )(values, h)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
  got_rows = raw(rows, "b", "s", "embedding")
  np.testing.assert_array_equal(got_rows[0, 1:], base_rows[[0, 5]])
  np.testing.assert_allclose(got_rows, want_rows, rtol=1e-6)
  frozen = [i for i in range(V) if i not in CHOSEN]
  np.testing.assert_allclose(
    logits[:, frozen], h @ base_rows[frozen].T, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(logits, z, rtol=1e-5, atol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())


def test_training_moves_the_chosen_rows_only():
  table = base().with_trainable_rows(["<tool>", "</tool>"], name="embed")
  unbound, (param,) = pz.unbind_params(table)
  hidden = pz.nx.wrap(RNG.normal(size=(8, D)).astype(np.float32)).tag(
    "seq", "embedding"
  )
  targets = pz.nx.wrap(np.array([17, 18] * 4)).tag("seq")
  optimizer = optax.adam(0.1)
  values = param.value
  state = optimizer.init(values)

  @jax.jit
  def step(values, state):
    def loss(values):
      t = pz.bind_variables(
        unbound, [pz.ParameterValue(value=values, label=param.label)]
      )
      return ne.decode_cross_entropy(t, hidden, targets)

    value, grads = jax.value_and_grad(loss)(values)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      updates, state = optimizer.update(grads, state)
    return optax.apply_updates(values, updates), state, value

  losses = []
  for _ in range(5):
    values, state, value = step(values, state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  trained = pz.bind_variables(
    unbound, [pz.ParameterValue(value=values, label=param.label)]
  ).merged()
  rows = raw(trained.value, "vocabulary", "embedding")
  np.testing.assert_array_equal(rows[:17], W[:17])
  assert not np.allclose(rows[17:], W[17:])


def test_merged_save_load_and_summary(tmp_path):
  q = base(padding_index=1).quantized("int4", 2)
  table = q.with_trainable_rows(["<tool>"], name="embed")
  merged = table.merged()
  assert isinstance(merged, ne.EmbeddingTable) and merged.dtype == np.float32
  assert merged.vocabulary == table.vocabulary and merged.padding_index == 1
  path = tmp_path / "rows.safetensors"
  ne.save(table, path)
  back = ne.load(path)
  assert isinstance(back, ne.TrainableRowsTable) and back.row_ids == (17,)
  for x, y in zip(
    jax.tree.leaves(pz.freeze_params(table)),
    jax.tree.leaves(pz.freeze_params(back)),
  ):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert back.rows.label == "embed.trainable_rows"
  assert treescope.render_to_text(back).splitlines()[0] == (
    "TrainableRowsTable(  # 1 trainable row ('<tool>') over vocabulary:19 ×"
    " embedding:6 int4 (a float32 scale per 2 values) read as float32, 285"
    " bytes (15 a row), padding row 1 'w1'"
  )


@pytest.mark.parametrize(
  "tokens, error, pattern",
  [
    (["<nope>"], ValueError, "'<nope>' is not in the vocabulary"),
    ([19], ValueError, "id 19 is outside"),
    ([-1], ValueError, "id -1 is outside"),
    (["<tool>", 17], ValueError, "more than once"),
    ([], ValueError, "at least one"),
    ("<tool>", TypeError, "`tokens` must be a list"),
    ([1.5], TypeError, "`tokens` items"),
  ],
)
def test_bad_tokens(tokens, error, pattern):
  with pytest.raises(error, match=pattern):
    base().with_trainable_rows(tokens, name="e")


def test_token_strings_need_a_vocabulary_and_alignment_rows_are_not_tokens():
  plain = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(ValueError, match="no vocabulary"):
    plain.with_trainable_rows(["<tool>"], name="e")
  with pytest.raises(ValueError, match="id 19 is outside"):
    plain.padded_to_multiple(8).with_trainable_rows([19], name="e")
  with pytest.raises(ValueError, match="`name`"):
    plain.with_trainable_rows([1], name="")


# -------------------------------------- stacking, inspection, resizing


def test_trained_rows_do_not_stack_and_say_what_to_do():
  rows = base().with_trainable_rows(["<tool>"], name="r")
  with pytest.raises(
    TypeError,
    match=r"TrainableRowsTable.with_lora: adapters"
    r" do not stack.*`table.merged\(\).with_lora\(...\)`",
  ):
    rows.with_lora(2, name="e", init_base_rng=jax.random.key(0))
  with pytest.raises(
    TypeError,
    match=r"TrainableRowsTable.with_trainable_rows"
    r": .*`table.merged\(\).with_trainable_rows\(...\)`",
  ):
    rows.with_trainable_rows(["w1"], name="again")
  with pytest.raises(
    TypeError,
    match=r"TrainableRowsTable.quantized: .*"
    r"`table.merged\(\).quantized\(...\)`",
  ):
    rows.quantized()
  merged = rows.merged().with_trainable_rows(["w1", "<tool>"], name="again")
  assert merged.row_ids == (1, 17)


def test_inspection_reads_the_trained_rows():
  values = RNG.normal(size=(3, D)).astype(np.float32)
  rows = with_rows(base().with_trainable_rows(list(CHOSEN), name="r"), values)
  merged = rows.merged()
  for query in ("w3", "<tool>"):
    got, got_scores = rows.nearest(query, k=4)
    want, want_scores = merged.nearest(query, k=4)
    np.testing.assert_array_equal(
      np.asarray(got.unwrap("neighbor")), np.asarray(want.unwrap("neighbor"))
    )
    np.testing.assert_allclose(
      np.asarray(got_scores.unwrap("neighbor")),
      np.asarray(want_scores.unwrap("neighbor")),
      rtol=1e-6,
    )
  table_rows = raw(merged.value, "vocabulary", "embedding")
  np.testing.assert_array_equal(table_rows[list(CHOSEN)], values)
  assert float(rows.similarity("<tool>", "w3", "dot")) == pytest.approx(
    float(values[1] @ values[0]), rel=1e-6
  )
  got, _ = rows.analogy(["<tool>", "w1"], ["w2"], k=2)
  want, _ = merged.analogy(["<tool>", "w1"], ["w2"], k=2)
  np.testing.assert_array_equal(
    np.asarray(got.unwrap("neighbor")), np.asarray(want.unwrap("neighbor"))
  )
