"""Hostile ``vocab.txt`` and ``tokenizer.json`` files: `Vocabulary.load`
returns exactly what the file holds or raises a ValueError / OSError naming
the file, in time and memory bounded by the file's size."""

from __future__ import annotations

import json
import os
import resource
import time
import tracemalloc

import hypothesis
import hypothesis.strategies as st
import pytest

import named_embed as ne

TOKENS = ["[PAD]", "[UNK]", "the", "king", "ünï", "a b"]


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


def _tokenizer(vocab, added=()):
  return json.dumps(
    {"model": {"vocab": vocab}, "added_tokens": list(added)}
  ).encode()


@pytest.mark.parametrize(
  "data, expected",
  [
    ("\ufeff[PAD]\nthe\n".encode(), ("[PAD]", "the")),  # BOM: not a token
    (b"[PAD]\r\nthe\r\n", ("[PAD]", "the")),
    (b"[PAD]\nthe", ("[PAD]", "the")),  # no newline at the end
    ("a b\n\u00a0\n".encode(), ("a b", "\u00a0")),  # spaces are kept
  ],
)
def test_vocab_txt_reads_exactly_its_lines(tmp_path, data, expected):
  vocab = ne.Vocabulary.load(_write(tmp_path / "vocab.txt", data))
  assert vocab.tokens == expected
  assert vocab.roles.get("pad") == ("[PAD]" if "[PAD]" in expected else None)


@pytest.mark.parametrize(
  "data, message",
  [
    (b"a\n\nb\n", r"vocab.txt: line 2 is empty"),
    (b"a\nb\n\n", r"vocab.txt: line 3 is empty"),
    (b"a\n\xff\xfeb\n", r"vocab.txt: line 2 is not UTF-8"),
    (b"a\nb\na\n", r"vocab.txt: Vocabulary token 'a' appears twice: rows 0"),
  ],
)
def test_vocab_txt_refuses_what_is_not_one_token_a_line(
  tmp_path, data, message
):
  with pytest.raises(ValueError, match=message):
    ne.Vocabulary.load(_write(tmp_path / "vocab.txt", data))


def test_tokenizer_json_reads_vocab_and_added_tokens(tmp_path):
  vocab = {t: i for i, t in enumerate(TOKENS)}
  added = [{"id": 0, "content": "[PAD]"}, {"id": 6, "content": "[MASK]"}]
  path = _write(tmp_path / "tokenizer.json", _tokenizer(vocab, added))
  assert ne.Vocabulary.load(path).tokens == (*TOKENS, "[MASK]")
  unigram = json.dumps({"model": {"vocab": [["<pad>", 0.0], ["x", -1.5]]}})
  path = _write(tmp_path / "tokenizer.json", unigram.encode())
  assert ne.Vocabulary.load(path).tokens == ("<pad>", "x")


@pytest.mark.parametrize(
  "text, message",
  [
    ('{"model": {"vocab": {"a": 0, "b": 0}}}', r"'a' and 'b' both have id 0"),
    ('{"model": {"vocab": {"a": 0, "a": 1}}}', r"'a' appears twice"),
    ('{"model": {"vocab": {"a": 0, "b": -1}}}', r"id of 'b' must be a JSON"),
    ('{"model": {"vocab": {"a": 0, "b": "1"}}}', r"got '1'"),
    ('{"model": {"vocab": {"a": 0, "b": 1.0}}}', r"got 1.0"),
    ('{"model": {"vocab": {"a": 0, "b": true}}}', r"got True"),
    ('{"model": {"vocab": {"a": 0, "b": 2}}}', r"id 1 is missing"),
    ('{"model": {"vocab": {"a": 0, "b": 1000000000000}}}', r"id 1 is missing"),
    ('{"model": {"vocab": [["a", 0.0], [3, 1.0]]}}', r"entry 1 of the Unigram"),
    ('{"model": {"vocab": {"a": 0}}, "added_tokens": [{"idx": 1}]}', r"`id`"),
    (
      '{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 0,'
      ' "content": "b"}]}',
      r"'a' and 'b' both have id 0",
    ),
    ('{"model": {"vocab": {"a": 0}}, "added_tokens": 3}', r"added_tokens"),
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    ('{"model": {}}', r"no `model.vocab`"),
    ("{not json", r"is not valid JSON"),
    ('{"model": {"vocab": {"\\ud800": 0}}}', r"."),  # lone surrogate: fine
  ],
)
def test_tokenizer_json_refuses_contradictions(tmp_path, text, message):
  path = _write(tmp_path / "tokenizer.json", text.encode())
  if "ud800" in text:  # a lone surrogate is a valid (if odd) JSON string
    assert ne.Vocabulary.load(path).tokens == ("\ud800",)
    return
  with pytest.raises(ValueError, match=message) as raised:
    ne.Vocabulary.load(path)
  assert str(path) in str(raised.value)


def test_a_huge_id_costs_nothing(tmp_path):
  """The bomb of the issue: 50 bytes, one id of 10^12."""
  path = _write(tmp_path / "tokenizer.json", _tokenizer({"a": 10**12}))
  tracemalloc.start()
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"id 0 is missing"):
    ne.Vocabulary.load(path)
  elapsed = time.perf_counter() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert elapsed < 1.0 and peak < 1 << 20


@pytest.mark.parametrize("name", ["vocab.txt", "tokenizer.json"])
def test_what_is_not_a_regular_file_is_refused_without_reading(tmp_path, name):
  link = tmp_path / name
  os.symlink("/dev/zero", link)
  with pytest.raises(OSError, match=r"is a character device, not a regular"):
    ne.Vocabulary.load(link)
  os.remove(link)
  os.mkfifo(link)  # opening it for reading would block forever
  with pytest.raises(OSError, match=r"is a FIFO"):
    ne.Vocabulary.load(link)
  os.remove(link)
  os.mkdir(link)
  with pytest.raises(OSError, match=r"is a directory"):
    ne.Vocabulary.load(link)


# ------------------------------------------------------------------- fuzz


def _valid_files():
  vocab = {t: i for i, t in enumerate(TOKENS)}
  added = [{"id": 6, "content": "[MASK]"}]
  text = "\n".join(TOKENS).encode() + b"\n"
  return {"vocab.txt": text, "tokenizer.json": _tokenizer(vocab, added)}


def _expected_txt(data: bytes):
  """The tokens a vocab.txt holds by its published semantics, or None if
  it is not one (not UTF-8, an empty line, a repeated token)."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return None
  lines = text.removeprefix("\ufeff").split("\n")
  if lines[-1] == "":
    lines.pop()
  tokens = [line.removesuffix("\r") for line in lines]
  if not all(tokens) or len(set(tokens)) != len(tokens):
    return None
  return tuple(tokens)


def _expected_json(data: bytes):
  try:
    spec = json.loads(data, object_pairs_hook=_no_repeated_keys)
    vocab = spec["model"]["vocab"]
    assert isinstance(vocab, dict)
    assert len(set(vocab.values())) == len(vocab)
    by_id = {i: t for t, i in vocab.items()}
    for added in spec.get("added_tokens") or []:
      assert by_id.setdefault(added["id"], added["content"]) == added["content"]
    assert all(type(i) is int and i >= 0 for i in by_id)
    assert all(isinstance(t, str) for t in by_id.values())
    tokens = tuple(by_id[i] for i in range(len(by_id)))
    assert len(set(tokens)) == len(tokens)
    return tokens
  except Exception:
    return None


@st.composite
def _mutations(draw):
  name = draw(st.sampled_from(sorted(_valid_files())))
  data = bytearray(_valid_files()[name])
  for _ in range(draw(st.integers(1, 3))):
    how = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if how == "cut":
      del data[at:]
    elif how == "flip" and data:
      data[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "insert":
      data[at:at] = draw(st.binary(min_size=1, max_size=4))
    elif data:
      del data[at]
  return name, bytes(data)


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(_mutations())
def test_fuzz_every_outcome_is_the_file_or_a_named_error(mutation):
  import tempfile

  name, data = mutation
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
      f.write(data)
    expected = (_expected_txt if name == "vocab.txt" else _expected_json)(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
      tokens = ne.Vocabulary.load(path).tokens
    except (ValueError, OSError) as error:
      assert path in str(error), error
      tokens = None
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000
  assert tokens == expected


def _no_repeated_keys(pairs):
  keys = [key for key, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError("a repeated key")
  return dict(pairs)
