"""Tests for `named_embed.formats.from_safetensors`: model checkpoints.

A tiny BERT-like checkpoint (several tensors, as a Hugging Face
``model.safetensors`` has) is written with the `safetensors` package, with
its ``vocab.txt``; one tensor is read back by key and compared bit for bit.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import raw
from safetensors.numpy import save_file

import named_embed as ne
from named_embed import formats
from named_embed._src.files import stored_tensors

W = np.arange(12, dtype=np.float32).reshape(4, 3)


def bits(array) -> np.ndarray:
  array = np.asarray(array)
  return array.view({2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


BERT_TOKENS = [
  "[PAD]",
  "[UNK]",
  "[CLS]",
  "[SEP]",
  "[MASK]",
  "the",
  "cat",
  "##s",
]
HIDDEN = 6


@pytest.fixture
def bert(tmp_path):
  """A tiny BERT-like checkpoint (several tensors) and its vocab.txt."""
  rng = np.random.default_rng(1)
  V = len(BERT_TOKENS)

  def normal(*shape, dtype=np.float32):
    return rng.normal(size=shape).astype(dtype)

  tensors = {
    "embeddings.word_embeddings.weight": normal(V, HIDDEN),
    "embeddings.position_embeddings.weight": normal(16, HIDDEN),
    "embeddings.token_type_embeddings.weight": normal(2, HIDDEN),
    "embeddings.LayerNorm.weight": normal(HIDDEN),
    "embeddings.LayerNorm.bias": normal(HIDDEN),
    "encoder.layer.0.attention.self.query.weight": normal(HIDDEN, HIDDEN),
    "encoder.layer.0.attention.self.query.bias": normal(HIDDEN),
    "pooler.dense.weight": normal(HIDDEN, HIDDEN),
    "embeddings.position_ids": np.arange(16, dtype=np.int64)[None],
    "bf16.weight": normal(V, 2, 3).astype(ml_dtypes.bfloat16),
  }
  path = tmp_path / "model.safetensors"
  save_file(tensors, path, metadata={"format": "pt"})
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(BERT_TOKENS) + "\n", encoding="utf-8")
  return path, vocab, tensors


def test_reads_one_tensor_of_a_checkpoint_with_its_vocab_txt(bert):
  path, vocab, tensors = bert
  table = formats.from_safetensors(
    path, key="embeddings.word_embeddings.weight", vocabulary=vocab
  )
  expected = tensors["embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(bits(table.rows_array()), bits(expected))
  assert table.vocabulary.tokens == tuple(BERT_TOKENS)
  assert table.vocabulary.roles == {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "bos": "[CLS]",
    "eos": "[SEP]",
  }
  assert table.padding_index == 0  # from the [PAD] role
  assert table.frozen
  ids = jnp.array([5, 6])
  np.testing.assert_array_equal(
    raw(ne.lookup(table, ids), "embedding"), expected[[5, 6]]
  )


def test_reads_only_the_requested_tensor(bert, monkeypatch):
  path, vocab, _ = bert
  read_region = stored_tensors._File.read_region
  requested = []

  def spy(self, name, local, out):
    requested.append((name, [tuple(bounds) for bounds in local]))
    return read_region(self, name, local, out)

  monkeypatch.setattr(stored_tensors._File, "read_region", spy)
  formats.from_safetensors(path, key="embeddings.word_embeddings.weight")
  V = len(BERT_TOKENS)
  assert requested == [
    ("embeddings.word_embeddings.weight", [(0, V), (0, HIDDEN)])
  ]


def test_vocabulary_object_tokenizer_json_and_options(bert, tmp_path):
  path, _, tensors = bert
  spec = {
    "model": {
      "type": "WordPiece",
      "vocab": {t: i for i, t in enumerate(BERT_TOKENS)},
    },
    "added_tokens": [],
  }
  tokenizer = tmp_path / "tokenizer.json"
  tokenizer.write_text(json.dumps(spec), encoding="utf-8")
  table = formats.from_safetensors(
    os.fspath(path),
    key="embeddings.word_embeddings.weight",
    vocabulary=tokenizer,
    vocabulary_axis="token",
    embedding_axes="hidden",
    freeze=False,
    name="bert.word",
  )
  assert table.embeddings.label == "bert.word.embeddings"
  assert list(table.value.named_axes) == ["token", "hidden"]
  vocab = ne.Vocabulary(BERT_TOKENS)  # no roles: no padding row
  table = formats.from_safetensors(
    path, "embeddings.word_embeddings.weight", vocabulary=vocab
  )
  assert table.padding_index is None
  table = formats.from_safetensors(
    path, "embeddings.word_embeddings.weight", padding_index=-1
  )
  assert table.padding_index == len(BERT_TOKENS) - 1


def test_multi_axis_bfloat16_tensor(bert):
  path, _, tensors = bert
  table = formats.from_safetensors(
    path, key="bf16.weight", embedding_axes=("heads", "head_dim")
  )
  assert table.dtype == ml_dtypes.bfloat16
  assert table.embedding_axes == {"heads": 2, "head_dim": 3}
  np.testing.assert_array_equal(
    bits(table.rows_array()), bits(tensors["bf16.weight"])
  )


def test_wrong_key_lists_the_keys_and_suggests_the_closest(bert):
  path, _, _ = bert
  with pytest.raises(ValueError) as caught:
    formats.from_safetensors(path, key="embeddings.word_embedding.weight")
  message = str(caught.value)
  assert "has no tensor 'embeddings.word_embedding.weight'" in message
  assert "Did you mean 'embeddings.word_embeddings.weight'" in message
  assert "Its 10 tensors are: ['bf16.weight', 'embeddings.LayerNorm.bias'," in (
    message
  )
  assert "'pooler.dense.weight']" in message


def test_vocabulary_of_the_wrong_length_names_file_and_key(bert, tmp_path):
  path, _, _ = bert
  short = tmp_path / "short_vocab.txt"
  short.write_text("[PAD]\nthe\n", encoding="utf-8")
  with pytest.raises(
    ValueError,
    match=r"model.safetensors, tensor 'embeddings.word_embeddings.weight':"
    r" The vocabulary has 2 tokens but the table has 8 rows",
  ):
    formats.from_safetensors(
      path, key="embeddings.word_embeddings.weight", vocabulary=short
    )


def test_non_table_tensors_are_refused_with_their_name(bert):
  path, _, _ = bert
  with pytest.raises(TypeError, match="'embeddings.position_ids'.*floating"):
    formats.from_safetensors(path, key="embeddings.position_ids")
  with pytest.raises(ValueError, match="'embeddings.LayerNorm.bias'.*1-D"):
    formats.from_safetensors(path, key="embeddings.LayerNorm.bias")
  with pytest.raises(TypeError, match="`vocabulary` must be a"):
    formats.from_safetensors(
      path, key="embeddings.word_embeddings.weight", vocabulary=BERT_TOKENS
    )


def test_from_safetensors_reads_named_embed_files_too(tmp_path):
  path = tmp_path / "table.safetensors"
  formats.save(ne.EmbeddingTable.from_pretrained(W), path)
  table = formats.from_safetensors(path, key="embeddings")
  np.testing.assert_array_equal(np.asarray(table.rows_array()), W)
