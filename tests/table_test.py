"""Tests for `named_embed._src.tables.table`: construction, validation, renormalized."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import named_embed as ne

W = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.5], [-6.0, 8.0]], np.float32)


def test_from_config_builds_trainable_vocabulary_first_parameter():
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=7,
    embedding_axes={"heads": 2, "head_dim": 3},
  )
  assert isinstance(table.embeddings, pz.Parameter)
  assert table.embeddings.label == "embed.embeddings"
  assert tuple(table.value.named_axes) == ("vocabulary", "heads", "head_dim")
  assert table.vocab_size == 7
  assert table.embedding_axes == {"heads": 2, "head_dim": 3}
  assert table.dtype == np.float32
  assert not table.frozen
  assert table.rows_array().shape == (7, 2, 3)


def test_default_initializer_matches_penzai_scale():
  table = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(1),
    vocab_size=4000,
    embedding_axes={"embedding": 64},
  )
  std = float(np.std(np.asarray(table.rows_array())))
  assert abs(std - 1 / 8) < 0.005
  reference = pz.nn.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(1),
    vocab_size=4000,
    embedding_axes={"embedding": 64},
  )
  np.testing.assert_array_equal(
    table.rows_array(),
    reference.embeddings.value.untag("vocabulary", "embedding").unwrap(),
  )


def test_jax_nn_initializer_gets_vocabulary_first_shape():
  table = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=3,
    embedding_axes={"embedding": 5},
    initializer=jax.nn.initializers.constant(0.25),
    dtype=jnp.bfloat16,
  )
  assert table.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(table.rows_array(), np.float32), np.full((3, 5), 0.25)
  )


def test_from_config_zeroes_padding_row_and_resolves_negative_index():
  table = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=5,
    embedding_axes={"embedding": 3},
    padding_index=-2,
  )
  assert table.padding_index == 3
  rows = np.asarray(table.rows_array())
  np.testing.assert_array_equal(rows[3], np.zeros(3))
  assert np.all(np.abs(rows[[0, 1, 2, 4]]).sum(axis=1) > 0)


def test_from_config_without_key_gives_slot_with_clear_value_error():
  table = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=None,
    vocab_size=5,
    embedding_axes={"embedding": 3},
  )
  assert isinstance(table.embeddings, pz.ParameterSlot)
  with pytest.raises(
    ValueError, match=r"unbound ParameterSlot.*'e.embeddings'"
  ):
    table.value


def test_from_pretrained_plain_array_is_frozen_and_keeps_padding_row():
  table = ne.EmbeddingTable.from_pretrained(W, padding_index=1)
  assert table.frozen
  assert isinstance(table.embeddings, pz.nx.NamedArray)
  assert table.padding_index == 1
  np.testing.assert_array_equal(table.rows_array(), W)


def test_from_pretrained_unfrozen_is_a_parameter():
  table = ne.EmbeddingTable.from_pretrained(W, freeze=False, name="wte")
  assert isinstance(table.embeddings, pz.Parameter)
  assert table.embeddings.label == "wte.embeddings"


def test_from_pretrained_named_array_is_reordered_vocabulary_first():
  named = pz.nx.wrap(np.ones((2, 3, 4), np.float32), "head_dim", "vocab", "h")
  table = ne.EmbeddingTable.from_pretrained(named, vocabulary_axis="vocab")
  assert tuple(table.value.named_axes) == ("vocab", "head_dim", "h")
  assert table.rows_array().shape == (3, 2, 4)
  table = ne.EmbeddingTable.from_pretrained(
    named, vocabulary_axis="vocab", embedding_axes=("h", "head_dim")
  )
  assert table.rows_array().shape == (3, 4, 2)


def test_from_pretrained_multi_axis_plain_array_needs_names():
  with pytest.raises(ValueError, match=r"shape \(4, 2, 3\).*embedding_axes"):
    ne.EmbeddingTable.from_pretrained(np.ones((4, 2, 3), np.float32))
  table = ne.EmbeddingTable.from_pretrained(
    np.ones((4, 2, 3), np.float32), embedding_axes=("heads", "head_dim")
  )
  assert table.embedding_axes == {"heads": 2, "head_dim": 3}


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (
      dict(embedding_axes={"vocabulary": 3}),
      ValueError,
      r"`vocabulary_axis` 'vocabulary' must not appear in `embedding_axes`",
    ),
    (dict(vocab_size=0), ValueError, r"`vocab_size` must be a positive int"),
    (
      dict(embedding_axes={"embedding": -2}),
      ValueError,
      r"`embedding_axes\['embedding'\]` must be a positive int, got -2",
    ),
    (dict(embedding_axes={}), ValueError, r"at least one axis"),
    (dict(padding_index=5), ValueError, r"`padding_index` 5 is outside \[-5"),
    (dict(padding_index=-6), ValueError, r"`padding_index` -6 is outside"),
    (dict(dtype=jnp.int32), TypeError, r"`dtype` must be a floating dtype"),
    (dict(vocab_size=2.5), TypeError, r"`vocab_size` must be a positive int"),
  ],
)
def test_from_config_rejects_bad_arguments(kwargs, error, pattern):
  arguments = dict(
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=5,
    embedding_axes={"embedding": 3},
  )
  arguments.update(kwargs)
  with pytest.raises(error, match=pattern):
    ne.EmbeddingTable.from_config(**arguments)


@pytest.mark.parametrize(
  "embeddings, kwargs, error, pattern",
  [
    (np.ones(4, np.float32), {}, ValueError, r"shape \(4,\)"),
    (
      np.ones((4, 2), np.int32),
      {},
      TypeError,
      r"`embeddings` must be a floating dtype",
    ),
    (
      np.ones((4, 2), np.float32),
      dict(embedding_axes=("a", "b")),
      ValueError,
      r"names 2 axes, but `embeddings` of shape \(4, 2\) has 1",
    ),
    (
      np.ones((4, 2), np.float32),
      dict(embedding_axes=("vocabulary",)),
      ValueError,
      r"Axis names must be distinct",
    ),
    (
      pz.nx.wrap(np.ones((4, 2), np.float32), "vocabulary", "embedding"),
      dict(embedding_axes=("features",)),
      ValueError,
      r"\('features',\) do not match the embedding axes \('embedding',\)",
    ),
    (
      pz.nx.wrap(np.ones((4, 2), np.float32), "tokens", "embedding"),
      {},
      ValueError,
      r"do not include the vocabulary axis 'vocabulary'",
    ),
    (
      pz.nx.wrap(np.ones((4, 2), np.float32)).tag_prefix("vocabulary"),
      {},
      ValueError,
      r"named axes only; got positional axes of shape \(2,\)",
    ),
    (
      np.ones((4, 2), np.float32),
      dict(padding_index=4),
      ValueError,
      r"`padding_index` 4 is outside \[-4, 4\)",
    ),
  ],
)
def test_from_pretrained_rejects_bad_input(embeddings, kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    ne.EmbeddingTable.from_pretrained(embeddings, **kwargs)


def test_direct_construction_validates_and_resolves_padding():
  named = pz.nx.wrap(W, "vocabulary", "embedding")
  assert ne.EmbeddingTable(named, padding_index=-1).padding_index == 3
  with pytest.raises(ValueError, match="vocabulary axis 'tokens'"):
    ne.EmbeddingTable(named, vocabulary_axis="tokens")


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, np.inf])
def test_renormalized_matches_numpy_reference(norm_type):
  table = ne.EmbeddingTable.from_pretrained(W)
  result = np.asarray(table.renormalized(2.0, norm_type).rows_array())
  norms = np.linalg.norm(W, ord=norm_type, axis=1)
  scale = np.where(norms > 2.0, 2.0 / (norms + 1e-7), 1.0)
  np.testing.assert_allclose(result, W * scale[:, None], rtol=1e-6)


def test_renormalized_hand_computed_and_keeps_kind():
  trainable = ne.EmbeddingTable.from_pretrained(W, freeze=False, name="t")
  renormed = trainable.renormalized(2.0)
  assert isinstance(renormed.embeddings, pz.Parameter)
  assert renormed.embeddings is not trainable.embeddings
  assert renormed.embeddings.label == "t.embeddings"
  np.testing.assert_allclose(
    renormed.rows_array(),
    [[1.2, 1.6], [1.0, 0.0], [0.0, 0.5], [-1.2, 1.6]],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(trainable.rows_array(), W)  # not mutated
  frozen = ne.EmbeddingTable.from_pretrained(W).renormalized(2.0)
  assert frozen.frozen
  value = pz.freeze_params(trainable).renormalized(2.0)
  assert isinstance(value.embeddings, pz.ParameterValue)


def test_renormalized_multi_axis_norm_is_over_all_embedding_axes():
  rows = np.array([[[3.0, 0.0], [0.0, 4.0]]], np.float32)
  table = ne.EmbeddingTable.from_pretrained(rows, embedding_axes=("a", "b"))
  np.testing.assert_allclose(
    table.renormalized(1.0).rows_array(), rows / 5, rtol=1e-6
  )


@pytest.mark.parametrize(
  "max_norm, norm_type, error, pattern",
  [
    (-1.0, 2.0, ValueError, r"`max_norm` must be non-negative, got -1.0"),
    ("big", 2.0, TypeError, r"`max_norm` must be a number"),
    (1.0, float("nan"), ValueError, r"`norm_type` must not be NaN"),
  ],
)
def test_renormalized_rejects_bad_arguments(
  max_norm, norm_type, error, pattern
):
  with pytest.raises(error, match=pattern):
    ne.EmbeddingTable.from_pretrained(W).renormalized(max_norm, norm_type)


def test_table_is_a_pytree_with_one_leaf():
  table = ne.EmbeddingTable.from_pretrained(W, padding_index=0)
  leaves, treedef = jax.tree_util.tree_flatten(table)
  assert len(leaves) == 1
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.padding_index == 0
  doubled = jax.tree.map(lambda x: x * 2, table)
  np.testing.assert_array_equal(doubled.rows_array(), W * 2)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
def test_an_empty_table_is_refused_at_construction(shape):
  """A 0-row table used to construct, then fail every lookup inside XLA."""
  with pytest.raises(ValueError, match=r"is empty. A table needs at least"):
    ne.EmbeddingTable.from_pretrained(np.zeros(shape, np.float32))
  named = pz.nx.wrap(np.zeros(shape, np.float32), "vocabulary", "embedding")
  with pytest.raises(ValueError, match=r"axis '(vocabulary|embedding)'"):
    ne.EmbeddingTable(named)


def test_shard_keeps_a_frozen_table_used_twice_one_object():
  table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  model = pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
  )
  mesh = jax.make_mesh((1,), ("model",))
  placed = ne.shard(model, mesh, {"vocabulary": "model"})
  first, second = placed.sublayers
  assert first.table is second.table
  assert first.table.rows_array().sharding.spec == jax.sharding.PartitionSpec(
    "model", None
  )
