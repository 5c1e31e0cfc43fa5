"""Helpers shared by the readers and writers of `named_embed.formats`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.tables.contract import AbstractTable
from named_embed._src.tables.table import EmbeddingTable
from named_embed._src.tools import row_scan

VocabularyLike = Vocabulary | str | os.PathLike[str] | None


def as_vocabulary(vocabulary: VocabularyLike) -> Vocabulary | None:
  """A `Vocabulary`, loading ``vocab.txt`` / ``tokenizer.json`` paths.

  >>> import named_embed as ne
  >>> as_vocabulary(ne.Vocabulary(["a"])).tokens
  ('a',)
  """
  if vocabulary is None or isinstance(vocabulary, Vocabulary):
    return vocabulary
  if isinstance(vocabulary, (str, os.PathLike)):
    return Vocabulary.load(vocabulary)
  raise TypeError(
    "`vocabulary` must be a named_embed.Vocabulary, a path to a vocab.txt or"
    f" tokenizer.json file, or None; got {type(vocabulary).__name__}."
  )


def build_table(
  rows: Any,
  *,
  source: str,
  vocabulary: VocabularyLike = None,
  vocabulary_axis: str = "vocabulary",
  embedding_axes: Sequence[str] | str | None = None,
  padding_index: int | None = None,
  freeze: bool = True,
  name: str = "embeddings",
) -> EmbeddingTable:
  """`EmbeddingTable.from_pretrained` + `with_vocabulary`, errors prefixed.

  ``source`` names where ``rows`` came from (a file and key, a module), so
  that a shape or vocabulary mismatch says which input was wrong.

  >>> import numpy as np
  >>> build_table(np.ones((2, 3), np.float32), source="x").vocab_size
  2
  """
  vocabulary = as_vocabulary(vocabulary)
  try:
    table = EmbeddingTable.from_pretrained(
      rows,
      vocabulary_axis=vocabulary_axis,
      embedding_axes=embedding_axes,
      name=name,
      padding_index=padding_index,
      freeze=freeze,
    )
    if vocabulary is not None:
      table = table.with_vocabulary(vocabulary)
  except (ValueError, TypeError) as error:
    raise type(error)(f"{source}: {error}") from None
  return table


def host_rows(table: EmbeddingTable) -> np.ndarray:
  """The ``[vocabulary, *embedding]`` array of a float table on the host,
  C-contiguous (alignment rows included). For any kind of table, use
  `float_rows`.

  bfloat16 comes back as ``ml_dtypes.bfloat16``, bit for bit.

  >>> import numpy as np, named_embed as ne
  >>> host_rows(ne.EmbeddingTable.from_pretrained(np.ones((2, 3), np.float32)
  ...           )).shape
  (2, 3)
  """
  return np.ascontiguousarray(np.asarray(table.rows_array()))


def float_rows(
  table: AbstractTable, alignment_rows: bool = False
) -> np.ndarray:
  """The float rows of any kind of table on the host, as lookups read them
  (a quantised table's dequantised, an adapted table's merged), in the
  table's dtype: the token rows, or every row with ``alignment_rows``.

  Built one chunk at a time on the table's devices (`named_embed._src.tools.row_scan`):
  works on every layout, and never holds the float table on a device.

  >>> import numpy as np, named_embed as ne
  >>> q = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[1, 2], [3, 4], [5, 6]], np.float32)).quantized()
  >>> float_rows(q).round(2).tolist()
  [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
  """
  stop = table.num_rows if alignment_rows else table.vocab_size
  return row_scan.host_rows(table, stop)


def flat_host_rows(table: AbstractTable, target: str) -> np.ndarray:
  """The token rows (alignment rows left out) of a table of any kind with
  one embedding axis, on the host (`float_rows`); refuses the others.

  ``target`` names the format in the error message (e.g. ``"word2vec"``).
  Flattening silently would lose the axis structure, so the caller is told
  how to do it explicitly instead.

  >>> import numpy as np, named_embed as ne
  >>> t = ne.EmbeddingTable.from_pretrained(np.ones((2, 3, 4), np.float32),
  ...                                       embedding_axes=("a", "b"))
  >>> flat_host_rows(t, "word2vec")
  Traceback (most recent call last):
  ...
  ValueError: word2vec holds one vector of numbers per row, but this table has 2 embedding axes {'a': 3, 'b': 4}. Flatten them first if that is what you want: ne.EmbeddingTable.from_pretrained(ne.to_brainstate_weight(table).reshape(table.vocab_size, -1), padding_index=table.padding_index).with_vocabulary(table.vocabulary).
  """
  check_one_axis(table, target)
  return float_rows(table)


def check_one_axis(table: AbstractTable, target: str) -> None:
  """Raises unless ``table`` has exactly one embedding axis (see above).

  >>> import numpy as np, named_embed as ne
  >>> check_one_axis(ne.EmbeddingTable.from_pretrained(
  ...     np.ones((2, 3), np.float32)), "word2vec")
  """
  axes = table.embedding_axes
  if len(axes) != 1:
    raise ValueError(
      f"{target} holds one vector of numbers per row, but this table has"
      f" {len(axes)} embedding axes {axes}. Flatten them first if that is"
      " what you want: ne.EmbeddingTable.from_pretrained("
      "ne.to_brainstate_weight(table).reshape(table.vocab_size, -1),"
      " padding_index=table.padding_index)"
      ".with_vocabulary(table.vocabulary)."
    )


def available(names: Sequence[str], limit: int = 30) -> str:
  """A short listing of ``names`` for error messages.

  >>> available(["b", "a", "c"], limit=2)
  "['a', 'b', ... and 1 more]"
  """
  names = sorted(names)
  shown = ", ".join(repr(n) for n in names[:limit])
  more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
  return f"[{shown}{more}]"
