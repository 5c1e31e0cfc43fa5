"""The demo's training text: loading it, its characters and its windows.

The characters form a `named_embed.Vocabulary` (`char_vocabulary`), which
the demo attaches to its embedding table so that the table's rows are
labelled by character.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable

import jax
import numpy as np
from penzai import pz

import named_embed as ne


def load_text(name: str = "fables.txt") -> str:
  """Loads a text shipped in ``named_embed/data``, whitespace collapsed.

  Runs of spaces and newlines become single spaces, so the text is one long
  line of characters.

  Args:
    name: File name inside ``named_embed/data``.

  Returns:
    The text.

  Example:

  >>> text = load_text()
  >>> text[:24], len(text) > 20_000, "\\n" in text
  ('The Fox and the Well Onc', True, False)
  """
  resource = importlib.resources.files("named_embed") / "data" / name
  return " ".join(resource.read_text(encoding="utf-8").split())


def char_vocabulary(text: str) -> ne.Vocabulary:
  """The `named_embed.Vocabulary` of the distinct characters of ``text``.

  Token ``i`` is the ``i``-th character in sorted order; no special roles
  (no padding, no unknown token: encoding a character outside ``text`` is a
  `KeyError`).

  Example:

  >>> vocab = char_vocabulary("abba cab")
  >>> vocab.tokens, len(vocab)
  ((' ', 'a', 'b', 'c'), 4)
  >>> vocab.encode(list("cab"))  # its tokens are the characters
  [3, 1, 2]
  >>> "".join(vocab.decode([2, 1, 0, 3]))
  'ba c'
  """
  return ne.Vocabulary(sorted(set(text)))


def encode(vocab: ne.Vocabulary, text: str) -> np.ndarray:
  """Token ids of the characters of ``text``, as an int32 array.

  Raises:
    KeyError: for a character outside ``vocab``.

  Example:

  >>> encode(char_vocabulary("ab"), "bab").tolist()
  [1, 0, 1]
  """
  return np.asarray(vocab.encode(list(text)), dtype=np.int32)


def decode(vocab: ne.Vocabulary, ids: Iterable[int] | np.ndarray) -> str:
  """The text of token ids (one character per id).

  >>> decode(char_vocabulary("ab"), [1, 0])
  'ba'
  """
  return "".join(vocab.decode(ids))


def windows_at(
  ids: jax.Array | np.ndarray, starts: jax.Array | np.ndarray, context: int
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
  """Context windows of ``ids`` and the token that follows each.

  Works on numpy arrays (no compilation) and on jax arrays or tracers.

  Args:
    ids: 1-D int32 array of token ids.
    starts: 1-D int32 array of window starts, each at most
      ``len(ids) - context - 1``.
    context: Window length.

  Returns:
    ``(tokens, targets)``: tokens ``{"batch", "context"}`` and next tokens
    ``{"batch"}``.

  Example:

  >>> tokens, targets = windows_at(np.arange(10, dtype=np.int32),
  ...                              np.array([0, 5], np.int32), 3)
  >>> tokens.named_shape
  {'batch': 2, 'context': 3}
  >>> tokens.unwrap("batch", "context").tolist()
  [[0, 1, 2], [5, 6, 7]]
  >>> targets.unwrap("batch").tolist()
  [3, 8]
  """
  offsets = np.arange(context + 1, dtype=np.int32)
  windows = ids[starts[:, None] + offsets[None, :]]
  tokens = pz.nx.wrap(windows[:, :context]).tag("batch", "context")
  targets = pz.nx.wrap(windows[:, context]).tag("batch")
  return tokens, targets
