"""The demo's training text: loading it, its characters and its windows."""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterable

import jax
import numpy as np
from penzai import pz


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


@dataclasses.dataclass(frozen=True)
class CharVocabulary:
  """A character vocabulary: token id ``i`` is ``chars[i]``.

  Example:

  >>> vocab = CharVocabulary.from_text("abba cab")
  >>> vocab.chars, len(vocab)
  ((' ', 'a', 'b', 'c'), 4)
  >>> vocab.encode("cab").tolist()
  [3, 1, 2]
  >>> vocab.decode([2, 1, 0, 3])
  'ba c'
  >>> vocab.labels()
  ['␣', 'a', 'b', 'c']

  Attributes:
    chars: The distinct characters, sorted.
  """

  chars: tuple[str, ...]

  @classmethod
  def from_text(cls, text: str) -> CharVocabulary:
    """The sorted distinct characters of ``text``.

    >>> CharVocabulary.from_text("hello").chars
    ('e', 'h', 'l', 'o')
    """
    return cls(tuple(sorted(set(text))))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of ``text`` as an int32 array.

    Raises:
      ValueError: if ``text`` holds a character outside the vocabulary.

    >>> CharVocabulary.from_text("ab").encode("bab").tolist()
    [1, 0, 1]
    """
    index = {char: i for i, char in enumerate(self.chars)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
      raise ValueError(
        f"characters {unknown} are not in the vocabulary"
        f" {''.join(self.chars)!r}"
      )
    return np.array([index[char] for char in text], dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of token ids.

    >>> CharVocabulary.from_text("ab").decode([1, 0])
    'ba'
    """
    return "".join(self.chars[int(i)] for i in ids)

  def labels(self) -> list[str]:
    """Printable labels of the tokens (a space shows as ``␣``).

    >>> CharVocabulary.from_text("a b").labels()
    ['␣', 'a', 'b']
    """
    return ["␣" if char == " " else char for char in self.chars]


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
