"""named_embed against independent references: flax, penzai and raw jax.

- flax: ``flax.linen.Embed`` and ``flax.nnx.Embed`` (``__call__`` and
  ``attend``) fed the same array as a named_embed table.
- penzai: ``pz.nn.EmbeddingLookup`` / ``pz.nn.EmbeddingDecode`` on the same
  named table (multi-axis tables, named, positional and view inputs).
- raw jax/numpy: hypothesis properties against ``jnp.take``, ``jnp.einsum``
  and a numpy scatter-add, including the out-of-range policies.

Values and gradients are compared, eagerly and under `jax.jit`.
"""

from __future__ import annotations

import collections

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
  assert set(names) == set(x.named_shape) and len(names) == len(
    x.named_shape
  ), (names, x.named_shape)
  tmp = tuple(f"_pos{i}" for i in range(len(x.positional_shape)))
  if tmp:
    x = x.tag_prefix(*tmp)
  if tmp or names:
    return x.untag(*tmp, *names).unwrap()
  return x.unwrap()


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


def ne_decode_raw(form, table, query, hidden_layout):
  """Decode of a raw ``[b, s, embedding]`` query, as ``[b, s, vocabulary]``."""
  hidden = pz.nx.wrap(query).tag("b", "s", "embedding")
  if hidden_layout == "positional":
    hidden = hidden.untag("b", "s")
  elif hidden_layout == "view":
    hidden = hidden.untag("embedding", "b").tag("embedding", "b")
  if form == "function":
    out = ne.decode(table, hidden)
  else:
    out = ne.EmbeddingDecode(table)(hidden)
  if hidden_layout == "positional":
    return arrange(out, "vocabulary")
  return arrange(out, "b", "s", "vocabulary")


@pytest.mark.parametrize("form", ["function", "layer"])
@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
@pytest.mark.parametrize("tokens", ["numpy", "wrapped", "named"])
def test_flax_lookup_in_range(run, flax_api, form, tokens):
  flax_lookup = FLAX_LOOKUP[flax_api]

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

  expected = run(flax_lookup, W, IDS)
  assert_same(expected, W[IDS])  # the reference itself
  assert_same(run(ne_lookup, W, IDS), expected)

  ne_loss = lambda w, ids: jnp.sum(ne_lookup(w, ids) * IDS_CT)
  flax_loss = lambda w, ids: jnp.sum(flax_lookup(w, ids) * IDS_CT)
  expected_grad = run(jax.grad(flax_loss), W, IDS)
  assert np.abs(np.asarray(expected_grad)).min() > 0  # every row is read
  assert_close(run(jax.grad(ne_loss), W, IDS), expected_grad)


@pytest.mark.parametrize("form", ["function", "layer"])
@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
@pytest.mark.parametrize("hidden_layout", ["named", "positional", "view"])
def test_flax_attend_matches_decode(run, flax_api, form, hidden_layout):
  flax_attend = FLAX_ATTEND[flax_api]

  def ne_decode(w, query):
    return ne_decode_raw(form, trainable_table(w), query, hidden_layout)

  expected = run(flax_attend, W, Q)
  assert_close(expected, np.einsum("bse,ve->bsv", Q, W), rtol=1e-5)
  assert_close(run(ne_decode, W, Q), expected)

  ne_loss = lambda w, q: jnp.sum(ne_decode(w, q) * Q_CT)
  flax_loss = lambda w, q: jnp.sum(flax_attend(w, q) * Q_CT)
  grad = jax.grad(ne_loss, argnums=(0, 1))
  expected_grad = run(jax.grad(flax_loss, argnums=(0, 1)), W, Q)
  for got, want in zip(run(grad, W, Q), expected_grad, strict=True):
    assert_close(got, want)


HIGH_IDS = np.array([[0, V, 3], [V + 1, 2**31 - 1, 5], [1000, 2, V - 1]])


@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
def test_ids_at_or_above_vocab_are_nan_in_flax_and_in_default_fill(
  run, flax_api
):
  flax_lookup = FLAX_LOOKUP[flax_api]
  ids = HIGH_IDS.astype(np.int32)
  bad = ids >= V
  cotangent = normal(*ids.shape, D)

  expected = np.asarray(run(flax_lookup, W, ids))
  assert np.isnan(expected[bad]).all()
  assert not np.isnan(expected[~bad]).any()
  got = run(
    lambda w, i: ne_lookup_raw("function", trainable_table(w), i), W, ids
  )
  assert_same(got, expected)
  got = run(lambda w, i: ne_lookup_raw("layer", trainable_table(w), i), W, ids)
  assert_same(got, expected)

  # Gradients: neither sends any to a row from the bad ids.
  ne_loss = lambda w, i: jnp.sum(
    ne_lookup_raw("function", trainable_table(w), i) * cotangent
  )
  flax_loss = lambda w, i: jnp.sum(flax_lookup(w, i) * cotangent)
  expected_grad = np.asarray(run(jax.grad(flax_loss), W, ids))
  manual = np.zeros_like(W)
  np.add.at(manual, ids[~bad], cotangent[~bad])
  assert_close(expected_grad, manual)
  assert_close(run(jax.grad(ne_loss), W, ids), expected_grad)


NEG_IDS = np.array([[-1, 0, -V], [3, -2, -V + 1], [V - 1, -3, 2]], np.int32)


@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
def test_negative_ids_flax_wraps_ne_fill_gives_nan_ne_wrap_agrees(
  run, flax_api
):
  """Documented difference: flax (numpy indexing) wraps ids in [-V, -1];
  ne's default "fill" treats every negative id as out of range (NaN, no
  gradient); ne's "wrap" policy reproduces flax there."""
  flax_lookup = FLAX_LOOKUP[flax_api]
  ids = NEG_IDS
  negative = ids < 0
  cotangent = normal(*ids.shape, D)

  expected = np.asarray(run(flax_lookup, W, ids))
  assert_same(expected, W[ids])  # numpy semantics: -1 is the last row

  fill = np.asarray(
    run(lambda w, i: ne_lookup_raw("function", trainable_table(w), i), W, ids)
  )
  assert np.isnan(fill[negative]).all()
  assert_same(fill[~negative], expected[~negative])

  for form in ("function", "layer"):

    def ne_wrap(w, i, form=form):
      return ne_lookup_raw(form, trainable_table(w), i, out_of_range="wrap")

    assert_same(run(ne_wrap, W, ids), expected)
    ne_loss = lambda w, i, f=ne_wrap: jnp.sum(f(w, i) * cotangent)
    flax_loss = lambda w, i: jnp.sum(flax_lookup(w, i) * cotangent)
    assert_close(
      run(jax.grad(ne_loss), W, ids), run(jax.grad(flax_loss), W, ids)
    )

  # and "fill" keeps the negative ids' cotangent away from every row
  fill_loss = lambda w, i: jnp.sum(
    ne_lookup_raw("function", trainable_table(w), i) * cotangent
  )
  manual = np.zeros_like(W)
  np.add.at(manual, ids[~negative], cotangent[~negative])
  assert_close(run(jax.grad(fill_loss), W, ids), manual)


W1 = normal(1, D)
ANY_IDS = np.array([[0, 1, -1], [7, -100, 2**31 - 1]], np.int32)


@pytest.mark.parametrize("form", ["function", "layer"])
@pytest.mark.parametrize("flax_api", ["linen", "nnx"])
def test_vocab_of_one_broadcasts_row_zero_like_flax(run, flax_api, form):
  flax_lookup = FLAX_LOOKUP[flax_api]
  cotangent = normal(*ANY_IDS.shape, D)

  def ne_clip(w, i):
    return ne_lookup_raw(form, trainable_table(w), i, out_of_range="clip")

  expected = run(flax_lookup, W1, ANY_IDS)
  assert_same(expected, np.broadcast_to(W1[0], (*ANY_IDS.shape, D)))
  assert_same(run(ne_clip, W1, ANY_IDS), expected)

  ne_loss = lambda w, i: jnp.sum(ne_clip(w, i) * cotangent)
  flax_loss = lambda w, i: jnp.sum(flax_lookup(w, i) * cotangent)
  got = run(jax.grad(ne_loss), W1, ANY_IDS)
  assert_close(got, cotangent.sum(axis=(0, 1))[None], rtol=1e-5)
  assert_close(got, run(jax.grad(flax_loss), W1, ANY_IDS))

  # Under the default "fill" only id 0 is in range (flax broadcasts anyway).
  fill = np.asarray(
    run(lambda w, i: ne_lookup_raw(form, trainable_table(w), i), W1, ANY_IDS)
  )
  zero = ANY_IDS == 0
  assert np.isnan(fill[~zero]).all()
  assert_same(fill[zero], np.asarray(expected)[zero])


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
    return ne_decode_raw(
      "layer", ne.EmbeddingTable.from_pretrained(w), query, "named"
    )

  assert_same(run(frozen_lookup, W, IDS), run(linen_lookup, W, IDS))
  assert_close(run(frozen_decode, W, Q), run(linen_attend, W, Q))

  lookup_loss = lambda w, i: jnp.sum(frozen_lookup(w, i) * IDS_CT)
  assert_zero(run(jax.grad(lookup_loss), W, IDS))

  decode_loss = lambda w, q: jnp.sum(frozen_decode(w, q) * Q_CT)
  grad_w, grad_q = run(jax.grad(decode_loss, argnums=(0, 1)), W, Q)
  assert_zero(grad_w)
  # The hidden input still gets its gradient.
  flax_loss = lambda w, q: jnp.sum(linen_attend(w, q) * Q_CT)
  assert_close(grad_q, run(jax.grad(flax_loss, argnums=1), W, Q))


def test_gradient_through_freeze_params_and_bind_variables(run):
  """Two ways to differentiate a trainable table without rebuilding it."""
  table = ne.EmbeddingTable.from_pretrained(W, freeze=False)
  assert isinstance(table.embeddings, pz.Parameter) and not table.frozen
  flax_loss = lambda w: jnp.sum(linen_lookup(w, IDS) * IDS_CT)
  expected = run(jax.grad(flax_loss), W)

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
  # kept in storage order as given, through the constructor
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
  if kind == "view_reordered":  # swaps which data axis is "batch"/"chunk"
    return named.untag("chunk", "batch").tag("batch", "chunk")
  if kind == "view_positional":
    return named.untag("seq")
  if kind == "nmap":
    return pz.nx.nmap(lambda x: x[::-1])(named.untag("chunk"))
  raise ValueError(kind)


TOKEN_KINDS = [
  "named",
  "positional",
  "mixed",
  "view_reordered",
  "view_positional",
  "nmap",
]


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


@pytest.mark.parametrize("build", ["from_pretrained", "constructor"])
@pytest.mark.parametrize("table_kind", list(TABLE_AXES))
@pytest.mark.parametrize("token_kind", TOKEN_KINDS)
def test_penzai_lookup(run, token_kind, table_kind, build):
  w = PZ_TABLES[table_kind]
  ids = token_array(token_kind, PZ_IDS)

  def reference(w, ids):
    return pz.nn.EmbeddingLookup(penzai_table(table_kind, w))(ids)

  def ours(w, ids):
    return ne.EmbeddingLookup(ne_table(table_kind, w, build))(ids)

  def ours_function(w, ids):
    return ne.lookup(ne_table(table_kind, w, build), ids)

  expected = run(reference, w, ids)
  assert_named_equal(run(ours, w, ids), expected)
  assert_named_equal(run(ours_function, w, ids), expected)

  cotangent = normal(*canonical(expected).data_array.shape)

  def loss_of(f):
    return lambda w, ids: jnp.sum(canonical(f(w, ids)).data_array * cotangent)

  expected_grad = run(jax.grad(loss_of(reference)), w, ids)
  assert np.abs(np.asarray(expected_grad)).max() > 0
  assert_close(run(jax.grad(loss_of(ours)), w, ids), expected_grad)
  assert_close(run(jax.grad(loss_of(ours_function)), w, ids), expected_grad)


def hidden_array(kind: str, table_kind: str, h) -> pz.nx.NamedArrayBase:
  """Hidden ``[batch, seq, *embedding]`` in different named/view layouts.

  (penzai's decode rejects positional axes, so all batch axes are named.)
  """
  embedding = TABLE_AXES[table_kind][0]
  embedding = tuple(n for n in embedding if n != "vocabulary")
  named = pz.nx.wrap(h).tag("batch", "seq", *sorted(embedding))
  if kind == "named":
    return named
  if kind == "view_reordered":
    last = sorted(embedding)[-1]
    return named.untag(last, "batch").tag("batch", last)
  if kind == "nmap":
    return pz.nx.nmap(lambda x: 2.0 * x)(named.untag("seq")).tag("seq")
  raise ValueError(kind)


@pytest.mark.parametrize("build", ["from_pretrained", "constructor"])
@pytest.mark.parametrize("table_kind", list(TABLE_AXES))
@pytest.mark.parametrize("hidden_kind", ["named", "view_reordered", "nmap"])
def test_penzai_decode(run, hidden_kind, table_kind, build):
  w = PZ_TABLES[table_kind]
  names, shape = TABLE_AXES[table_kind]
  sizes = dict(zip(names, shape, strict=True))
  embedding = sorted(n for n in names if n != "vocabulary")
  h = normal(3, 2, *(sizes[n] for n in embedding))
  if hidden_kind == "view_reordered":  # "batch" swaps with the last axis
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

  expected = run(reference, w, h)
  assert dict(expected.named_shape) == {"batch": 3, "seq": 2, "vocabulary": 7}
  assert_named_equal(run(ours, w, h), expected, close=True)
  assert_named_equal(run(ours_function, w, h), expected, close=True)

  cotangent = normal(*canonical(expected).data_array.shape)

  def loss_of(f):
    return lambda w, h: jnp.sum(canonical(f(w, h)).data_array * cotangent)

  expected_grads = run(jax.grad(loss_of(reference), argnums=(0, 1)), w, h)
  for f in (ours, ours_function):
    grads = run(jax.grad(loss_of(f), argnums=(0, 1)), w, h)
    for got, want in zip(grads, expected_grads, strict=True):
      assert_close(got, want)


# =============================================================== hypothesis

# Axis names: identifiers that are never table/token reserved words here,
# drawn distinct; positional token axes are named "_pos*" only by `arrange`.
AXIS_NAMES = ("a", "b", "x", "y", "seq", "batch", "heads", "k", "embed", "v")


@st.composite
def layouts(draw, max_token_axes: int = 3):
  """Random names and shapes for a table and a token (or hidden) array."""
  n_embedding = draw(st.integers(1, 3))
  n_named = draw(st.integers(0, 2))
  names = draw(
    st.lists(
      st.sampled_from(AXIS_NAMES),
      min_size=2 + n_embedding + n_named,
      max_size=2 + n_embedding + n_named,
      unique=True,
    )
  )
  vocab_axis, embedding, named = (
    names[0],
    tuple(names[1 : 1 + n_embedding]),
    tuple(names[1 + n_embedding : 1 + n_embedding + n_named]),
  )
  n_positional = draw(st.integers(0, max(0, max_token_axes - n_named)))
  return dict(
    vocab_axis=vocab_axis,
    vocab=draw(st.integers(1, 9)),
    embedding=embedding,
    embedding_sizes=tuple(draw(st.integers(1, 4)) for _ in embedding),
    named=named,
    named_sizes=tuple(draw(st.integers(0, 3)) for _ in named),
    positional_sizes=tuple(
      draw(st.integers(0, 3)) for _ in range(n_positional)
    ),
    table_perm=tuple(draw(st.permutations(range(1 + n_embedding)))),
    data_perm=tuple(
      draw(st.permutations(range(n_positional + n_named + n_embedding)))
    ),
    seed=draw(st.integers(0, 2**32 - 1)),
    jit=draw(st.booleans()),
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
  """``logical_data`` is ``[*positional, *named, *trailing]``; returns a named
  array holding it with its data axes in the random order ``data_perm``."""
  n_pos = len(lay["positional_sizes"])
  pos = tuple(f"p{i}" for i in range(n_pos))  # "p*" is not in AXIS_NAMES
  logical_names = (*pos, *lay["named"], *trailing)
  # the ranking of a prefix of a random permutation: a random permutation
  perm = tuple(
    int(i) for i in np.argsort(lay["data_perm"][: len(logical_names)])
  )
  data = jnp.transpose(logical_data, perm)
  out = pz.nx.wrap(data)
  if logical_names:
    out = out.tag(*(logical_names[i] for i in perm))
  if pos:
    out = out.untag(*pos)
  return out


def maybe_jit(lay, f):
  return jax.jit(f) if lay["jit"] else f


def check_lookup(lay, ids, policy):
  """Compares ne.lookup's values and gradients with a raw reference."""
  rng = np.random.default_rng(lay["seed"])
  vocab = lay["vocab"]
  w = rng.normal(size=(vocab, *lay["embedding_sizes"])).astype(np.float32)
  out_shape = ids.shape + w.shape[1:]
  cotangent = rng.normal(size=out_shape).astype(np.float32)

  def ours(w, ids):
    tokens = build_input(lay, ids)
    kwargs = {} if policy is None else {"out_of_range": policy}
    out = ne.lookup(build_table(lay, w), tokens, **kwargs)
    assert out.positional_shape == ids.shape[: len(lay["positional_sizes"])]
    return arrange(out, *lay["named"], *lay["embedding"])

  if policy in (None, "fill"):
    rows = np.where(np.logical_and(ids >= 0, ids < vocab), ids, -1)
  elif policy == "clip":
    rows = np.clip(ids, 0, vocab - 1)
  else:
    rows = np.mod(ids, vocab)
  valid = rows >= 0
  expected = np.asarray(jnp.take(w, np.where(valid, rows, 0), axis=0))
  expected[~valid] = np.nan

  got = maybe_jit(lay, ours)(w, ids)
  assert_same(got, expected)

  loss = lambda w, ids: jnp.sum(ours(w, ids) * cotangent)
  grad = maybe_jit(lay, jax.grad(loss))(w, ids)
  manual = np.zeros(w.shape, np.float64)
  np.add.at(manual, rows[valid], cotangent[valid])
  ref_loss = lambda w: jnp.sum(
    jnp.take(w, rows[valid], axis=0) * cotangent[valid]
  )
  assert_close(grad, jax.grad(ref_loss)(w))
  assert_close(grad, manual.astype(np.float32), rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(lay=layouts())
def test_property_lookup_matches_take(lay):
  rng = np.random.default_rng(lay["seed"] + 1)
  shape = (*lay["positional_sizes"], *lay["named_sizes"])
  ids = rng.integers(0, lay["vocab"], size=shape).astype(np.int32)
  check_lookup(lay, ids, None)


@pytest.mark.parametrize("policy", ["fill", "clip", "wrap"])
@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(lay=layouts())
def test_property_out_of_range_policies(policy, lay):
  rng = np.random.default_rng(lay["seed"] + 2)
  shape = (*lay["positional_sizes"], *lay["named_sizes"])
  v = lay["vocab"]
  ids = rng.integers(-2 * v - 2, 2 * v + 3, size=shape).astype(np.int32)
  check_lookup(lay, ids, policy)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(lay=layouts())
def test_property_decode_matches_einsum(lay):
  rng = np.random.default_rng(lay["seed"])
  vocab, esizes = lay["vocab"], lay["embedding_sizes"]
  batch_shape = (*lay["positional_sizes"], *lay["named_sizes"])
  w = rng.normal(size=(vocab, *esizes)).astype(np.float32)
  h = rng.normal(size=(*batch_shape, *esizes)).astype(np.float32)
  cotangent = rng.normal(size=(*batch_shape, vocab)).astype(np.float32)

  def ours(w, h):
    hidden = build_input(lay, h, trailing=lay["embedding"])
    out = ne.decode(build_table(lay, w), hidden)
    return arrange(out, *lay["named"], lay["vocab_axis"])

  nb, ne_ = len(batch_shape), len(esizes)
  h_idx = list(range(nb + ne_))
  w_idx = [nb + ne_, *range(nb, nb + ne_)]
  out_idx = [*range(nb), nb + ne_]

  def reference(w, h):
    return jnp.einsum(h, h_idx, w, w_idx, out_idx)

  assert_close(maybe_jit(lay, ours)(w, h), reference(w, h), rtol=1e-5)

  def loss_of(f):
    return lambda w, h: jnp.sum(f(w, h) * cotangent)

  grads = maybe_jit(lay, jax.grad(loss_of(ours), argnums=(0, 1)))(w, h)
  expected = jax.grad(loss_of(reference), argnums=(0, 1))(w, h)
  for got, want in zip(grads, expected, strict=True):
    assert_close(got, want, rtol=1e-5)
