"""gensim's ``KeyedVectors.most_similar``, on every kind of table.

`most_similar` follows gensim 4's arithmetic and returns what it returns,
a plain list of ``(token, score)``: each key that is a token or an id is
unit-normalised, a vector key is taken as given, the keys are averaged with
their weights (``1`` for positive keys, ``-1`` for negative ones, or the
weight of a ``(key, weight)`` pair) over the sum of the weights' sizes,
and rows are ranked by cosine with that mean. The token and id keys are
never returned. The search is `named_embed.nearest`'s: chunked, on any
layout, reading a compressed or adapted table's rows as lookups do.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.tables.contract import AbstractTable, check_table
from named_embed._src.tools import inspection

_EPS = 1e-12
_CALLER = "ne.most_similar"


def most_similar(
  table: AbstractTable,
  positive: Any = None,
  negative: Any = None,
  topn: int | None = 10,
  restrict_vocab: int | None = None,
) -> list[tuple[str | int, float]] | np.ndarray:
  """The ``topn`` tokens most similar to ``positive`` minus ``negative``,
  as gensim's ``KeyedVectors.most_similar`` computes them.

  Args:
    table: Any kind of table, on any layout.
    positive: A key or a list of keys to move towards. A key is a token
      (the table needs a vocabulary), an int id, a vector (a numpy or jax
      array shaped like one row, or a `NamedArray` with exactly the
      table's embedding axes), or a ``(key, weight)`` pair. A 2-D numpy
      array is a list of vectors.
    negative: Keys to move away from (weight ``-1``; a pair's weight is
      used as given, as in gensim).
    topn: How many to return; ``None`` returns the cosine of the mean with
      every row searched, as a float numpy array, queries included; below
      1, an empty list.
    restrict_vocab: Search only the first this many tokens.

  Returns:
    ``[(token, score), ...]``, best first (``(id, score)`` without a
    vocabulary), at most ``topn``: the token and id keys and the padding
    row are left out.

  Raises:
    TypeError: if ``table`` is not a named_embed table, or for a key or
      ``topn`` of the wrong type.
    KeyError: for a token not in the vocabulary.
    ValueError: for no keys at all, a negative ``restrict_vocab``, or a
      vector that does not have the shape of one row.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import similar
  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0.1]],
  ...     np.float32)).with_vocabulary(
  ...     ne.Vocabulary(["king", "man", "woman", "queen", "prince"]))
  >>> [(t, round(s, 3)) for t, s in similar.most_similar(table, "king", topn=2)]
  [('prince', 0.998), ('man', 0.707)]
  >>> pairs = similar.most_similar(table, ["king", "woman"], ["man"], topn=1)
  >>> [(t, round(s, 3)) for t, s in pairs]
  [('queen', 1.0)]
  """
  check_table(table, _CALLER)
  topn = _check_topn(topn)
  if topn is not None and topn < 1:
    return []
  limit = _check_restrict(table, restrict_vocab)
  terms = [_term(item, 1.0, "positive") for item in _as_keys(positive)]
  terms += [_term(item, -1.0, "negative") for item in _as_keys(negative)]
  if not terms:
    raise ValueError(
      f"{_CALLER}: no keys to average; give `positive` and/or `negative`"
      " keys (tokens, ids or vectors)."
    )
  mean = _mean(table, terms)
  if topn is None:
    found = inspection.search(
      table, mean, None, [], limit, "cosine", limit=limit, keep_padding=True
    )
    ids, scores = (np.asarray(a.unwrap("neighbor")) for a in found)
    every = np.empty(limit, scores.dtype)
    every[ids] = scores
    return every
  excluded = sorted(
    {
      inspection.row_id(table, key)
      for key, _ in terms
      if inspection.is_row(key)
    }
  )
  found = inspection.search(
    table, mean, None, excluded, min(topn, limit), "cosine", limit=limit
  )
  return [(key, score) for key, score in found.pairs() if score != -np.inf]


def _check_topn(topn: Any) -> int | None:
  if topn is None:
    return None
  if isinstance(topn, bool) or not isinstance(topn, Integral):
    raise TypeError(f"{_CALLER}: `topn` must be an int or None, got {topn!r}.")
  return int(topn)


def _check_restrict(table: AbstractTable, restrict_vocab: Any) -> int:
  """The number of rows searched: the first ``restrict_vocab`` tokens."""
  if restrict_vocab is None or (
    isinstance(restrict_vocab, Integral) and restrict_vocab == 0
  ):
    return table.vocab_size  # gensim: a false restrict_vocab searches all
  if isinstance(restrict_vocab, bool) or not isinstance(
    restrict_vocab, Integral
  ):
    raise TypeError(
      f"{_CALLER}: `restrict_vocab` must be an int or None, got"
      f" {restrict_vocab!r}."
    )
  if restrict_vocab < 0:
    raise ValueError(
      f"{_CALLER}: `restrict_vocab` must be positive (the first tokens to"
      f" search), got {restrict_vocab}."
    )
  return min(int(restrict_vocab), table.vocab_size)


def _as_keys(value: Any) -> list[Any]:
  """gensim's reading of ``positive`` / ``negative``: one key or vector, a
  2-D numpy array of vectors, or a sequence of keys."""
  if value is None:
    return []
  if inspection.is_row(value) or _is_vector(value):
    return [value]
  if isinstance(value, np.ndarray) and value.ndim == 2:
    return list(value)
  if isinstance(value, Sequence) and not isinstance(value, str):
    return list(value)
  raise TypeError(
    f"{_CALLER}: keys must be a token, an id, a vector or a list of them;"
    f" got {type(value).__name__}."
  )


def _is_vector(value: Any) -> bool:
  """A float array or `NamedArray` (integer arrays are not keys)."""
  if not (
    isinstance(value, pz.nx.NamedArrayBase)
    or (isinstance(value, (np.ndarray, jax.Array)) and value.ndim >= 1)
  ):
    return False
  return bool(jnp.issubdtype(value.dtype, jnp.floating))


def _term(item: Any, weight: float, argument: str) -> tuple[Any, float]:
  """``(key, weight)`` of one item (gensim: a non-key is a pair)."""
  if inspection.is_row(item) or _is_vector(item):
    return item, weight
  if (
    isinstance(item, (tuple, list))
    and len(item) == 2
    and (inspection.is_row(item[0]) or _is_vector(item[0]))
    and isinstance(item[1], Real)
    and not isinstance(item[1], bool)
  ):
    return item[0], float(item[1])
  raise TypeError(
    f"{_CALLER}: `{argument}` holds {item!r}, which is not a token, an id,"
    " a float vector or a (key, weight) pair. A weighted key goes in a"
    f" list: {argument}=[('king', 0.5)]."
  )


def _mean(
  table: AbstractTable, terms: list[tuple[Any, float]]
) -> pz.nx.NamedArray:
  """gensim's weighted mean: unit rows of tokens and ids, vectors as
  given, over the sum of the weights' sizes; a `NamedArray` with the
  table's embedding axes."""
  axes = table.embedding_axes
  vectors = []
  for key, _ in terms:
    vector, _ = inspection.resolve(table, key)
    if dict(vector.named_shape) != dict(axes):
      raise ValueError(
        f"{_CALLER}: a key must be one row or one vector with the table's"
        f" embedding axes {axes}; got axes {dict(vector.named_shape)}. For"
        " batches of queries use ne.nearest or ne.analogy."
      )
    flat = vector.order_as(*axes).data_array.reshape(-1)
    vectors.append((flat, inspection.is_row(key)))
  dtype = inspection.accumulation_dtype(*(v for v, _ in vectors))
  total = jnp.zeros(vectors[0][0].shape, dtype)
  for (flat, is_key), (_, weight) in zip(vectors, terms):
    flat = flat.astype(dtype)
    if is_key:
      norm = jnp.sqrt(jnp.sum(flat * flat))
      flat = flat / jnp.maximum(norm, jnp.asarray(_EPS, dtype))
    total = total + jnp.asarray(weight, dtype) * flat
  size = sum(abs(weight) for _, weight in terms)
  if size > 0:
    total = total / jnp.asarray(size, dtype)
  return pz.nx.wrap(total.reshape(tuple(axes.values()))).tag(*axes)
