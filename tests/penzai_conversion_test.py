"""`EmbeddingTable.from_penzai` / `to_penzai` against penzai's own layers.

The table comes from penzai's Gemma-style builder
(`llamalike_common.build_llamalike_transformer` with Gemma's settings, as
`gemma.gemma_from_pretrained_checkpoint` calls it), bound to random values
the way that loader binds a checkpoint's: penzai's own `EmbeddingLookup`,
`EmbeddingDecode` and the whole model are the references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.models.transformer.variants import llamalike_common

import named_embed as ne
from named_embed._src.files import converters
from named_embed._src.tools import similar

V, D = 64, 16
LABEL = "transformer/embedder.embeddings"
GEMMA_LIKE = llamalike_common.LlamalikeTransformerConfig(
  num_kv_heads=1,
  query_head_multiplier=2,
  embedding_dim=D,
  projection_dim=8,
  mlp_hidden_dim=32,
  num_decoder_blocks=1,
  vocab_size=V,
  mlp_variant="geglu_approx",  # Gemma's settings
  rope_wavelength=10_000,
  tie_embedder_and_logits=True,
)
TOKENS = pz.nx.wrap(jnp.array([[1, 5, 7, 2], [0, 63, 9, 9]])).tag(
  "batch", "seq"
)


def build(init_base_rng):
  return llamalike_common.build_llamalike_transformer(
    GEMMA_LIKE, init_base_rng=init_base_rng, name="transformer"
  )


@functools.cache
def gemma_model():
  """The builder's model, its slots bound to random values (as the Gemma
  loader binds a checkpoint's; penzai's jitted random init compiles for
  seconds)."""
  _, shapes = jax.eval_shape(
    lambda key: pz.unbind_params(build(key), freeze=True), jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  params = []
  for shape in shapes:
    axes = dict(shape.value.named_shape)
    value = rng.normal(size=tuple(axes.values())).astype(np.float32)
    value = pz.nx.wrap(value).tag(*axes)
    params.append(pz.Parameter(value=value, label=shape.label))
  return pz.bind_variables(build(None), params)


def penzai_table(model):
  """The model's one table (its lookup's; its decode's is the same, tied)."""
  lookup, decode = (
    pz.select(model).at_instances_of(pz.nn.EmbeddingTable).get_sequence()
  )
  assert lookup.embeddings.label == decode.embeddings.label
  return lookup


@jax.jit
def logits(model, tokens):
  with jax.numpy_dtype_promotion("standard"):  # penzai's model mixes dtypes
    return model(tokens).order_as("batch", "seq", "vocabulary").data_array


def run(model):
  return np.asarray(logits(pz.freeze_params(model), TOKENS))


def embedding_gradient(model):
  """The gradient of a loss of the logits for the embedding parameter
  (a tied model: the lookup's and the decode's parts summed)."""
  unbound, values = pz.unbind_params(model, freeze=True)

  @jax.jit
  @jax.grad
  def gradient(values):
    with jax.numpy_dtype_promotion("standard"):
      out = pz.bind_variables(unbound, values)(TOKENS)
    return jnp.sum(jnp.tanh(out.unwrap("batch", "seq", "vocabulary")))

  (found,) = [g for g in gradient(values) if g.label == LABEL]
  return np.asarray(found.value.unwrap("vocabulary", "embedding"))


def test_the_gemma_table_converts_keeping_its_parameter():
  pz_table = penzai_table(gemma_model())
  table = ne.EmbeddingTable.from_penzai(pz_table)
  assert table.embeddings is pz_table.embeddings  # the same parameter
  assert table.embeddings.label == LABEL and not table.frozen
  assert table.vocabulary_axis == "vocabulary"
  assert table.embedding_axes == {"embedding": D} and table.vocab_size == V
  want = pz.nn.EmbeddingLookup(pz_table)(TOKENS)
  got = ne.lookup(table, TOKENS)
  order = ("batch", "seq", "embedding")
  np.testing.assert_array_equal(
    np.asarray(got.order_as(*order).data_array),
    np.asarray(want.order_as(*order).data_array),
  )
  hidden = pz.nx.wrap(np.ones((3, D), np.float32)).tag("seq", "embedding")
  np.testing.assert_allclose(
    np.asarray(ne.decode(table, hidden).unwrap("seq", "vocabulary")),
    np.asarray(
      pz.nn.EmbeddingDecode(pz_table)(hidden).unwrap("seq", "vocabulary")
    ),
    rtol=1e-6,
  )


def test_to_penzai_round_trips_into_the_model():
  model = gemma_model()
  pz_table = penzai_table(model)
  back = ne.EmbeddingTable.from_penzai(pz_table).to_penzai()
  assert type(back) is pz.nn.EmbeddingTable
  assert back.embeddings is pz_table.embeddings
  assert back.vocabulary_axis == pz_table.vocabulary_axis
  assert jax.tree.structure(back) == jax.tree.structure(pz_table)
  swapped = pz.select(model).at_instances_of(pz.nn.EmbeddingTable).set(back)
  np.testing.assert_array_equal(run(swapped), run(model))
  labels = [p.label for p in pz.unbind_params(swapped)[1]]
  assert labels == [p.label for p in pz.unbind_params(model)[1]]


def test_the_model_runs_on_our_layers_and_stays_tied():
  model = gemma_model()
  table = ne.EmbeddingTable.from_penzai(penzai_table(model))
  ours = (
    pz.select(model)
    .at_instances_of(pz.nn.EmbeddingLookup)
    .apply(lambda _: ne.EmbeddingLookup(table))
  )
  ours = (
    pz.select(ours)
    .at_instances_of(pz.nn.EmbeddingDecode)
    .apply(lambda _: ne.EmbeddingDecode(table))
  )
  np.testing.assert_allclose(run(ours), run(model), rtol=1e-5, atol=1e-5)
  _, params = pz.unbind_params(ours)
  assert [p.label for p in params].count(LABEL) == 1  # still one, tied
  assert len(params) == len(pz.unbind_params(model)[1])


def test_the_converted_table_trains_as_penzais_tied_layers():
  pz_table = penzai_table(gemma_model())
  table = ne.EmbeddingTable.from_penzai(pz_table)
  theirs = pz.nn.Sequential(
    [pz.nn.EmbeddingLookup(pz_table), pz.nn.EmbeddingDecode(pz_table)]
  )
  ours = pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
  )
  got, want = embedding_gradient(ours), embedding_gradient(theirs)
  assert np.abs(want).sum() > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("holder", ["parameter_value", "array", "slot"])
def test_every_holder_is_kept_both_ways(holder):
  if holder == "slot":  # the Gemma loader's model before binding
    pz_table = penzai_table(build(None))
  elif holder == "parameter_value":
    pz_table = penzai_table(pz.freeze_params(gemma_model()))
  else:
    value = penzai_table(gemma_model()).embeddings.value
    pz_table = pz.nn.EmbeddingTable(
      embeddings=value, vocabulary_axis="vocabulary"
    )
  table = ne.EmbeddingTable.from_penzai(pz_table)
  assert table.embeddings is pz_table.embeddings
  assert type(table.to_penzai().embeddings) is type(pz_table.embeddings)
  assert table.to_penzai().embeddings is pz_table.embeddings
  if holder == "slot":
    assert table.embeddings.label == LABEL
    return
  assert table.frozen == (holder == "array")
  want = penzai_table(gemma_model()).embeddings.value
  np.testing.assert_array_equal(
    np.asarray(table.rows_array()),
    np.asarray(want.unwrap("vocabulary", "embedding")),
  )


def test_axis_names_and_order_are_kept_with_a_vocabulary():
  rng = np.random.default_rng(1)
  value = pz.nx.wrap(rng.normal(size=(2, 5, 3)).astype(np.float32)).tag(
    "heads", "tokens", "head_dim"
  )
  pz_table = pz.nn.EmbeddingTable(
    embeddings=pz.Parameter(value=value, label="embed.embeddings"),
    vocabulary_axis="tokens",
  )
  vocabulary = ne.Vocabulary(["<pad>", "a", "b", "c", "d"], pad="<pad>")
  table = ne.EmbeddingTable.from_penzai(pz_table, vocabulary=vocabulary)
  assert table.vocabulary_axis == "tokens" and table.padding_index == 0
  assert table.embedding_axes == {"heads": 2, "head_dim": 3}
  assert table.embeddings is pz_table.embeddings  # stored order kept
  assert list(table.value.named_axes) == ["heads", "tokens", "head_dim"]
  ids = pz.nx.wrap(jnp.array([4, 1])).tag("seq")
  order = ("seq", "heads", "head_dim")
  np.testing.assert_array_equal(
    np.asarray(ne.lookup(table, ids).order_as(*order).data_array),
    np.asarray(
      pz.nn.EmbeddingLookup(pz_table)(ids).order_as(*order).data_array
    ),
  )
  back = table.to_penzai()  # penzai has no pad row nor vocabulary
  assert back.vocabulary_axis == "tokens"
  assert back.embeddings is pz_table.embeddings
  assert (
    ne.EmbeddingTable.from_penzai(back, padding_index=-1).padding_index == 4
  )


def test_from_penzai_errors_name_what_was_passed():
  pz_table = penzai_table(gemma_model())
  with pytest.raises(TypeError, match="from_penzai expects penzai's .*ndarray"):
    ne.EmbeddingTable.from_penzai(np.ones((3, 2), np.float32))
  with pytest.raises(TypeError, match=r"EmbeddingLookup layer.*layer\.table"):
    ne.EmbeddingTable.from_penzai(pz.nn.EmbeddingLookup(pz_table))
  with pytest.raises(ValueError, match="from_penzai: The vocabulary has 2"):
    ne.EmbeddingTable.from_penzai(
      pz_table, vocabulary=ne.Vocabulary(["a", "b"])
    )
  with pytest.raises(ValueError, match="from_penzai: .*padding"):
    ne.EmbeddingTable.from_penzai(pz_table, padding_index=V)
  odd = pz.nn.EmbeddingTable(embeddings=np.ones((3, 2)), vocabulary_axis="v")
  with pytest.raises(TypeError, match="from_penzai: .* got ndarray"):
    ne.EmbeddingTable.from_penzai(odd)


def test_to_penzai_refuses_what_penzai_cannot_hold():
  table = ne.EmbeddingTable.from_pretrained(np.ones((5, 4), np.float32))
  with pytest.raises(ValueError, match="3 alignment rows after its 5 tokens"):
    table.padded_to_multiple(8).to_penzai()
  with pytest.raises(TypeError, match="QuantizedTable.*dequantized"):
    converters.to_penzai(table.quantized())
  with pytest.raises(TypeError, match="ne.to_penzai: `table` must be"):
    converters.to_penzai(np.ones((5, 4), np.float32))


def test_operations_on_penzai_tables_point_to_from_penzai():
  pz_table = penzai_table(gemma_model())
  calls = {
    "named_embed.lookup": lambda t: ne.lookup(t, TOKENS),
    "EmbeddingLookup": ne.EmbeddingLookup,
    "named_embed.decode": lambda t: ne.decode(t, TOKENS),
    "ne.nearest": lambda t: ne.nearest(t, 1),
    "ne.row_norm_statistics": ne.row_norm_statistics,
    "ne.most_similar": lambda t: similar.most_similar(t, 1),
  }
  for name, call in calls.items():
    with pytest.raises(
      TypeError, match=rf"{name}: .*EmbeddingTable.from_penzai\(pz_table\)"
    ):
      call(pz_table)
  with pytest.raises(
    TypeError, match=r"penzai's EmbeddingLookup layer.*from_penzai\(layer"
  ):
    ne.lookup(pz.nn.EmbeddingLookup(pz_table), TOKENS)
