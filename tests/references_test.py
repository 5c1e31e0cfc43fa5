"""named_embed against independent references: flax, penzai and raw jax.

- flax: ``flax.linen.Embed`` and ``flax.nnx.Embed`` (``__call__`` and
  ``attend``) fed the same array as a named_embed table;
- penzai: ``pz.nn.EmbeddingLookup`` / ``pz.nn.EmbeddingDecode`` on the same
  named table (multi-axis tables; named, positional and view inputs);
- raw jax/numpy: hypothesis properties against ``jnp.take``, ``jnp.einsum``
  and a numpy scatter-add, the out-of-range policies included.

Values and gradients (of ``sum(output * cotangent)``) are compared, eagerly
and under `jax.jit` (the ``run`` fixture). The hypothesis tests, whose every
example has new shapes, compare values and gradients compiled, and values
eagerly as well for about half of the examples.
"""

from __future__ import annotations

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from penzai import pz

import named_embed as ne

RNG = np.random.default_rng(20240611)


def normal(*shape: int) -> np.ndarray:
  return RNG.normal(size=shape).astype(np.float32)


def arrange(x: pz.nx.NamedArrayBase, *names: str) -> jax.Array:
  """The data of ``x``: positional axes first, then ``names`` in that order.

  Works on tracers. Fails unless ``names`` are exactly the named axes of
  ``x``, so a missing or extra axis in a result cannot go unnoticed.
  """
  assert sorted(names) == sorted(x.named_shape), (names, x.named_shape)
  tmp = tuple(f"_pos{i}" for i in range(len(x.positional_shape)))
  if tmp:
    x = x.tag_prefix(*tmp)
  if tmp or names:
    return x.untag(*tmp, *names).unwrap()
  return x.unwrap()


def value_and_grad(f, cotangent, argnums=0):
  """``args -> (f(*args), jax.grad(sum(f(*args) * cotangent))(*args))``.

  One trace gives both, so each comparison compiles once under `jax.jit`.
  """

  def loss(*args):
    out = f(*args)
    return jnp.sum(out * cotangent), out

  grad = jax.value_and_grad(loss, argnums=argnums, has_aux=True)

  def both(*args):
    (_, out), grads = grad(*args)
    return out, grads

  return both


def together(*fns):
  """One function returning every ``fn(*args)``: a single jit compilation."""
  return lambda *args: tuple(fn(*args) for fn in fns)


def assert_same(actual, expected) -> None:
  """Exact equality (NaN equal to NaN), same shape and dtype."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
  np.testing.assert_array_equal(actual, expected)


def assert_close(actual, expected, rtol=1e-6, atol=1e-6) -> None:
  """Tight allclose (NaN equal to NaN), same shape and dtype."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def assert_zero(actual) -> None:
  actual = np.asarray(actual)
  assert actual.dtype == np.float32
  np.testing.assert_array_equal(actual, np.zeros_like(actual))


def scatter_add(vocab: int, rows: np.ndarray, cotangent: np.ndarray):
  """Reference table gradient: row ``rows[i]`` gets ``cotangent[i]``."""
  grad = np.zeros((vocab, *cotangent.shape[rows.ndim :]), np.float64)
  np.add.at(grad, rows, cotangent)
  return grad.astype(np.float32)


# ===================================================================== flax

V, D = 6, 4
W = normal(V, D)
IDS = np.array([[0, 5, 2, 2], [1, 3, 4, 0], [5, 5, 1, 3]], np.int32)
IDS_CT = normal(*IDS.shape, D)  # cotangent of a lookup of IDS
Q = normal(2, 3, D)  # decode queries
Q_CT = normal(2, 3, V)  # cotangent of their logits


def linen_lookup(w, ids):
  module = nn.Embed(num_embeddings=w.shape[0], features=w.shape[1])
  return module.apply({"params": {"embedding": w}}, ids)


def linen_attend(w, query):
  module = nn.Embed(num_embeddings=w.shape[0], features=w.shape[1])
  return module.apply({"params": {"embedding": w}}, query, method="attend")


def nnx_module(w):
  module = nnx.Embed(
    num_embeddings=w.shape[0], features=w.shape[1], rngs=nnx.Rngs(0)
  )
  module.embedding[...] = w
  return module


def nnx_lookup(w, ids):
  return nnx_module(w)(ids)


def nnx_attend(w, query):
  return nnx_module(w).attend(query)


FLAX_LOOKUP = {"linen": linen_lookup, "nnx": nnx_lookup}
FLAX_ATTEND = {"linen": linen_attend, "nnx": nnx_attend}


# Each flax API once, with each form of ne's lookup once.
FLAX_AND_FORM = [("linen", "function"), ("nnx", "layer")]


def trainable_table(w) -> ne.EmbeddingTable:
  """A trainable table built from the raw (possibly traced) array."""
  return ne.EmbeddingTable.from_pretrained(w, freeze=False)


def ne_lookup_raw(form, table, ids, **options):
  """Lookup of plain (positional) ids, as ``[*ids.shape, embedding]``."""
  if form == "function":
    out = ne.lookup(table, ids, **options)
  else:
    out = ne.EmbeddingLookup(table, **options)(ids)
  assert out.named_shape == {"embedding": table.embedding_axes["embedding"]}
  return arrange(out, "embedding")


def ne_lookup_fn(form, **options):
  """``(w, ids) -> [*ids.shape, embedding]`` with a trainable table of w."""
  return lambda w, ids: ne_lookup_raw(form, trainable_table(w), ids, **options)


def ne_decode_raw(form, table, query, hidden_layout):
  """Decode of a raw ``[b, s, embedding]`` query, as ``[b, s, vocabulary]``."""
  if hidden_layout == "view":  # data stored as [embedding, b, s]
    hidden = pz.nx.wrap(jnp.transpose(query, (2, 0, 1)))
    hidden = hidden.tag("embedding", "b", "s").as_namedarrayview()
  else:
    hidden = pz.nx.wrap(query).tag("b", "s", "embedding")
  if hidden_layout == "positional":
    hidden = hidden.untag("b", "s")
  if form == "function":
    out = ne.decode(table, hidden)
  else:
    out = ne.EmbeddingDecode(table)(hidden)
  if hidden_layout == "positional":
    return arrange(out, "vocabulary")
  return arrange(out, "b", "s", "vocabulary")


@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
@pytest.mark.parametrize(
  "tokens, form",
  [("numpy", "function"), ("wrapped", "layer"), ("named", "function")],
)
def test_flax_lookup_in_range(run, flax_api, tokens, form):
  def ne_lookup(w, ids):
    table = trainable_table(w)
    if tokens == "numpy":
      return ne_lookup_raw(form, table, ids)
    named = pz.nx.wrap(ids)
    if tokens == "named":
      named = named.tag("batch", "seq")
    layer = ne.EmbeddingLookup(table)
    out = ne.lookup(table, named) if form == "function" else layer(named)
    if tokens == "named":
      assert out.named_shape == {"batch": 3, "seq": 4, "embedding": D}
      return arrange(out, "batch", "seq", "embedding")
    assert out.positional_shape == IDS.shape
    return arrange(out, "embedding")

  (expected, expected_grad), (got, grad) = run(
    together(
      value_and_grad(FLAX_LOOKUP[flax_api], IDS_CT),
      value_and_grad(ne_lookup, IDS_CT),
    ),
    W,
    IDS,
  )
  assert_same(expected, W[IDS])  # the reference itself
  assert_close(expected_grad, scatter_add(V, IDS, IDS_CT))
  assert_same(got, expected)
  assert_close(grad, expected_grad)


@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
@pytest.mark.parametrize(
  "hidden_layout, form",
  [("named", "function"), ("positional", "layer"), ("view", "function")],
)
def test_flax_attend_matches_decode(run, flax_api, hidden_layout, form):
  def ne_decode(w, query):
    return ne_decode_raw(form, trainable_table(w), query, hidden_layout)

  (expected, expected_grads), (got, grads) = run(
    together(
      value_and_grad(FLAX_ATTEND[flax_api], Q_CT, argnums=(0, 1)),
      value_and_grad(ne_decode, Q_CT, argnums=(0, 1)),
    ),
    W,
    Q,
  )
  assert_close(expected, np.einsum("bse,ve->bsv", Q, W), rtol=1e-5)
  assert_close(got, expected)
  for got, want in zip(grads, expected_grads, strict=True):
    assert_close(got, want)


def test_tied_lookup_then_decode_matches_flax(run):
  """One table used twice: its gradient is the sum of both uses, as in a
  flax model that calls ``embed(ids)`` and then ``embed.attend(...)``."""
  cotangent = normal(*IDS.shape, V)

  def flax_tied(w, ids):
    return linen_attend(w, linen_lookup(w, ids))

  def ne_tied(w, ids):
    table = trainable_table(w)
    tokens = pz.nx.wrap(ids).tag("batch", "seq")
    model = pz.nn.Sequential(
      [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
    )
    assert len(pz.unbind_params(model)[1]) == 1  # one shared parameter
    return arrange(model(tokens), "batch", "seq", "vocabulary")

  (expected, expected_grad), (got, grad) = run(
    together(
      value_and_grad(flax_tied, cotangent), value_and_grad(ne_tied, cotangent)
    ),
    W,
    IDS,
  )
  assert_close(got, expected)
  assert_close(grad, expected_grad, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_narrow_integer_ids_with_a_large_vocabulary_match_flax(run, dtype):
  vocab = 300  # more rows than int8/uint8 can count
  w = normal(vocab, D)
  ids = np.array([[0, 255, 7], [200, 1, 255]], dtype)
  cotangent = normal(*ids.shape, D)
  (expected, expected_grad), (got, grad) = run(
    together(
      value_and_grad(linen_lookup, cotangent),
      value_and_grad(ne_lookup_fn("function"), cotangent),
    ),
    w,
    ids,
  )
  assert_same(expected, w[ids.astype(np.int64)])
  assert_same(got, expected)
  assert_close(grad, expected_grad)


@pytest.mark.parametrize(
  "flax_api, form", [("linen", "layer"), ("nnx", "function")]
)
def test_empty_token_array_matches_flax(run, flax_api, form):
  ids = np.zeros((2, 0), np.int32)
  cotangent = normal(2, 0, D)

  def ne_lookup(w, ids):
    table = trainable_table(w)
    tokens = pz.nx.wrap(ids).tag("batch", "seq")
    layer = ne.EmbeddingLookup(table)
    out = ne.lookup(table, tokens) if form == "function" else layer(tokens)
    assert out.named_shape == {"batch": 2, "seq": 0, "embedding": D}
    return arrange(out, "batch", "seq", "embedding")

  (expected, expected_grad), (got, grad), (got_raw, grad_raw) = run(
    together(
      value_and_grad(FLAX_LOOKUP[flax_api], cotangent),
      value_and_grad(ne_lookup, cotangent),
      value_and_grad(ne_lookup_fn(form), cotangent),
    ),
    W,
    ids,
  )
  assert np.asarray(expected).shape == (2, 0, D)
  assert_zero(expected_grad)
  for value, gradient in [(got, grad), (got_raw, grad_raw)]:
    assert_same(value, expected)
    assert_same(gradient, expected_grad)


HIGH_IDS = np.array(
  [[0, V, 3], [V + 1, 2**31 - 1, 5], [1000, 2, V - 1]], np.int32
)


@pytest.mark.parametrize("flax_api, form", FLAX_AND_FORM)
def test_ids_at_or_above_vocab_are_nan_in_flax_and_default_fill(
  run, flax_api, form
):
  ids, bad = HIGH_IDS, HIGH_IDS >= V
  cotangent = normal(*ids.shape, D)

  (expected, expected_grad), (got, grad) = run(
    together(
      value_and_grad(FLAX_LOOKUP[flax_api], cotangent),
      value_and_grad(ne_lookup_fn(form), cotangent),
    ),
    W,
    ids,
  )
  expected = np.asarray(expected)
  assert np.isnan(expected[bad]).all()
  assert not np.isnan(expected[~bad]).any()
  # Neither sends any gradient to a row from the bad ids.
  assert_close(expected_grad, scatter_add(V, ids[~bad], cotangent[~bad]))
  assert_same(got, expected)
  assert_close(grad, expected_grad)


NEG_IDS = np.array([[-1, 0, -V], [3, -2, -V + 1], [V - 1, -3, 2]], np.int32)


@pytest.mark.parametrize("flax_api, form", FLAX_AND_FORM)
def test_negative_ids_flax_wraps_ne_fill_gives_nan_ne_wrap_agrees(
  run, flax_api, form
):
  """Documented difference: flax (numpy indexing) wraps ids in [-V, -1];
  ne's default "fill" treats every negative id as out of range (NaN row, no
  gradient); ne's "wrap" policy reproduces flax there."""
  ids, negative = NEG_IDS, NEG_IDS < 0
  cotangent = normal(*ids.shape, D)

  (expected, expected_grad), (got, grad), (fill, fill_grad) = run(
    together(
      value_and_grad(FLAX_LOOKUP[flax_api], cotangent),
      value_and_grad(ne_lookup_fn(form, out_of_range="wrap"), cotangent),
      value_and_grad(ne_lookup_fn(form), cotangent),
    ),
    W,
    ids,
  )
  assert_same(expected, W[ids])  # numpy semantics: -1 is the last row
  assert_close(expected_grad, scatter_add(V, ids % V, cotangent))

  assert_same(got, expected)  # "wrap"
  assert_close(grad, expected_grad)

  fill = np.asarray(fill)
  assert np.isnan(fill[negative]).all()
  assert_same(fill[~negative], np.asarray(expected)[~negative])
  assert_close(fill_grad, scatter_add(V, ids[~negative], cotangent[~negative]))


W1 = normal(1, D)
ANY_IDS = np.array([[0, 1, -1], [7, -100, 2**31 - 1]], np.int32)


@pytest.mark.parametrize("flax_api, form", FLAX_AND_FORM)
def test_vocab_of_one_clip_broadcasts_row_zero_like_flax(run, flax_api, form):
  cotangent = normal(*ANY_IDS.shape, D)

  (expected, expected_grad), (got, grad), (fill, fill_grad) = run(
    together(
      value_and_grad(FLAX_LOOKUP[flax_api], cotangent),
      value_and_grad(ne_lookup_fn(form, out_of_range="clip"), cotangent),
      value_and_grad(ne_lookup_fn(form), cotangent),
    ),
    W1,
    ANY_IDS,
  )
  assert_same(expected, np.broadcast_to(W1[0], (*ANY_IDS.shape, D)))
  assert_same(got, expected)  # "clip"
  # the gradient of row 0 is the sum of all cotangents
  assert_close(grad, cotangent.sum(axis=(0, 1))[None], rtol=1e-5)
  assert_close(grad, expected_grad)

  # Under the default "fill" only id 0 is in range (flax broadcasts anyway).
  zero = ANY_IDS == 0
  assert np.isnan(np.asarray(fill)[~zero]).all()
  assert_same(np.asarray(fill)[zero], np.asarray(expected)[zero])
  assert_close(fill_grad, cotangent[zero].sum(axis=0)[None])


@pytest.mark.parametrize("policy", ["fill", "clip", "wrap"])
def test_vocab_of_one_gradient_is_a_sum_not_a_scatter(policy):
  ids = jnp.asarray(ANY_IDS)

  def grad_jaxpr(w):
    def loss(w):
      out = ne.lookup(trainable_table(w), ids, out_of_range=policy)
      return jnp.sum(arrange(out, "embedding"))

    return str(jax.make_jaxpr(jax.grad(loss))(w))

  assert "scatter" not in grad_jaxpr(W1)
  # Control: the printed jaxpr does show nested scatters for a real gather.
  assert "scatter" in grad_jaxpr(W[:2])


def test_frozen_table_has_exactly_zero_gradient(run):
  """`from_pretrained` freezes by default: values as flax, gradient zero."""

  def frozen_lookup(w, ids):
    return ne_lookup_raw("function", ne.EmbeddingTable.from_pretrained(w), ids)

  def frozen_decode(w, query):
    table = ne.EmbeddingTable.from_pretrained(w)
    assert table.frozen
    return ne_decode_raw("layer", table, query, "named")

  got, grad = run(value_and_grad(frozen_lookup, IDS_CT), W, IDS)
  assert_same(got, W[IDS])
  assert_zero(grad)

  (expected, (_, expected_grad_q)), (got, (grad_w, grad_q)) = run(
    together(
      value_and_grad(linen_attend, Q_CT, argnums=(0, 1)),
      value_and_grad(frozen_decode, Q_CT, argnums=(0, 1)),
    ),
    W,
    Q,
  )
  assert_close(got, expected)
  assert_zero(grad_w)
  assert_close(grad_q, expected_grad_q)  # the hidden input still trains


def test_gradient_through_freeze_params_and_bind_variables(run):
  """Two ways to differentiate a trainable table without rebuilding it."""
  table = ne.EmbeddingTable.from_pretrained(W, freeze=False)
  assert isinstance(table.embeddings, pz.Parameter) and not table.frozen
  expected = scatter_add(V, IDS, IDS_CT)

  def loss(t):
    return jnp.sum(ne_lookup_raw("layer", t, IDS) * IDS_CT)

  frozen = pz.freeze_params(table)
  assert isinstance(frozen.embeddings, pz.ParameterValue)
  grad = run(jax.grad(loss), frozen)
  assert isinstance(grad.embeddings, pz.ParameterValue)
  assert_close(grad.rows_array(), expected)

  unbound, params = pz.unbind_params(table)
  assert len(params) == 1

  def bound_loss(values):
    return loss(pz.bind_variables(unbound, values))

  grads = run(jax.grad(bound_loss), [p.freeze() for p in params])
  assert_close(arrange(grads[0].value, "vocabulary", "embedding"), expected)


# =================================================================== penzai

PZ_V = 7
TABLE_AXES = {
  "single": (("vocabulary", "embedding"), (PZ_V, 5)),
  "multi": (("vocabulary", "heads", "head_dim"), (PZ_V, 2, 3)),
  # stored with the vocabulary axis in the middle
  "multi_permuted": (("head_dim", "vocabulary", "heads"), (3, PZ_V, 2)),
}
PZ_TABLES = {name: normal(*shape) for name, (_, shape) in TABLE_AXES.items()}
PZ_IDS = RNG.integers(0, PZ_V, size=(2, 3, 4)).astype(np.int32)


def named_table_value(kind, w):
  return pz.nx.wrap(w).tag(*TABLE_AXES[kind][0])


def penzai_table(kind, w):
  return pz.nn.EmbeddingTable(
    embeddings=pz.ParameterValue(value=named_table_value(kind, w), label="t"),
    vocabulary_axis="vocabulary",
  )


def ne_table(kind, w, build):
  value = named_table_value(kind, w)
  if build == "from_pretrained":
    return ne.EmbeddingTable.from_pretrained(value, freeze=False)
  # kept in the storage order given, through the constructor
  return ne.EmbeddingTable(pz.ParameterValue(value=value, label="t"))


def token_array(kind: str, ids) -> pz.nx.NamedArrayBase:
  """Token ids ``[2, 3, 4]`` in different named/positional/view layouts."""
  named = pz.nx.wrap(ids).tag("batch", "seq", "chunk")
  if kind == "named":
    return named
  if kind == "positional":
    return pz.nx.wrap(ids)
  if kind == "mixed":
    return pz.nx.wrap(ids).tag_prefix("batch")
  if kind == "relabelled":  # swaps which data axis is "batch"/"chunk"
    return named.untag("chunk", "batch").tag("batch", "chunk")
  if kind == "view_named":  # data stored as [seq, chunk, batch]
    stored = pz.nx.wrap(jnp.transpose(ids, (1, 2, 0)))
    return stored.tag("seq", "chunk", "batch").as_namedarrayview()
  if kind == "view_positional":
    return named.untag("seq")
  if kind == "nmap":
    return pz.nx.nmap(lambda x: x[::-1])(named.untag("chunk"))
  raise ValueError(kind)


def canonical(x: pz.nx.NamedArrayBase) -> pz.nx.NamedArray:
  out = x.canonicalize()
  assert isinstance(out, pz.nx.NamedArray)
  return out


def assert_named_equal(actual, expected, close=False) -> None:
  actual, expected = canonical(actual), canonical(expected)
  assert actual.positional_shape == expected.positional_shape
  assert actual.named_axes == expected.named_axes
  (assert_close if close else assert_same)(
    actual.data_array, expected.data_array
  )


# Every token layout once; every table layout at least twice and both ways
# of building a table (the hypothesis tests below mix layouts at random).
PZ_LOOKUP_CASES = [
  ("named", "multi_permuted", "constructor"),
  ("positional", "multi", "from_pretrained"),
  ("mixed", "multi_permuted", "constructor"),
  ("relabelled", "single", "constructor"),
  ("view_named", "multi", "from_pretrained"),
  ("view_positional", "multi_permuted", "constructor"),
  ("nmap", "single", "from_pretrained"),
]


@pytest.mark.parametrize("token_kind, table_kind, build", PZ_LOOKUP_CASES)
def test_penzai_lookup(run, token_kind, table_kind, build):
  w = PZ_TABLES[table_kind]
  ids = token_array(token_kind, PZ_IDS)

  def reference(w, ids):
    return pz.nn.EmbeddingLookup(penzai_table(table_kind, w))(ids)

  def ours(w, ids):
    return ne.EmbeddingLookup(ne_table(table_kind, w, build))(ids)

  def ours_function(w, ids):
    return ne.lookup(ne_table(table_kind, w, build), ids)

  shape = jax.eval_shape(lambda w, i: canonical(reference(w, i)), w, ids)
  cotangent = normal(*shape.data_array.shape)

  def raw_of(f):
    return lambda w, ids: canonical(f(w, ids)).data_array

  # The reference always runs compiled (fewer compilations when eager).
  expected, (_, expected_grad) = jax.jit(
    together(reference, value_and_grad(raw_of(reference), cotangent))
  )(w, ids)
  got, got_function, (_, grad) = run(
    together(ours, ours_function, value_and_grad(raw_of(ours), cotangent)),
    w,
    ids,
  )
  assert_named_equal(got, expected)
  assert_named_equal(got_function, expected)
  assert np.abs(np.asarray(expected_grad)).max() > 0
  assert_close(grad, expected_grad)


def hidden_array(kind: str, table_kind: str, h) -> pz.nx.NamedArrayBase:
  """Hidden ``[batch, seq, *embedding]`` in different named/view layouts.

  (penzai's decode rejects positional axes, so all batch axes are named.)
  """
  names = TABLE_AXES[table_kind][0]
  embedding = sorted(n for n in names if n != "vocabulary")
  named = pz.nx.wrap(h).tag("batch", "seq", *embedding)
  if kind == "named":
    return named
  if kind == "relabelled":  # "batch" swaps with the last axis
    last = embedding[-1]
    return named.untag(last, "batch").tag("batch", last)
  if kind == "view":  # data stored as [*embedding, seq, batch]
    stored = pz.nx.wrap(jnp.transpose(h, (*range(2, h.ndim), 1, 0)))
    return stored.tag(*embedding, "seq", "batch").as_namedarrayview()
  if kind == "nmap":
    return pz.nx.nmap(lambda x: 2.0 * x)(named.untag("seq")).tag("seq")
  raise ValueError(kind)


@pytest.mark.parametrize(
  "hidden_kind, table_kind, build",
  [
    ("named", "single", "from_pretrained"),
    ("named", "multi_permuted", "constructor"),
    ("relabelled", "multi", "from_pretrained"),
    ("view", "multi", "constructor"),
    ("nmap", "multi_permuted", "from_pretrained"),
  ],
)
def test_penzai_decode(run, hidden_kind, table_kind, build):
  w = PZ_TABLES[table_kind]
  names, shape = TABLE_AXES[table_kind]
  sizes = dict(zip(names, shape, strict=True))
  embedding = sorted(n for n in names if n != "vocabulary")
  h = normal(3, 2, *(sizes[n] for n in embedding))
  if hidden_kind == "relabelled":  # "batch" swaps with the last axis
    h = normal(sizes[embedding[-1]], 2, *(sizes[n] for n in embedding[:-1]), 3)

  def reference(w, h):
    table = penzai_table(table_kind, w)
    return pz.nn.EmbeddingDecode(table)(
      hidden_array(hidden_kind, table_kind, h)
    )

  def ours(w, h):
    table = ne_table(table_kind, w, build)
    return ne.EmbeddingDecode(table)(hidden_array(hidden_kind, table_kind, h))

  def ours_function(w, h):
    table = ne_table(table_kind, w, build)
    return ne.decode(table, hidden_array(hidden_kind, table_kind, h))

  shape = jax.eval_shape(lambda w, h: canonical(reference(w, h)), w, h)
  cotangent = normal(*shape.data_array.shape)

  def raw_of(f):
    return lambda w, h: canonical(f(w, h)).data_array

  expected, (_, expected_grads) = jax.jit(
    together(
      reference,
      value_and_grad(raw_of(reference), cotangent, argnums=(0, 1)),
    )
  )(w, h)
  got, got_function, (_, grads) = run(
    together(
      ours,
      ours_function,
      value_and_grad(raw_of(ours), cotangent, argnums=(0, 1)),
    ),
    w,
    h,
  )
  assert dict(expected.named_shape) == {"batch": 3, "seq": 2, "vocabulary": 7}
  assert_named_equal(got, expected, close=True)
  assert_named_equal(got_function, expected, close=True)
  for got, want in zip(grads, expected_grads, strict=True):
    assert_close(got, want)


# =============================================================== hypothesis

# When a hypothesis test fails, its pytest plugin imports libcst to write a
# patch, and libcst triggers this DeprecationWarning, which `filterwarnings =
# error` turns into an INTERNALERROR that hides the real failure.
LIBCST_WARNING = pytest.mark.filterwarnings(
  "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

# Distinct identifiers; none is a name the tests use for anything else
# (positional token axes are tagged "p0", "p1", ... only transiently).
AXIS_NAMES = ("a", "b", "x", "y", "seq", "batch", "heads", "k", "embed", "v")


# Token axis sizes: mostly 2-4 (several tokens per example, so that a wrong
# row is likely to be read), sometimes 1. (Empty lookups: a fixed test.)
TOKEN_AXIS_SIZES = st.sampled_from((3, 2, 4, 1))


@st.composite
def layouts(draw, max_token_axes: int = 3):
  """Random names, sizes and storage layouts for a table and an input."""
  n_embedding = draw(st.integers(1, 3))
  n_named = draw(st.integers(0, 2))
  n_positional = draw(st.integers(0, max_token_axes - n_named))
  names = draw(
    st.lists(
      st.sampled_from(AXIS_NAMES),
      min_size=1 + n_embedding + n_named,
      max_size=1 + n_embedding + n_named,
      unique=True,
    )
  )
  n_input = n_positional + n_named + n_embedding
  return dict(
    vocab_axis=names[0],
    vocab=draw(st.integers(1, 9)),
    embedding=tuple(names[1 : 1 + n_embedding]),
    embedding_sizes=tuple(draw(st.integers(1, 4)) for _ in range(n_embedding)),
    named=tuple(names[1 + n_embedding :]),
    named_sizes=tuple(draw(TOKEN_AXIS_SIZES) for _ in range(n_named)),
    positional_sizes=tuple(draw(TOKEN_AXIS_SIZES) for _ in range(n_positional)),
    table_perm=tuple(draw(st.permutations(range(1 + n_embedding)))),
    input_perm=tuple(draw(st.permutations(range(n_input)))),
    seed=draw(st.integers(0, 2**32 - 1)),
    eager=draw(st.booleans()),  # also check the values eagerly
  )


def build_table(lay, w) -> ne.EmbeddingTable:
  """A trainable table of ``w`` ([V, *embedding]) stored in a random layout."""
  logical = (lay["vocab_axis"], *lay["embedding"])
  perm = lay["table_perm"]
  value = pz.nx.wrap(jnp.transpose(w, perm)).tag(*(logical[i] for i in perm))
  return ne.EmbeddingTable(
    pz.ParameterValue(value=value, label="t"), vocabulary_axis=lay["vocab_axis"]
  )


def build_input(lay, logical_data, trailing=()):
  """A named array holding ``logical_data`` (``[*positional, *named,
  *trailing]``) with its data axes stored in a random order."""
  pos = tuple(f"p{i}" for i in range(len(lay["positional_sizes"])))
  logical_names = (*pos, *lay["named"], *trailing)
  # the ranking of a prefix of a random permutation: a random permutation
  perm = tuple(
    int(i) for i in np.argsort(lay["input_perm"][: len(logical_names)])
  )
  out = pz.nx.wrap(jnp.transpose(logical_data, perm))
  if logical_names:
    out = out.tag(*(logical_names[i] for i in perm))
  if pos:
    out = out.untag(*pos)
  return out


def check_lookup(lay, ids, policy):
  """ne.lookup's values and table gradient against a raw reference."""
  rng = np.random.default_rng(lay["seed"])
  vocab = lay["vocab"]
  w = rng.normal(size=(vocab, *lay["embedding_sizes"])).astype(np.float32)
  cotangent = rng.normal(size=ids.shape + w.shape[1:]).astype(np.float32)
  n_pos = len(lay["positional_sizes"])

  def ours(w, ids):
    options = {} if policy is None else {"out_of_range": policy}
    out = ne.lookup(build_table(lay, w), build_input(lay, ids), **options)
    assert out.positional_shape == ids.shape[:n_pos]
    return arrange(out, *lay["named"], *lay["embedding"])

  if policy in (None, "fill"):
    rows = np.where((ids >= 0) & (ids < vocab), ids, -1)
  elif policy == "clip":
    rows = np.clip(ids, 0, vocab - 1)
  else:
    rows = np.mod(ids, vocab)
  valid = rows >= 0

  def reference(w, ids):
    del ids  # the reference reads the rows the policy picks
    return jnp.take(w, np.where(valid, rows, 0), axis=0)

  # Gradients compiled (eager ones are covered by the fixed tests above,
  # and each example's new shapes would cost many small compilations).
  (got, grad), expected = jax.jit(
    together(value_and_grad(ours, cotangent), reference)
  )(w, ids)
  expected = np.array(expected)
  expected[~valid] = np.nan
  assert_same(got, expected)
  if lay["eager"]:
    assert_same(ours(w, ids), expected)
  # fill: no row gets anything from a bad id; clip/wrap: the row read does
  assert_close(
    grad, scatter_add(vocab, rows[valid], cotangent[valid]), rtol=1e-5
  )


@LIBCST_WARNING
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(lay=layouts())
def test_property_lookup_matches_take(lay):
  rng = np.random.default_rng(lay["seed"] + 1)
  shape = (*lay["positional_sizes"], *lay["named_sizes"])
  ids = rng.integers(0, lay["vocab"], size=shape).astype(np.int32)
  check_lookup(lay, ids, None)


@LIBCST_WARNING
@pytest.mark.parametrize("policy", ["fill", "clip", "wrap"])
@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(lay=layouts())
def test_property_out_of_range_policies(policy, lay):
  rng = np.random.default_rng(lay["seed"] + 2)
  shape = (*lay["positional_sizes"], *lay["named_sizes"])
  v = lay["vocab"]
  ids = rng.integers(-2 * v - 2, 2 * v + 3, size=shape).astype(np.int32)
  check_lookup(lay, ids, policy)


@LIBCST_WARNING
@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(lay=layouts())
def test_property_decode_matches_einsum(lay):
  rng = np.random.default_rng(lay["seed"])
  vocab, sizes = lay["vocab"], lay["embedding_sizes"]
  batch_shape = (*lay["positional_sizes"], *lay["named_sizes"])
  w = rng.normal(size=(vocab, *sizes)).astype(np.float32)
  h = rng.normal(size=(*batch_shape, *sizes)).astype(np.float32)
  cotangent = rng.normal(size=(*batch_shape, vocab)).astype(np.float32)

  def ours(w, h):
    hidden = build_input(lay, h, trailing=lay["embedding"])
    out = ne.decode(build_table(lay, w), hidden)
    return arrange(out, *lay["named"], lay["vocab_axis"])

  n_batch, n_emb = len(batch_shape), len(sizes)
  vocab_index = n_batch + n_emb
  h_index = list(range(n_batch + n_emb))
  w_index = [vocab_index, *range(n_batch, n_batch + n_emb)]
  out_index = [*range(n_batch), vocab_index]

  def reference(w, h):
    return jnp.einsum(h, h_index, w, w_index, out_index)

  (got, grads), (expected, expected_grads) = jax.jit(
    together(
      value_and_grad(ours, cotangent, argnums=(0, 1)),
      value_and_grad(reference, cotangent, argnums=(0, 1)),
    )
  )(w, h)
  assert_close(got, expected, rtol=1e-5)
  if lay["eager"]:
    assert_close(ours(w, h), expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads, strict=True):
    assert_close(got, want, rtol=1e-5)
