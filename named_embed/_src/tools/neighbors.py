"""`Neighbors`: what a search returns, shown as (token, score) lists.

`named_embed.nearest` and `named_embed.analogy` return a `Neighbors`: the
named tuple ``(ids, scores)`` of two `NamedArray` s, as before
(``ids, scores = ne.nearest(...)`` unpacks it), which also carries the
table's vocabulary and the metric. Its ``repr``, its treescope view and
`Neighbors.pairs` name the ids by token: ``[('prince', 0.9754), ...]``,
one list a query, instead of a heatmap of ids.

It is a pytree (the two arrays are its leaves; the vocabulary, metric and
query labels are static), so a jitted search returns one too.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import numpy as np

from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.tools import row_scan

NEIGHBOR_AXIS = "neighbor"
MAX_LINES = 20
"""Queries shown by ``repr`` and treescope; the rest are counted."""
MAX_PAIRS = 50
"""Pairs shown a query by ``repr`` and treescope; the rest are counted."""

_SCORE_WORDS = {
  "cosine": "cosine similarity, best first",
  "dot": "dot product, best first",
  "euclidean": "euclidean distance, nearest first",
}


class _Fields(NamedTuple):
  ids: Any
  scores: Any


class Neighbors(_Fields):
  """The ``(ids, scores)`` of a search, best first, named by token.

  A named tuple of two `NamedArray` s with the query's batch axes and a
  ``"neighbor"`` axis: ``ids`` (int32 rows) and ``scores`` (similarities,
  or distances for ``"euclidean"``). Unpack it as a pair; its ``repr`` and
  treescope view show (token, score) lists (ids without a vocabulary).

  Attributes:
    ids: The rows found.
    scores: Their scores.
    vocabulary: The table's `Vocabulary` (names the ids), or None.
    metric: ``"cosine"``, ``"dot"`` or ``"euclidean"``.
    queries: Labels of the queries along a single ``"query"`` axis (the
      tokens or ids asked for), or None.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1, 0], [0.9, 0.1], [0, 1]], np.float32)).with_vocabulary(
  ...     ne.Vocabulary(["cat", "dog", "car"]))
  >>> found = table.nearest("cat", k=2)
  >>> found
  Neighbors([('dog', 0.9939), ('car', 0.0)], metric='cosine')
  >>> ids, scores = found
  >>> ids.named_shape
  {'neighbor': 2}
  >>> table.nearest(["cat", "car"], k=1)
  Neighbors({
    'cat': [('dog', 0.9939)],
    'car': [('dog', 0.1104)],
  }, metric='cosine')
  """

  vocabulary: Vocabulary | None = None
  metric: str = "cosine"
  queries: tuple[str | int, ...] | None = None

  def __new__(
    cls,
    ids: Any,
    scores: Any,
    *,
    vocabulary: Vocabulary | None = None,
    metric: str = "cosine",
    queries: tuple[str | int, ...] | None = None,
  ) -> Neighbors:
    self = super().__new__(cls, ids, scores)
    self.__dict__.update(vocabulary=vocabulary, metric=metric, queries=queries)
    return self

  def _replace(self, **fields: Any) -> Neighbors:
    """A copy with ``ids`` and/or ``scores`` replaced (the rest kept)."""
    ids, scores = fields.pop("ids", self.ids), fields.pop("scores", self.scores)
    if fields:
      raise ValueError(f"Neighbors has no fields {sorted(fields)}.")
    return Neighbors(ids, scores, **self._static())

  def _static(self) -> dict[str, Any]:
    return dict(
      vocabulary=self.vocabulary, metric=self.metric, queries=self.queries
    )

  @property
  def batch_axes(self) -> dict[str, int]:
    """The query's batch axes and their sizes (no ``"neighbor"``).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.eye(3, dtype=np.float32))
    >>> table.nearest([0, 1], k=1).batch_axes
    {'query': 2}
    """
    shape = self.ids.named_shape
    return {n: s for n, s in shape.items() if n != NEIGHBOR_AXIS}

  def pairs(self) -> list:
    """``[(token, score), ...]`` best first (``(id, score)`` without a
    vocabulary); for batch axes, one such list a query, nested in the
    order of `batch_axes`. Scores are Python floats.

    Raises:
      ValueError: inside `jax.jit` (traced values have no numbers yet), or
        for results split over processes.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 1], [0, 1]], np.float32))
    >>> [(i, round(s, 3)) for i, s in table.nearest(0, k=2).pairs()]
    [(1, 0.707), (2, 0.0)]
    """
    if not self._concrete():
      raise ValueError(
        "Neighbors.pairs() needs concrete values held by this process;"
        " inside jax.jit the ids and scores are traced (return the Neighbors"
        " from the jitted function and call pairs() outside), and results"
        " split over processes must be gathered first."
      )
    batch = tuple(self.batch_axes)
    ids = np.asarray(self.ids.order_as(*batch, NEIGHBOR_AXIS).data_array)
    scores = np.asarray(self.scores.order_as(*batch, NEIGHBOR_AXIS).data_array)
    labels = self._labels(ids.reshape(-1)).reshape(ids.shape)

    def nest(label_rows, score_rows):
      if label_rows.ndim == 1:
        return [(_item(t), float(s)) for t, s in zip(label_rows, score_rows)]
      return [nest(a, b) for a, b in zip(label_rows, score_rows)]

    return nest(labels, scores)

  def _labels(self, ids: np.ndarray) -> np.ndarray:
    if self.vocabulary is None:
      return ids
    tokens = self.vocabulary.tokens
    return np.array([tokens[i] for i in ids.tolist()], dtype=object)

  def _concrete(self) -> bool:
    """Whether the numbers can be read here: concrete values, and on this
    process (held by its devices, or replicated on every process)."""
    leaves = jax.tree.leaves((self.ids, self.scores))
    return row_scan.is_concrete(leaves) and all(
      leaf.is_fully_addressable or leaf.is_fully_replicated
      for leaf in leaves
      if isinstance(leaf, jax.Array)
    )

  # ----------------------------------------------------------- rendering

  def lines(self) -> tuple[str, list[str]]:
    """``(what the scores are, lines)``: one line of ``(token, score)``
    pairs a query (``'king': [...]`` with batch axes), as ``repr`` and
    treescope show them; long results are cut (`MAX_LINES`, `MAX_PAIRS`).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.eye(3, dtype=np.float32))
    >>> table.nearest(0, k=1, metric="euclidean").lines()
    ('euclidean distance, nearest first', ['[(1, 1.414)]'])
    """
    what = _SCORE_WORDS.get(self.metric, self.metric)
    batch = self.batch_axes
    ids = np.asarray(self.ids.order_as(*batch, NEIGHBOR_AXIS).data_array)
    scores = np.asarray(self.scores.order_as(*batch, NEIGHBOR_AXIS).data_array)
    count = math.prod(batch.values())
    ids = ids.reshape(count, -1)
    scores = scores.reshape(count, -1)
    shown = min(count, MAX_LINES)
    lines = []
    for q, index in enumerate(itertools.islice(_indices(batch), shown)):
      text = _pair_list(self._labels(ids[q]), scores[q])
      lines.append(f"{self._key(index)}: {text}" if batch else text)
    if count > shown:
      lines.append(f"... ({count - shown} more queries)")
    return what, lines

  def _key(self, index: dict[str, int]) -> str:
    if self.queries is not None and list(index) == ["query"]:
      return repr(_item(self.queries[index["query"]]))
    return ", ".join(f"{name}={i}" for name, i in index.items())

  def __repr__(self) -> str:
    if not self._concrete():
      return (
        f"Neighbors(ids={self.ids!r}, scores={self.scores!r},"
        f" metric={self.metric!r})"
      )
    _, lines = self.lines()
    if not self.batch_axes:
      return f"Neighbors({lines[0]}, metric={self.metric!r})"
    body = "".join(f"  {line},\n" for line in lines)
    return f"Neighbors({{\n{body}}}, metric={self.metric!r})"

  def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
    printer.text("Neighbors(...)" if cycle else repr(self))

  def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
    """The (token, score) lists, one line a query, with what the scores
    are as a comment; traced values render as a plain named tuple."""
    if not self._concrete():
      return NotImplemented
    from treescope import rendering_parts

    what, lines = self.lines()
    comment = rendering_parts.comment_color(rendering_parts.text(f"  # {what}"))
    children = [
      rendering_parts.build_one_line_tree_node(f"{line},") for line in lines
    ]
    return rendering_parts.build_foldable_tree_node_from_children(
      prefix="Neighbors(",
      children=children,
      suffix=")",
      path=path,
      first_line_annotation=comment,
      expand_state=rendering_parts.ExpandState.EXPANDED,
    )


def _item(value: Any) -> Any:
  """A numpy scalar as a Python int or str (tokens stay strings)."""
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.str_):
    return str(value)
  return value


def _indices(batch: dict[str, int]):
  names = list(batch)
  for index in itertools.product(*(range(s) for s in batch.values())):
    yield dict(zip(names, index))


def _score(value: float) -> str:
  text = f"{float(value):.4g}"
  return text if any(c in text for c in ".ein") else text + ".0"


def _pair_list(labels: np.ndarray, scores: np.ndarray) -> str:
  shown = min(len(labels), MAX_PAIRS)
  parts = [
    f"({_item(t)!r}, {_score(s)})" for t, s in zip(labels[:shown], scores)
  ]
  if len(labels) > shown:
    parts.append(f"... ({len(labels) - shown} more)")
  return "[" + ", ".join(parts) + "]"


def _flatten(found: Neighbors):
  return (found.ids, found.scores), (
    found.vocabulary,
    found.metric,
    found.queries,
  )


def _unflatten(static: tuple, leaves: tuple) -> Neighbors:
  vocabulary, metric, queries = static
  return Neighbors(
    *leaves, vocabulary=vocabulary, metric=metric, queries=queries
  )


jax.tree_util.register_pytree_node(Neighbors, _flatten, _unflatten)


def query_labels(query: Any) -> tuple[str | int, ...] | None:
  """The labels of a list of token/id queries (the ``"query"`` axis), or
  None for any other query.

  >>> from named_embed._src.tools import neighbors
  >>> neighbors.query_labels(["king", 3]), neighbors.query_labels("king")
  (('king', 3), None)
  """
  if isinstance(query, (list, tuple)) and query:
    if all(
      isinstance(q, (str, int, np.integer)) and not isinstance(q, bool)
      for q in query
    ):
      return tuple(_item(q) for q in query)
  return None
