"""`Vocabulary`: the token strings of a table's rows, and their roles."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from named_embed._src.base import vocabulary_files

SPECIAL_ROLES = ("pad", "unk", "bos", "eos")

_ROLE_GUESSES = {
  "pad": ("[PAD]", "<pad>", "<PAD>"),
  "unk": ("[UNK]", "<unk>", "<UNK>"),
  "bos": ("[CLS]", "<s>", "<bos>", "<|begin_of_text|>", "<BOS>"),
  "eos": ("[SEP]", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
}


class Vocabulary:
  """Token strings for the rows of an embedding table, with special roles.

  Immutable and hashable: its hash is computed once, so a table that
  carries a vocabulary (as static pytree metadata) costs nothing more under
  `jax.jit`. Row ``i`` of a table is token ``tokens[i]``.

  Example:

  >>> import named_embed as ne
  >>> vocab = ne.Vocabulary(["<pad>", "<unk>", "the", "cat"], pad="<pad>",
  ...                       unk="<unk>")
  >>> vocab.id("cat"), vocab.token(2), vocab.pad_id, len(vocab)
  (3, 'the', 0, 4)
  >>> vocab.encode(["the", "dog"])  # unknown tokens map to unk
  [2, 1]
  >>> vocab.decode([3, 2])
  ['cat', 'the']

  Args:
    tokens: The token strings, row by row; no duplicates.
    pad: Token playing the padding role (wired to the table's
      ``padding_index`` by `EmbeddingTable.with_vocabulary`), or None.
    unk: Token returned for unknown strings by `id` / `encode`, or None
      (unknown strings are then a `KeyError`).
    bos: Beginning-of-sequence token, or None.
    eos: End-of-sequence token, or None.

  Raises:
    TypeError: for a bare string (or bytes) instead of a list of tokens.
    ValueError: for duplicate or non-string tokens, or a role naming a
      token that is not in the vocabulary.
  """

  __slots__ = ("_tokens", "_ids", "_roles", "_hash")

  def __init__(
    self,
    tokens: Iterable[str],
    *,
    pad: str | None = None,
    unk: str | None = None,
    bos: str | None = None,
    eos: str | None = None,
  ):
    if isinstance(tokens, (str, bytes, bytearray)):
      raise TypeError(
        "ne.Vocabulary takes a list of token strings, one a row; got"
        f" {_shown(tokens)}, which would make one token per character."
        " Pass a list, e.g. `ne.Vocabulary(text.split())`, or read a"
        " vocab.txt or tokenizer.json file with `ne.Vocabulary.load(path)`."
      )
    tokens = tuple(tokens)
    ids = _ids_of(tokens)
    roles = {"pad": pad, "unk": unk, "bos": bos, "eos": eos}
    for role, token in roles.items():
      if token is not None and token not in ids:
        raise ValueError(
          f"`{role}` token {token!r} is not in the vocabulary of"
          f" {len(tokens)} tokens."
        )
    self._tokens = tokens
    self._ids = ids
    self._roles = tuple(
      sorted((r, t) for r, t in roles.items() if t is not None)
    )
    self._hash = hash((tokens, self._roles))

  # ------------------------------------------------------------- look-ups

  @property
  def tokens(self) -> tuple[str, ...]:
    """All token strings, row by row.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["a", "b"]).tokens
    ('a', 'b')
    """
    return self._tokens

  @property
  def roles(self) -> dict[str, str]:
    """The special roles that are set, e.g. ``{"pad": "<pad>"}``.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["<pad>", "a"], pad="<pad>").roles
    {'pad': '<pad>'}
    """
    return dict(self._roles)

  def _role_id(self, role: str) -> int | None:
    token = dict(self._roles).get(role)
    return None if token is None else self._ids[token]

  @property
  def pad_id(self) -> int | None:
    """Row of the padding token, or None.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["a", "<pad>"], pad="<pad>").pad_id
    1
    """
    return self._role_id("pad")

  @property
  def unk_id(self) -> int | None:
    """Row of the unknown token, or None.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["<unk>", "a"], unk="<unk>").unk_id
    0
    """
    return self._role_id("unk")

  @property
  def bos_id(self) -> int | None:
    """Row of the beginning-of-sequence token, or None.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["<s>", "a"], bos="<s>").bos_id
    0
    """
    return self._role_id("bos")

  @property
  def eos_id(self) -> int | None:
    """Row of the end-of-sequence token, or None.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["a", "</s>"], eos="</s>").eos_id
    1
    """
    return self._role_id("eos")

  def id(self, token: str) -> int:
    """The row of ``token``; the unk row for unknown tokens if there is one.

    >>> import named_embed as ne
    >>> ne.Vocabulary(["a", "b"]).id("b")
    1

    Raises:
      TypeError: for anything but a string.
      KeyError: for an unknown token when no unk role is set.
    """
    if not isinstance(token, str):
      raise TypeError(
        f"Vocabulary.id takes one token string, got {_shown(token)}. For a"
        " list of tokens, use `encode`; for the token of a row, `token`."
      )
    found = self._ids.get(token)
    if found is not None:
      return found
    unk = self.unk_id
    if unk is None:
      raise KeyError(
        f"Token {token!r} is not in the vocabulary of {len(self)} tokens"
        " and no `unk` token is set."
      )
    return unk

  def token(self, index: int) -> str:
    """The token of row ``index`` (negative values count from the end).

    >>> import named_embed as ne
    >>> ne.Vocabulary(["a", "b"]).token(-1)
    'b'

    Raises:
      TypeError: for anything but an integer (a string, a float, a list).
      IndexError: outside ``[-len, len)``.
    """
    try:
      index = operator.index(index)
    except TypeError:
      raise TypeError(
        f"Vocabulary.token takes one integer row, got {_shown(index)}. For"
        " a list or array of ids, use `decode`; for the row of a token,"
        " `id`."
      ) from None
    if not -len(self) <= index < len(self):
      raise IndexError(
        f"Row {index} is outside the vocabulary of {len(self)} tokens."
      )
    return self._tokens[index]

  def encode(self, tokens: Iterable[str]) -> list[int]:
    """Rows of ``tokens``, a list of token strings (see `id`).

    A vocabulary maps whole tokens, it does not tokenize: split a text
    first (or use the model's tokenizer), then encode its tokens.

    >>> import named_embed as ne
    >>> vocab = ne.Vocabulary(["a", "dog", "slept"])
    >>> vocab.encode(["dog", "a", "dog"])
    [1, 0, 1]
    >>> vocab.encode("a dog slept".split())
    [0, 1, 2]
    >>> vocab.encode("a dog slept")
    Traceback (most recent call last):
      ...
    TypeError: Vocabulary.encode takes a list of token strings, got the str 'a dog slept', which would be encoded character by character. Split it into tokens first, e.g. `vocab.encode(text.split())`, or tokenize it with the model's tokenizer (e.g. a Hugging Face tokenizer's `tokenize(text)`) and encode the tokens; for one token, use `vocab.id(token)`.

    Raises:
      TypeError: for a bare string (or bytes), or a token that is not a
        string.
      KeyError: for an unknown token when no unk role is set.
    """
    if isinstance(tokens, (str, bytes, bytearray)):
      raise TypeError(
        "Vocabulary.encode takes a list of token strings, got"
        f" {_shown(tokens)}, which would be encoded character by character."
        " Split it into tokens first, e.g. `vocab.encode(text.split())`, or"
        " tokenize it with the model's tokenizer (e.g. a Hugging Face"
        " tokenizer's `tokenize(text)`) and encode the tokens; for one"
        " token, use `vocab.id(token)`."
      )
    return [self.id(token) for token in tokens]

  def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
    """Tokens of ``ids``, a list or an integer array of any shape, read in
    row-major order (see `token`).

    >>> import named_embed as ne
    >>> ne.Vocabulary(["a", "b"]).decode([1, 0])
    ['b', 'a']

    Raises:
      TypeError: for a string, or ids that are not integers.
      IndexError: for an id outside ``[-len, len)``.
    """
    if isinstance(ids, (str, bytes, bytearray)):
      raise TypeError(
        f"Vocabulary.decode takes integer ids, got {_shown(ids)}. For the"
        " rows of tokens, use `encode` (a list of tokens) or `id` (one)."
      )
    values = np.asarray(ids)
    if values.size and values.dtype.kind not in "iu":
      raise TypeError(
        "Vocabulary.decode takes integer ids, got an array of dtype"
        f" {values.dtype} (shape {values.shape}). Non-integer ids are never"
        " converted silently: convert them explicitly, e.g."
        " `ids.astype(int)`."
      )
    return [self.token(i) for i in values.reshape(-1).tolist()]

  # ------------------------------------------------------------- protocol

  def __len__(self) -> int:
    return len(self._tokens)

  def __contains__(self, token: object) -> bool:
    return token in self._ids

  def __iter__(self) -> Iterator[str]:
    return iter(self._tokens)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    if self is other:
      return True
    if not isinstance(other, Vocabulary):
      return NotImplemented
    return (
      self._hash == other._hash
      and self._tokens == other._tokens
      and self._roles == other._roles
    )

  def __repr__(self) -> str:
    shown = ", ".join(repr(t) for t in self._tokens[:5])
    more = ", ..." if len(self) > 5 else ""
    roles = "".join(f", {r}={t!r}" for r, t in self._roles)
    return f"Vocabulary([{shown}{more}] ({len(self)} tokens){roles})"

  # ------------------------------------------------------------- loading

  @classmethod
  def load(
    cls, path: str | os.PathLike[str], *, guess_roles: bool = True
  ) -> Vocabulary:
    """Reads a ``vocab.txt`` (one token a line) or a ``tokenizer.json``.

    For ``tokenizer.json`` (Hugging Face), the vocabulary of the model
    (WordPiece / BPE ``{"token": id}`` maps, Unigram ``[token, score]``
    lists) and the ``added_tokens`` are read; no tokenizer library is
    needed. Special roles are guessed from the usual spellings
    (``[PAD]``/``<pad>``, ``[UNK]``/``<unk>``, ``[CLS]``/``<s>``,
    ``[SEP]``/``</s>``) unless ``guess_roles`` is False.

    Args:
      path: The file.
      guess_roles: Set pad/unk/bos/eos from well-known token spellings.

    Returns:
      The vocabulary.

    Raises:
      ValueError: for a malformed file, naming the file and the problem.

    Example:

    >>> import tempfile, os, named_embed as ne
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = os.path.join(tmp, "vocab.txt")
    ...   with open(path, "w") as f:
    ...     _ = f.write("[PAD]\\n[UNK]\\nthe\\n")
    ...   ne.Vocabulary.load(path)
    Vocabulary(['[PAD]', '[UNK]', 'the'] (3 tokens), pad='[PAD]', unk='[UNK]')
    """
    path = os.fspath(path)
    if path.endswith(".json"):
      tokens = vocabulary_files.tokenizer_json_tokens(path)
    else:
      tokens = vocabulary_files.vocab_txt_tokens(path)
    roles = _guess_roles(tokens) if guess_roles else {}
    try:
      return cls(tokens, **roles)
    except ValueError as error:
      raise ValueError(f"{path}: {error}") from None


def _ids_of(tokens: tuple) -> dict[str, int]:
  """Token -> row; a ValueError for a non-string or repeated token."""
  if set(map(type, tokens)) - {str}:
    for i, token in enumerate(tokens):
      if not isinstance(token, str):
        raise ValueError(
          f"Vocabulary tokens must be strings; row {i} is {token!r}."
        )
  ids = dict(zip(tokens, range(len(tokens))))
  if len(ids) != len(tokens):
    for i, token in enumerate(tokens):
      if ids[token] != i:
        again = tokens.index(token, i + 1)
        raise ValueError(
          f"Vocabulary token {token!r} appears twice: rows {i} and {again}."
        )
  return ids


def _shown(value: object, limit: int = 40) -> str:
  """``value`` for an error message: its type and a short repr."""
  text = repr(value)
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  return f"the {type(value).__name__} {text}"


def _guess_roles(tokens: Sequence[str]) -> dict[str, str]:
  present = set(tokens)
  roles = {}
  for role, spellings in _ROLE_GUESSES.items():
    for spelling in spellings:
      if spelling in present:
        roles[role] = spelling
        break
  return roles
