"""Strict readers of the token lists of ``vocab.txt`` and ``tokenizer.json``.

Each returns the tokens row by row or raises a `ValueError` naming the
file, the line or token, and what was wrong; nothing is dropped or guessed
silently. The cost of a read is bounded by the file's size: a number
written in the file (a token id of 10^12) is checked against how many
tokens the file really holds before anything is built from it.
"""

from __future__ import annotations

import json
from typing import Any

from named_embed._src.base.regular_files import read_regular

_BOM = "\ufeff"


def vocab_txt_tokens(path: str) -> list[str]:
  """The tokens of a ``vocab.txt``: one a line, UTF-8, ``\\n`` or
  ``\\r\\n`` line ends; a byte order mark at the start is not a token.

  Raises:
    ValueError: for bytes that are not UTF-8 (naming the line), or an
      empty line (a token cannot be empty).
    OSError: if ``path`` is not a readable regular file.

  >>> import os, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "vocab.txt")
  ...   with open(path, "wb") as f:
  ...     _ = f.write("\\ufeff[PAD]\\r\\nthe\\n".encode())
  ...   print(vocab_txt_tokens(path))
  ...   with open(path, "wb") as f:
  ...     _ = f.write(b"a\\n\\nb\\n")
  ...   try:
  ...     vocab_txt_tokens(path)
  ...   except ValueError as error:
  ...     print(str(error).replace(tmp, "tmp"))
  ['[PAD]', 'the']
  tmp/vocab.txt: line 2 is empty; a vocab.txt holds one token a line, and a token cannot be empty.
  """
  data = read_regular(path, "a vocab.txt")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as error:
    line = data.count(b"\n", 0, error.start) + 1
    raise ValueError(
      f"{path}: line {line} is not UTF-8 ({error.reason} at byte"
      f" {error.start} of the file)."
    ) from None
  text = text.removeprefix(_BOM)
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()  # the newline that ends the last line
  tokens = [line.removesuffix("\r") for line in lines]
  for number, token in enumerate(tokens, 1):
    if not token:
      raise ValueError(
        f"{path}: line {number} is empty; a vocab.txt holds one token a"
        " line, and a token cannot be empty."
      )
  return tokens


def tokenizer_json_tokens(path: str) -> list[str]:
  """The tokens of a Hugging Face ``tokenizer.json``, row by row: the
  model's vocabulary (a ``{"token": id}`` map, or a Unigram list of
  ``[token, score]``) and the ``added_tokens``.

  Ids must be JSON integers, distinct and contiguous from 0; an added
  token may repeat a vocabulary entry (same id, same token) but not
  contradict it.

  Raises:
    ValueError: for invalid JSON (too deeply nested included), a missing
      vocabulary, an id that is not an integer, a repeated token or id,
      missing ids, or an added token without an integer ``id`` and a
      string ``content``; naming the file and the entry.
    OSError: if ``path`` is not a readable regular file.

  >>> import json, os, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "tokenizer.json")
  ...   spec = {"model": {"vocab": {"[PAD]": 0, "a": 1}},
  ...           "added_tokens": [{"id": 2, "content": "[MASK]"}]}
  ...   with open(path, "w") as f:
  ...     json.dump(spec, f)
  ...   print(tokenizer_json_tokens(path))
  ...   with open(path, "w") as f:
  ...     _ = f.write('{"model": {"vocab": {"a": 0, "b": 10000000000}}}')
  ...   try:
  ...     tokenizer_json_tokens(path)
  ...   except ValueError as error:
  ...     print(str(error).replace(tmp, "tmp"))
  ['[PAD]', 'a', '[MASK]']
  tmp/tokenizer.json: token ids are not contiguous from 0: 2 tokens have ids up to 10000000000; id 1 is missing.
  """
  spec = _json(path)
  model = spec.get("model") if isinstance(spec, _Pairs) else None
  vocab = model.get("vocab") if isinstance(model, _Pairs) else None
  by_id: dict[int, str] = {}
  if isinstance(vocab, list):
    for index, entry in enumerate(vocab):
      by_id[index] = _unigram_token(entry, index, path)
  elif isinstance(vocab, _Pairs):
    for token, index in vocab.pairs:
      _add(by_id, _id(index, f"the id of {token!r}", path), token, path)
  else:
    raise ValueError(
      f"{path} has no `model.vocab` map or list: not a Hugging Face"
      " tokenizer.json."
    )
  added = spec.get("added_tokens")
  added = [] if added is None else added
  if not isinstance(added, list):
    raise ValueError(f"{path}: `added_tokens` must be a list of tokens.")
  for n, entry in enumerate(added):
    _add_added(by_id, entry, n, path)
  return _in_order(by_id, path)


class _Pairs:
  """A JSON object kept as its list of ``(key, value)`` pairs (repeated
  keys included), so a repeated token is seen, not overwritten."""

  __slots__ = ("pairs",)

  def __init__(self, pairs: list[tuple[str, Any]]):
    self.pairs = pairs

  def get(self, key: str, default: Any = None) -> Any:
    for k, v in reversed(self.pairs):
      if k == key:
        return v
    return default


def _json(path: str) -> Any:
  data = read_regular(path, "a tokenizer.json")
  try:
    return json.loads(data.decode("utf-8"), object_pairs_hook=_Pairs)
  except UnicodeDecodeError as error:
    raise ValueError(
      f"{path} is not UTF-8 ({error.reason} at byte {error.start})."
    ) from None
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from None
  except RecursionError:
    raise ValueError(
      f"{path} is not a tokenizer.json: its JSON is nested too deeply to read."
    ) from None


def _id(value: Any, what: str, path: str) -> int:
  if type(value) is not int or value < 0:
    raise ValueError(
      f"{path}: {what} must be a JSON integer >= 0, got {value!r}."
    )
  return value


def _add(by_id: dict[int, str], index: int, token: Any, path: str) -> None:
  if not isinstance(token, str):
    raise ValueError(f"{path}: token {token!r} (id {index}) is not a string.")
  seen = by_id.setdefault(index, token)
  if seen != token:
    raise ValueError(
      f"{path}: tokens {seen!r} and {token!r} both have id {index}."
    )


def _unigram_token(entry: Any, index: int, path: str) -> str:
  token = entry[0] if isinstance(entry, list) and entry else entry
  if not isinstance(token, str):
    raise ValueError(
      f"{path}: entry {index} of the Unigram `model.vocab` must be"
      f" [token, score], got {entry!r}."
    )
  return token


def _add_added(by_id: dict[int, str], entry: Any, n: int, path: str) -> None:
  if not isinstance(entry, _Pairs):
    raise ValueError(
      f"{path}: added token {n} must be an object with `id` and `content`,"
      f" got {entry!r}."
    )
  index = _id(entry.get("id"), f"the `id` of added token {n}", path)
  content = entry.get("content")
  if not isinstance(content, str):
    raise ValueError(
      f"{path}: the `content` of added token {n} (id {index}) must be a"
      f" string, got {content!r}."
    )
  _add(by_id, index, content, path)


def _in_order(by_id: dict[int, str], path: str) -> list[str]:
  """The tokens by id; ids must be ``0 .. n-1`` (checked before building a
  list that long, so a huge id costs nothing)."""
  n = len(by_id)
  if n and max(by_id) != n - 1:
    present = sorted(by_id)
    missing = next(i for i, have in enumerate(present) if i != have)
    raise ValueError(
      f"{path}: token ids are not contiguous from 0: {n} tokens have ids up"
      f" to {present[-1]}; id {missing} is missing."
    )
  tokens = [by_id[i] for i in range(n)]
  seen: dict[str, int] = {}
  for i, token in enumerate(tokens):
    first = seen.setdefault(token, i)
    if first != i:
      raise ValueError(
        f"{path}: token {token!r} appears twice, with ids {first} and {i}."
      )
  return tokens
