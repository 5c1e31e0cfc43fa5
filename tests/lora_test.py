"""LoRA tables: values and gradients against the merged table, ties,
quantised bases, memory, files, rendering and errors."""

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

RNG = np.random.default_rng(1)
V, D, R = 23, 8, 3
W = RNG.normal(size=(V, D)).astype(np.float32)
A = RNG.normal(size=(V, R)).astype(np.float32)


def lora_table(base=None, a=A, alpha=6.0, **kwargs):
  """A LoRA table with a non-zero ``A`` (so the delta is visible)."""
  base = base or ne.EmbeddingTable.from_pretrained(W, **kwargs)
  lora = base.with_lora(R, alpha, name="embed", init_base_rng=jax.random.key(0))
  lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
  return lora


def parts(lora):
  """numpy base rows, A, B and the scale."""
  base = lora.base
  if isinstance(base, ne.QuantizedTable):
    base = base.dequantized()
  return (
    raw(base.value, "vocabulary", "embedding"),
    raw(lora.lora_a.value, "vocabulary", "rank"),
    raw(lora.lora_b.value, "rank", "embedding"),
    lora.alpha / R,
  )


def with_values(lora, a, b):
  """``lora`` with adapter values ``a`` and ``b`` (for jax.grad)."""
  return dataclasses.replace(
    lora,
    lora_a=pz.ParameterValue(
      value=pz.nx.wrap(a).tag("vocabulary", "rank"), label="embed.lora_a"
    ),
    lora_b=pz.ParameterValue(
      value=pz.nx.wrap(b).tag("rank", "embedding"), label="embed.lora_b"
    ),
  )


def test_initial_delta_is_zero_and_only_the_adapters_train():
  table = ne.EmbeddingTable.from_pretrained(W, freeze=False, name="embed")
  lora = table.with_lora(4, name="embed", init_base_rng=jax.random.key(0))
  assert lora.base.frozen and not lora.frozen
  assert (lora.rank, lora.scale) == (4, 1.0)
  _, params = pz.unbind_params(lora)
  assert {p.label: dict(p.value.named_shape) for p in params} == {
    "embed.lora_a": {"vocabulary": V, "rank": 4},
    "embed.lora_b": {"rank": 4, "embedding": D},
  }
  np.testing.assert_array_equal(raw(lora.lora_a.value, "vocabulary", "rank"), 0)
  assert np.std(raw(lora.lora_b.value, "rank", "embedding")) > 0.5
  ids = np.array([0, 5, 22])
  np.testing.assert_array_equal(raw(ne.lookup(lora, ids), "embedding"), W[ids])


@pytest.mark.parametrize("quantized", [False, True])
def test_lookup_decode_and_loss_equal_the_merged_table(run, quantized):
  base = ne.EmbeddingTable.from_pretrained(W)
  lora = lora_table(base.quantized("int4", 4) if quantized else base)
  base_rows, a, b, scale = parts(lora)
  merged = base_rows + scale * a @ b
  np.testing.assert_allclose(  # float32 sums in another order than numpy's
    raw(lora.merged().value, "vocabulary", "embedding"),
    merged,
    rtol=1e-6,
    atol=1e-6 * np.abs(merged).max(),
  )
  frozen = pz.freeze_params(lora)
  ids = np.array([[1, 22, 0], [5, 5, 30]])
  out = run(lambda t: ne.lookup(t, pz.nx.wrap(ids).tag("b", "s")), frozen)
  want = merged[np.clip(ids, 0, V - 1)]
  want[ids >= V] = np.nan
  np.testing.assert_allclose(raw(out, "b", "s", "embedding"), want, rtol=1e-5)
  h = RNG.normal(size=(4, D)).astype(np.float32)
  hidden = pz.nx.wrap(h).tag("seq", "embedding")
  logits = run(lambda t, h: ne.decode(t, h), frozen, hidden)
  np.testing.assert_allclose(
    raw(logits, "seq", "vocabulary"), h @ merged.T, rtol=1e-5, atol=1e-5
  )
  targets = pz.nx.wrap(np.array([0, 3, 22, 9])).tag("seq")
  loss = run(
    lambda t, h: ne.decode_cross_entropy(t, h, targets, chunk_size=5),
    frozen,
    hidden,
  )
  z = h @ merged.T
  textbook = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(4), [0, 3, 22, 9]])
  np.testing.assert_allclose(loss, textbook, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_gradients_reach_the_adapters_only_and_match_the_merged_table(
  run, quantized
):
  base = ne.EmbeddingTable.from_pretrained(W, padding_index=2)
  lora = lora_table(base.quantized("int8") if quantized else base)
  base_rows, a0, b0, scale = parts(lora)
  ids = np.array([[1, 2, 7], [7, 0, 22]])
  h = RNG.normal(size=(5, D)).astype(np.float32)
  targets = np.array([0, 3, 22, 9, 2])
  cot = RNG.normal(size=(2, 3, D)).astype(np.float32)

  def ours(a, b, h):
    table = with_values(lora, a, b)
    hidden = pz.nx.wrap(h).tag("seq", "embedding")
    rows = ne.lookup(table, pz.nx.wrap(ids).tag("b", "s"))
    logits = ne.decode(table, hidden).untag("seq", "vocabulary").unwrap()
    loss = ne.decode_cross_entropy(
      table, hidden, pz.nx.wrap(targets).tag("seq"), chunk_size=4
    )
    return jnp.sum(rows.untag("b", "s", "embedding").unwrap() * cot) + (
      jnp.sum(jnp.sin(logits)) + loss
    )

  def reference(a, b, h):
    merged = base_rows + scale * a @ b
    rows = merged[ids]
    pad = (ids == 2)[..., None]  # the pad row sends no lookup gradient
    rows = jnp.where(pad, jax.lax.stop_gradient(rows), rows)
    z = h @ merged.T
    loss = jnp.mean(jax.nn.logsumexp(z, axis=1) - z[np.arange(5), targets])
    return jnp.sum(rows * cot) + jnp.sum(jnp.sin(z)) + loss

  got = run(jax.grad(ours, argnums=(0, 1, 2)), a0, b0, h)
  want = jax.grad(reference, argnums=(0, 1, 2))(a0, b0, h)
  for g, w in zip(got, want):  # float32 sums in another order
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())


def test_tied_model_trains_one_a_and_one_b():
  lora = lora_table()
  model = pz.nn.Sequential([ne.EmbeddingLookup(lora), ne.EmbeddingDecode(lora)])
  unbound, params = pz.unbind_params(model)
  assert sorted(p.label for p in params) == ["embed.lora_a", "embed.lora_b"]
  ids = pz.nx.wrap(np.array([3, 4, 5])).tag("seq")
  targets = pz.nx.wrap(np.array([4, 5, 6])).tag("seq")
  values = {p.label: p.value for p in params}
  optimizer = optax.adam(0.05)
  state = optimizer.init(values)

  def loss(values):
    bound = pz.bind_variables(
      unbound,
      [pz.ParameterValue(value=v, label=k) for k, v in values.items()],
    )
    hidden = bound.sublayers[0](ids)
    return ne.decode_cross_entropy(bound.sublayers[1], hidden, targets)

  @jax.jit
  def step(values, state):
    value, grads = jax.value_and_grad(loss)(values)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      updates, state = optimizer.update(grads, state)
    return optax.apply_updates(values, updates), state, value

  losses = []
  for _ in range(5):
    values, state, value = step(values, state)
    losses.append(float(value))
  assert losses[-1] < losses[0]


def _first_step(lora, loss, run):
  """The gradients of ``loss(table)`` w.r.t. A and B at the initial
  adapters, and the rows after one SGD step (numpy)."""
  base_rows, a0, b0, scale = parts(lora)
  grad_a, grad_b = run(
    jax.grad(lambda a, b: loss(with_values(lora, a, b)), argnums=(0, 1)),
    a0,
    b0,
  )
  a1, b1 = a0 - 0.1 * grad_a, b0 - 0.1 * grad_b
  return np.asarray(grad_a), np.asarray(grad_b), base_rows + scale * a1 @ b1


def test_untied_lookup_moves_only_the_rows_it_reads(run):
  """docs/compression.md: with A zero at first, an untied lookup's
  gradient reaches only the rows of A of the ids looked up (and none
  reaches B), so every other row stays at its base value."""
  lora = lora_table(a=np.zeros((V, R), np.float32))  # as with_lora makes it
  base_rows, _, b0, scale = parts(lora)
  ids = np.array([3, 7, 7, 12])
  cot = RNG.normal(size=(4, D)).astype(np.float32)

  def loss(table):
    rows = ne.lookup(table, pz.nx.wrap(ids).tag("seq"))
    return jnp.sum(rows.untag("seq", "embedding").unwrap() * cot)

  grad_a, grad_b, rows = _first_step(lora, loss, run)
  want = np.zeros((V, R), np.float32)  # d/dA[i] = scale * sum cot_p @ B^T
  np.add.at(want, ids, scale * cot @ b0.T)
  np.testing.assert_allclose(grad_a, want, rtol=1e-5, atol=1e-6)
  assert set(np.flatnonzero(np.abs(grad_a).sum(1))) == {3, 7, 12}
  np.testing.assert_array_equal(grad_b, 0)  # A is zero
  untouched = np.setdiff1d(np.arange(V), ids)
  np.testing.assert_array_equal(rows[untouched], base_rows[untouched])
  assert not np.allclose(rows[ids], base_rows[ids])


def test_tied_model_moves_every_row_after_one_step(run):
  """docs/compression.md: in a tied model the decode reads every row, so
  its softmax gradient reaches every row of A and every row moves."""
  lora = lora_table(a=np.zeros((V, R), np.float32))
  base_rows, _, b0, scale = parts(lora)
  ids, targets = np.array([3, 7, 12]), np.array([7, 12, 3])

  def loss(table):
    model = pz.nn.Sequential(
      [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
    )
    hidden = model.sublayers[0](pz.nx.wrap(ids).tag("seq"))
    return ne.decode_cross_entropy(
      model.sublayers[1], hidden, pz.nx.wrap(targets).tag("seq")
    )

  grad_a, _, rows = _first_step(lora, loss, run)

  def textbook(merged):  # the same tied loss on the plain rows
    z = merged[ids] @ merged.T
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - z[np.arange(3), targets])

  d_rows = jax.grad(textbook)(jnp.asarray(base_rows))
  np.testing.assert_allclose(
    grad_a, scale * d_rows @ b0.T, rtol=1e-4, atol=1e-6
  )
  assert (np.abs(grad_a).sum(1) > 0).all()  # every row of A
  assert (np.abs(rows - base_rows).sum(1) > 0).all()  # every row moved


def test_lookups_and_decodes_never_build_the_merged_table():
  v, d = 65536, 256
  base = ne.EmbeddingTable.from_pretrained(jnp.zeros((v, d), jnp.float32))
  lora = pz.freeze_params(
    base.with_lora(8, name="e", init_base_rng=jax.random.key(0))
  )
  ids = jnp.zeros((4, 128), jnp.int32)
  hidden = pz.nx.wrap(jnp.zeros((8, d), jnp.float32)).tag("seq", "embedding")

  def temp(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  table_bytes = v * d * 4
  assert temp(lambda t, i: ne.lookup(t, i).data_array, lora, ids) < (
    table_bytes / 16
  )
  decode = lambda t, h: ne.decode(t, h).data_array  # noqa: E731
  assert temp(decode, lora, hidden) < table_bytes / 16


def test_merged_over_a_quantized_base_is_a_float_table():
  q = ne.EmbeddingTable.from_pretrained(W).quantized("int8")
  merged = lora_table(q).merged()
  assert isinstance(merged, ne.EmbeddingTable) and merged.dtype == np.float32
  assert merged.frozen


def test_save_and_load_are_bit_exact(tmp_path):
  for base in (
    ne.EmbeddingTable.from_pretrained(W.astype(jnp.bfloat16), padding_index=1),
    ne.EmbeddingTable.from_pretrained(W).quantized("int4", 4),
  ):
    lora = lora_table(base)
    path = tmp_path / "lora.safetensors"
    ne.save(lora, path)
    back = ne.load(path)
    assert isinstance(back, ne.LoraTable) and back.alpha == lora.alpha
    assert type(back.base) is type(lora.base)
    for x, y in zip(
      jax.tree.leaves(pz.freeze_params(lora)),
      jax.tree.leaves(pz.freeze_params(back)),
    ):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [p.label for p in pz.unbind_params(back)[1]] == [
      "embed.lora_a",
      "embed.lora_b",
    ]
    assert ne.load(path, freeze=True).frozen


def test_summary():
  lora = lora_table(
    ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32)),
    a=np.zeros((4, R), np.float32),
  )
  assert treescope.render_to_text(lora).splitlines()[0] == (
    "LoraTable(  # LoRA rank 3, alpha 6 (scale 2), trainable adapters, over"
    " vocabulary:4 × embedding:2 float32, no padding row, row norms min 1.41"
    " mean 1.41 max 1.41"
  )


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (dict(rank=0), ValueError, "`rank`"),
    (dict(rank="8"), TypeError, "`rank`"),
    (dict(rank=2.0), TypeError, "`rank`"),
    (dict(rank=True), TypeError, "`rank`"),
    (dict(rank=2, alpha=0.0), ValueError, "`alpha` must be positive"),
    (dict(rank=2, alpha=-1.0), ValueError, "`alpha` must be positive"),
    (dict(rank=2, alpha=float("nan")), ValueError, "`alpha` must not be NaN"),
    (dict(rank=2, alpha=float("inf")), ValueError, "`alpha` must be finite"),
    (dict(rank=2, alpha="1"), TypeError, "`alpha` must be a number"),
    (dict(rank=2, name=""), ValueError, "`name`"),
    (dict(rank=2, name=3), TypeError, "`name` must be a string"),
    (dict(rank=2, init_base_rng=0), TypeError, "`init_base_rng`"),
    (
      dict(rank=2, init_base_rng=np.zeros(2, np.uint32)),
      TypeError,
      "`init_base_rng`",
    ),
    (dict(rank=2, init_base_rng=jnp.zeros(2)), TypeError, "PRNG key"),
  ],
)
def test_bad_arguments(kwargs, error, pattern):
  table = ne.EmbeddingTable.from_pretrained(W)
  kwargs = dict(name="e", init_base_rng=jax.random.key(0)) | kwargs
  with pytest.raises(error, match=pattern):
    table.with_lora(**kwargs)


def test_tables_that_take_no_adapters():
  from named_embed._src.tables import lora

  with pytest.raises(TypeError, match="merged"):
    lora.with_lora(lora_table(), 2, name="e", init_base_rng=jax.random.key(0))
  clash = ne.EmbeddingTable.from_pretrained(W, embedding_axes="rank")
  with pytest.raises(ValueError, match="'rank'"):
    clash.with_lora(2, name="e", init_base_rng=jax.random.key(0))
  clash = ne.EmbeddingTable.from_pretrained(W, vocabulary_axis="rank")
  with pytest.raises(ValueError, match="vocabulary axis 'rank'"):
    clash.with_lora(2, name="e", init_base_rng=jax.random.key(0))
  key = jax.random.key(0)
  rows = ne.EmbeddingTable.from_pretrained(W).with_trainable_rows([1], name="r")
  with pytest.raises(TypeError, match=r"got TrainableRowsTable.*merged"):
    lora.with_lora(rows, 2, name="e", init_base_rng=key)
  with pytest.raises(TypeError, match="got ndarray"):
    lora.with_lora(W, 2, name="e", init_base_rng=key)
  trainable = ne.EmbeddingTable.from_pretrained(W, freeze=False, name="t")
  unbound, _ = pz.unbind_params(trainable)
  with pytest.raises(ValueError, match="unbound"):
    unbound.with_lora(2, name="e", init_base_rng=key)


# -------------------------------------- stacking, inspection, resizing


@pytest.mark.parametrize("quantised", [False, True], ids=["float", "int8"])
def test_adapters_do_not_stack_and_say_what_to_do(quantised):
  base = ne.EmbeddingTable.from_pretrained(W)
  lora = lora_table(base.quantized("int8") if quantised else base)
  key = jax.random.key(0)
  with pytest.raises(
    TypeError,
    match=r"LoraTable.with_lora: adapters do not"
    r" stack.*`table.merged\(\).with_lora\(...\)`",
  ):
    lora.with_lora(2, name="again", init_base_rng=key)
  with pytest.raises(
    TypeError,
    match=r"LoraTable.with_trainable_rows: .*"
    r"`table.merged\(\).with_trainable_rows\(...\)`",
  ):
    lora.with_trainable_rows([1], name="rows")
  with pytest.raises(
    TypeError,
    match=r"LoraTable.quantized: .*"
    r"`table.merged\(\).quantized\(...\)`",
  ):
    lora.quantized("int4")
  # what the messages suggest works
  again = lora.merged().with_lora(2, name="again", init_base_rng=key)
  assert isinstance(again, ne.LoraTable)
  assert isinstance(
    lora.merged().quantized().with_trainable_rows([1], name="r"),
    ne.TrainableRowsTable,
  )


def test_inspection_reads_the_merged_rows():
  lora = lora_table(ne.EmbeddingTable.from_pretrained(W).quantized("int4"))
  merged = lora.merged()
  rows = raw(merged.value, "vocabulary", "embedding").astype(np.float64)
  ids, scores = lora.nearest(4, k=3, metric="dot")
  dots = rows @ rows[4]
  dots[4] = -np.inf
  np.testing.assert_array_equal(
    np.asarray(ids.unwrap("neighbor")), np.argsort(-dots)[:3]
  )
  np.testing.assert_allclose(
    np.asarray(scores.unwrap("neighbor")), np.sort(dots)[::-1][:3], rtol=1e-5
  )
  assert float(lora.similarity(2, 5, "dot")) == pytest.approx(
    rows[2] @ rows[5], rel=1e-5
  )
  got, _ = lora.analogy([1, 2], [3], k=2)
  want, _ = merged.analogy([1, 2], [3], k=2)
  np.testing.assert_array_equal(
    np.asarray(got.unwrap("neighbor")), np.asarray(want.unwrap("neighbor"))
  )
