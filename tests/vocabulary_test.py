"""Tests for `named_embed._src.base.vocabulary` and attaching vocabularies to tables."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import named_embed as ne

TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "king", "queen"]


def test_lookups_in_both_directions():
  vocab = ne.Vocabulary(TOKENS, pad="[PAD]", unk="[UNK]")
  assert vocab.id("king") == 5 and vocab.token(6) == "queen"
  assert vocab.encode(["the", "jester"]) == [4, 1]
  assert vocab.decode(np.array([[5, 6]])) == ["king", "queen"]
  assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (
    0,
    1,
    None,
    None,
  )
  assert "king" in vocab and "jester" not in vocab and len(vocab) == 7
  assert list(vocab)[:2] == ["[PAD]", "[UNK]"]


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"'a' appears twice: rows 0 and 2"):
    ne.Vocabulary(["a", "b", "a"])
  with pytest.raises(ValueError, match=r"row 1 is 3"):
    ne.Vocabulary(["a", 3])
  with pytest.raises(ValueError, match=r"`pad` token '<pad>' is not in"):
    ne.Vocabulary(["a"], pad="<pad>")
  vocab = ne.Vocabulary(["a", "b"])
  with pytest.raises(KeyError, match=r"'c' is not in the vocabulary of 2"):
    vocab.id("c")
  with pytest.raises(IndexError, match=r"Row 2 is outside"):
    vocab.token(2)


def test_equal_vocabularies_hash_equal():
  a = ne.Vocabulary(TOKENS, pad="[PAD]")
  b = ne.Vocabulary(list(TOKENS), pad="[PAD]")
  assert a == b and hash(a) == hash(b)
  assert a != ne.Vocabulary(TOKENS)


def test_load_vocab_txt_guesses_roles(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
  vocab = ne.Vocabulary.load(path)
  assert vocab.tokens == tuple(TOKENS)
  assert vocab.roles == {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "bos": "[CLS]",
    "eos": "[SEP]",
  }
  assert ne.Vocabulary.load(path, guess_roles=False).roles == {}


def test_load_tokenizer_json_wordpiece_and_unigram(tmp_path):
  wordpiece = {
    "model": {
      "type": "WordPiece",
      "vocab": {t: i for i, t in enumerate(TOKENS)},
    },
    "added_tokens": [{"id": 7, "content": "<extra>"}],
  }
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps(wordpiece), encoding="utf-8")
  vocab = ne.Vocabulary.load(path)
  assert vocab.tokens == (*TOKENS, "<extra>") and vocab.pad_id == 0
  unigram = {
    "model": {"type": "Unigram", "vocab": [["<pad>", 0.0], ["x", -1.5]]}
  }
  path.write_text(json.dumps(unigram), encoding="utf-8")
  assert ne.Vocabulary.load(path).tokens == ("<pad>", "x")


def test_load_rejects_bad_files(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match=r"tokenizer.json is not valid JSON"):
    ne.Vocabulary.load(path)
  path.write_text(json.dumps({"model": {}}), encoding="utf-8")
  with pytest.raises(ValueError, match=r"no `model.vocab`"):
    ne.Vocabulary.load(path)
  path.write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 2}}}))
  with pytest.raises(ValueError, match=r"id 1 is missing"):
    ne.Vocabulary.load(path)
  txt = tmp_path / "vocab.txt"
  txt.write_text("a\nb\na\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"vocab.txt: Vocabulary token 'a'"):
    ne.Vocabulary.load(txt)


def test_with_vocabulary_wires_pad_and_checks_sizes():
  table = ne.EmbeddingTable.from_pretrained(np.ones((7, 2), np.float32))
  vocab = ne.Vocabulary(TOKENS, pad="[PAD]")
  attached = table.with_vocabulary(vocab)
  assert attached.padding_index == 0 and attached.vocabulary is vocab
  assert attached.with_vocabulary(None).vocabulary is None
  with pytest.raises(ValueError, match=r"6 tokens but the table has 7 rows"):
    table.with_vocabulary(ne.Vocabulary(TOKENS[:6]))
  padded = ne.EmbeddingTable.from_pretrained(
    np.ones((7, 2), np.float32), padding_index=3
  )
  with pytest.raises(ValueError, match=r"pad token '\[PAD\]' is row 0"):
    padded.with_vocabulary(vocab)
  with pytest.raises(TypeError, match="must be a named_embed.Vocabulary"):
    table.with_vocabulary(TOKENS)


def test_vocabulary_changes_no_leaf_and_no_compilation():
  table = ne.EmbeddingTable.from_pretrained(np.ones((7, 2), np.float32))
  attached = table.with_vocabulary(ne.Vocabulary(TOKENS))
  assert len(jax.tree.leaves(attached)) == len(jax.tree.leaves(table)) == 1
  traces = []

  @jax.jit
  def f(t, ids):
    traces.append(1)
    return ne.lookup(t, ids).data_array

  ids = np.array([1, 2])
  f(attached, ids)
  f(attached.with_vocabulary(ne.Vocabulary(list(TOKENS))), ids)  # equal vocab
  assert len(traces) == 1


@pytest.mark.parametrize(
  "text", ["a dog slept", b"a dog slept"], ids=["str", "bytes"]
)
def test_a_bare_string_is_a_type_error_suggesting_tokens(text):
  vocab = ne.Vocabulary(["[UNK]", "a", "dog", "slept"], unk="[UNK]")
  with pytest.raises(TypeError, match=r"encode takes a list of token") as info:
    vocab.encode(text)
  assert "text.split()" in str(info.value) and "tokenizer" in str(info.value)
  assert vocab.encode("a dog slept".split()) == [1, 2, 3]
  with pytest.raises(TypeError, match=r"takes a list of token strings"):
    ne.Vocabulary(text)
  with pytest.raises(TypeError, match=r"Vocabulary.load\(path\)"):
    ne.Vocabulary("vocab.txt")


def test_one_token_and_one_row_methods_check_their_types():
  vocab = ne.Vocabulary(["[UNK]", "a", "b"], unk="[UNK]")
  # A non-string used to map silently to the unk row.
  with pytest.raises(TypeError, match=r"id takes one token string.*encode"):
    vocab.id(["a"])
  with pytest.raises(TypeError, match=r"id takes one token string"):
    vocab.encode(["a", 2])
  # int("2") used to read row 2, int(1.7) row 1.
  for bad in ["2", 1.7, [1]]:
    with pytest.raises(TypeError, match=r"token takes one integer row"):
      vocab.token(bad)
  assert vocab.token(np.int64(2)) == "b" and vocab.token(np.array(1)) == "a"


@pytest.mark.parametrize(
  "ids, pattern",
  [
    ("12", r"decode takes integer ids, got the str '12'"),
    (b"\x01", r"decode takes integer ids, got the bytes"),
    (np.array([1.0, 2.0]), r"dtype float64"),
    ([True, False], r"dtype bool"),
    (["a", "b"], r"dtype <U1"),
  ],
)
def test_decode_takes_integer_ids_only(ids, pattern):
  vocab = ne.Vocabulary(["[UNK]", "a", "b"], unk="[UNK]")
  with pytest.raises(TypeError, match=pattern):
    vocab.decode(ids)
  assert vocab.decode([]) == [] and vocab.decode(np.array([[2, 1]])) == [
    "b",
    "a",
  ]
