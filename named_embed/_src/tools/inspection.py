"""Looking at a table: nearest neighbours, similarities, analogies, a page.

Queries name rows by token string (the table needs a `Vocabulary`), by id,
by a list of either (batched over a new ``"query"`` axis), by an integer
`NamedArray` of ids, or by vectors: a `NamedArray` holding the table's
embedding axes plus any batch axes. Results are batched over those named
axes, and searches return a `named_embed._src.tools.neighbors.Neighbors`
(the ``(ids, scores)`` pair, shown as (token, score) lists). Everything
runs in float32 (float64 for float64 inputs). gensim's ``most_similar``
is `named_embed._src.tools.similar`, on the same search.

Every kind of table works alike (`EmbeddingTable`, `QuantizedTable`,
`LoraTable`, `TrainableRowsTable`), on one device or with its vocabulary
split over a mesh (Explicit or Auto axes): the rows of query ids are
gathered through the table's row source (`named_embed._src.rows.row_source`), and
a search scores the table's own rows one chunk at a time, each device its
own rows, in one jitted kernel per static configuration
(`named_embed._src.tools.row_scan`). A compressed or adapted table is read as
lookups read it (dequantised, adapters added), a chunk at a time: its
float table is never built. Results equal those of its float table
(``q.dequantized()``, ``t.merged()``) to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from penzai import pz

from named_embed._src.rows import row_source
from named_embed._src.tables.contract import AbstractTable, check_table
from named_embed._src.tools import neighbors, row_scan

METRICS = ("cosine", "dot", "euclidean")
NEIGHBOR_AXIS = neighbors.NEIGHBOR_AXIS
QUERY_AXIS = "query"
_EPS = 1e-12

Query = str | int | Sequence[str | int] | pz.nx.NamedArrayBase | jax.Array


def nearest(
  table: AbstractTable,
  query: Query,
  k: int = 10,
  metric: str = "cosine",
  exclude: str | int | Sequence[str | int] | None = None,
) -> neighbors.Neighbors:
  """The ``k`` rows closest to ``query``, best first.

  Token and id queries never return themselves (gensim's ``most_similar``);
  vector queries may. The padding row is never returned.

  Args:
    table: The table to search: any kind (`EmbeddingTable`,
      `QuantizedTable`, `LoraTable`, `TrainableRowsTable`), on any layout.
    query: A token, an id, a list of either (batch axis ``"query"``), an
      integer `NamedArray` of ids, or a float `NamedArray` with the
      table's embedding axes and any batch axes (a plain array shaped like
      one row is accepted too).
    k: Number of neighbours, positive; more than the vocabulary size
      gives the whole vocabulary.
    metric: ``"cosine"`` or ``"dot"`` (similarities, descending), or
      ``"euclidean"`` (distances, ascending).
    exclude: Tokens or ids never to return, besides the above.

  Returns:
    A `Neighbors`, the named tuple ``(ids, scores)`` of `NamedArray` s
    with the query's batch axes and a ``"neighbor"`` axis of size
    ``min(k, vocab_size)``, shown as (token, score) lists. If that exceeds
    the number of rows left, excluded rows fill the end with score ``-inf``
    (``inf`` distance).

  Raises:
    TypeError: if ``table`` is not a named_embed table (the message says
      what to pass), or for a query of the wrong type.
    KeyError: for a token not in the vocabulary.
    ValueError: for a bad ``k`` or ``metric``, or a query whose axes do not
      fit the table.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import inspection
  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)).with_vocabulary(
  ...     ne.Vocabulary(["a", "b", "c", "d"]))
  >>> ids, scores = inspection.nearest(table, "a", k=2)
  >>> table.vocabulary.decode(ids.unwrap("neighbor"))
  ['b', 'c']
  >>> np.round(scores.unwrap("neighbor"), 3).tolist()
  [0.994, 0.0]
  >>> ids, _ = inspection.nearest(table, ["a", "c"], k=1)
  >>> ids.named_shape, ids.unwrap("query", "neighbor").tolist()
  ({'query': 2, 'neighbor': 1}, [[1], [1]])
  """
  check_table(table, "ne.nearest")
  k = _check_k(table, k)
  metric = _check_metric(metric)
  vectors, ids = resolve(table, query)
  excluded = [row_id(table, item) for item in _as_list(exclude)]
  return search(
    table,
    vectors,
    ids,
    excluded,
    k,
    metric,
    labels=neighbors.query_labels(query),
  )


def similarity(
  table: AbstractTable, a: Query, b: Query, metric: str = "cosine"
) -> pz.nx.NamedArray:
  """Similarity (or distance) of ``a`` and ``b``, broadcast by axis name.

  Args:
    table: The table the tokens and ids refer to.
    a: A query as in `nearest`.
    b: Another; batch axes with the same name are paired, others broadcast
      (two token lists pair up along ``"query"``).
    metric: ``"cosine"``, ``"dot"``, or ``"euclidean"`` (a distance).

  Returns:
    A float `NamedArray` with the batch axes of ``a`` and ``b`` (none for
    two tokens: ``float(...)`` gives the number).

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: for a bad ``metric``.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import inspection
  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[3, 4], [4, 3]], np.float32)).with_vocabulary(
  ...     ne.Vocabulary(["x", "y"]))
  >>> round(float(inspection.similarity(table, "x", "y")), 4)
  0.96
  >>> round(float(inspection.similarity(table, 0, "y", "euclidean")), 4)
  1.4142
  """
  check_table(table, "ne.similarity")
  metric = _check_metric(metric)
  left, _ = resolve(table, a)
  right, _ = resolve(table, b)
  names = tuple(table.embedding_axes)
  dtype = accumulation_dtype(left, right)

  def pair(x, y):
    x, y = x.reshape(-1).astype(dtype), y.reshape(-1).astype(dtype)
    if metric == "euclidean":
      return jnp.sqrt(jnp.sum((x - y) ** 2))
    if metric == "cosine":
      x, y = _unit(x), _unit(y)
    return jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST)

  return pz.nx.nmap(pair)(left.untag(*names), right.untag(*names))


def analogy(
  table: AbstractTable,
  positive: Query | Sequence[Query],
  negative: Query | Sequence[Query] = (),
  k: int = 10,
) -> neighbors.Neighbors:
  """Word analogies, with gensim's ``most_similar(positive, negative)``.

  ``a - b + c`` is ``analogy(table, positive=[a, c], negative=[b])``: the
  mean of the unit-normalised positive vectors and negated negative ones,
  compared by cosine with every row. The input tokens and the padding row
  are never returned.

  Args:
    table: The table to search.
    positive: Tokens, ids or vectors (see `nearest`) to move towards.
    negative: Tokens, ids or vectors to move away from.
    k: Number of answers.

  Returns:
    A `Neighbors` ``(ids, scores)`` as in `nearest`, scores being cosine
    similarities.

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: if there are no inputs at all.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import inspection
  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], np.float32)
  ...     ).with_vocabulary(ne.Vocabulary(["king", "man", "woman", "queen"]))
  >>> ids, _ = inspection.analogy(table, ["king", "woman"], ["man"], k=1)
  >>> table.vocabulary.decode(ids.unwrap("neighbor"))
  ['queen']
  """
  check_table(table, "ne.analogy")
  k = _check_k(table, k)
  terms = [(item, 1.0) for item in _as_list(positive)]
  terms += [(item, -1.0) for item in _as_list(negative)]
  if not terms:
    raise ValueError("analogy() needs at least one positive or negative input.")
  names = tuple(table.embedding_axes)
  resolved = [resolve(table, item)[0] for item, _ in terms]
  dtype = accumulation_dtype(*resolved)
  total = None
  for vectors, (_, weight) in zip(resolved, terms):
    unit = pz.nx.nmap(lambda v: _unit(v.astype(dtype)))(vectors.untag(*names))
    term = unit.tag(*names) * jnp.asarray(weight / len(terms), dtype)
    total = term if total is None else total + term
  excluded = [row_id(table, item) for item, _ in terms if is_row(item)]
  return search(table, total, None, excluded, k, "cosine")


def _check_k(table: AbstractTable, k: int) -> int:
  """``k`` as an int, at most the vocabulary size (gensim returns fewer)."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"`k` must be a positive int, got {k!r}.")
  if k < 1:
    raise ValueError(f"`k` must be a positive int, got {k}.")
  return min(int(k), table.vocab_size)


def _check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
  return metric


def _as_list(items: Any) -> list[Any]:
  if items is None:
    return []
  if isinstance(items, (list, tuple)):
    return list(items)
  return [items]


def is_row(item: Any) -> bool:
  """Whether ``item`` names one row: a token string or an int id (not a
  bool).

  >>> from named_embed._src.tools import inspection
  >>> inspection.is_row("king"), inspection.is_row(3), inspection.is_row(True)
  (True, True, False)
  """
  if isinstance(item, bool):
    return False
  return isinstance(item, (str, int, np.integer))


def row_id(table: AbstractTable, item: str | int) -> int:
  """The row of a token or id, checked: strict, never the unk row.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import inspection
  >>> table = ne.EmbeddingTable.from_pretrained(np.eye(3, dtype=np.float32)
  ...     ).with_vocabulary(ne.Vocabulary(["a", "b", "c"]))
  >>> inspection.row_id(table, "b"), inspection.row_id(table, -1)
  (1, 2)
  """
  size = table.vocab_size
  if isinstance(item, str):
    vocabulary = table.vocabulary
    if vocabulary is None:
      raise ValueError(
        f"Cannot look up token {item!r}: the table has no vocabulary. Attach"
        " one with `table.with_vocabulary(ne.Vocabulary(tokens))`, or query"
        " by id."
      )
    if item not in vocabulary:
      raise KeyError(
        f"Token {item!r} is not in the table's vocabulary of {size} tokens."
      )
    return vocabulary.id(item)
  if not is_row(item):
    raise TypeError(
      f"Expected a token string or an int id, got {type(item).__name__}"
      f" {item!r}."
    )
  if not -size <= int(item) < size:
    raise IndexError(f"Row {int(item)} is outside the table's {size} rows.")
  return int(item) % size


def accumulation_dtype(*arrays: Any) -> np.dtype:
  """float64 if any input (an array, or a row source) is float64, else
  float32 (no promotion rules).

  >>> import numpy as np
  >>> from named_embed._src.tools import inspection
  >>> inspection.accumulation_dtype(np.ones(2, np.float16))
  dtype('float32')
  """
  wide = any(np.dtype(array.dtype) == np.float64 for array in arrays)
  return np.dtype(np.float64 if wide else np.float32)


def _unit(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(x * x))
  return x / jnp.maximum(norm, jnp.asarray(_EPS, x.dtype))


def resolve(
  table: AbstractTable, query: Any
) -> tuple[pz.nx.NamedArrayBase, pz.nx.NamedArrayBase | None]:
  """``(vectors, ids)`` of a query (see `nearest`): the rows of tokens and
  ids, gathered through the table's row source, or the vectors checked;
  ``ids`` is None for vector queries.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import inspection
  >>> table = ne.EmbeddingTable.from_pretrained(np.eye(3, dtype=np.float32))
  >>> vectors, ids = inspection.resolve(table, [2, 0])
  >>> vectors.named_shape, ids.named_shape
  ({'query': 2, 'embedding': 3}, {'query': 2})
  """
  if isinstance(query, (jax.Array, np.ndarray)):
    if jnp.issubdtype(query.dtype, jnp.integer) and query.ndim == 0:
      # A numpy id goes by value (`row_id`): jnp keeps 32 of int64's bits.
      query = query[()] if isinstance(query, np.ndarray) else pz.nx.wrap(query)
    elif jnp.issubdtype(query.dtype, jnp.floating):
      query = _wrap_vector(table, query)
  if isinstance(query, pz.nx.NamedArrayBase):
    if jnp.issubdtype(query.dtype, jnp.integer):
      ids = _check_ids(table, query)
      return _rows(table, ids), ids
    return _check_vectors(table, query), None
  if is_row(query):
    ids = pz.nx.wrap(jnp.asarray(row_id(table, query), jnp.int32))
  elif isinstance(query, (list, tuple)) and query and all(map(is_row, query)):
    found = [row_id(table, item) for item in query]
    ids = pz.nx.wrap(jnp.asarray(found, jnp.int32)).tag(QUERY_AXIS)
  else:
    raise TypeError(
      "A query must be a token, an id, a non-empty list of them, or a"
      f" NamedArray of ids or vectors; got {type(query).__name__}."
    )
  return _rows(table, ids), ids


def _wrap_vector(table: AbstractTable, vector: Any) -> pz.nx.NamedArray:
  axes = table.embedding_axes
  if tuple(vector.shape) != tuple(axes.values()):
    raise ValueError(
      f"A plain array query must have the shape of one row,"
      f" {tuple(axes.values())} for axes {axes}; got shape"
      f" {tuple(vector.shape)}. For a batch, name its axes:"
      f" `pz.nx.wrap(vectors).tag('batch', {', '.join(map(repr, axes))})`."
    )
  return pz.nx.wrap(jnp.asarray(vector)).tag(*axes)


def _check_batch_axes(
  table: AbstractTable, query: pz.nx.NamedArrayBase, kind: str
) -> None:
  if query.positional_shape:
    raise ValueError(
      f"A {kind} query must have named axes only; got positional axes of"
      f" shape {query.positional_shape} besides {dict(query.named_shape)}."
      " Name them with `.tag(...)`."
    )
  reserved = {table.vocabulary_axis, NEIGHBOR_AXIS}
  if kind == "id":
    reserved |= set(table.embedding_axes)
  clash = sorted(reserved & set(query.named_shape))
  if clash:
    raise ValueError(
      f"The {kind} query has axes {dict(query.named_shape)}; {clash} cannot"
      f" be batch axes (the vocabulary axis is {table.vocabulary_axis!r},"
      f" results add {NEIGHBOR_AXIS!r})."
    )


def _check_vectors(
  table: AbstractTable, vectors: pz.nx.NamedArrayBase
) -> pz.nx.NamedArrayBase:
  _check_batch_axes(table, vectors, "vector")
  shape = vectors.named_shape
  for name, size in table.embedding_axes.items():
    if shape.get(name) != size:
      raise ValueError(
        f"A vector query needs the table's embedding axes"
        f" {table.embedding_axes}; got axes {dict(shape)}."
      )
  if not jnp.issubdtype(vectors.dtype, jnp.floating):
    raise TypeError(f"Vector queries must be floating, got {vectors.dtype}.")
  return vectors


def _check_ids(
  table: AbstractTable, ids: pz.nx.NamedArrayBase
) -> pz.nx.NamedArrayBase:
  _check_batch_axes(table, ids, "id")
  size = table.vocab_size
  data = ids.unwrap(*ids.named_shape) if ids.named_shape else ids.unwrap()
  if not isinstance(data, jax.core.Tracer):
    values = np.asarray(data)
    if values.size and not (-size <= values.min() and values.max() < size):
      raise IndexError(
        f"Ids must be in [-{size}, {size}) for the table's {size} rows; got"
        f" values from {values.min()} to {values.max()}."
      )
  return pz.nx.nmap(lambda i: jnp.where(i < 0, i + size, i))(ids)


def _rows(
  table: AbstractTable, ids: pz.nx.NamedArrayBase
) -> pz.nx.NamedArrayBase:
  """The rows of ``ids`` (in range) as lookups read them, gathered through
  the table's row source: dequantised or merged rows of those ids only."""
  source, arrays = table.row_parts()
  names = tuple(ids.named_shape)
  raw = ids.order_as(*names).data_array if names else ids.unwrap()
  rows = _gathered(arrays, raw, source, table.rows_sharding)
  return pz.nx.wrap(rows).tag(*names, *table.embedding_axes)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _gathered(arrays, ids, source, rows_sharding):
  arrays = row_source.prepare(source, arrays, rows_sharding)
  # One axis of ids at least: a scalar index would become a dynamic slice,
  # which Explicit mesh axes refuse on a split vocabulary.
  rows = source.gather(arrays, ids.reshape(-1).astype(jnp.int32))
  return rows.reshape(*ids.shape, *rows.shape[1:])


@dataclasses.dataclass(frozen=True)
class _SearchConfig:
  """The static configuration of one search kernel (a jit cache key)."""

  source: Any
  rows_sharding: Any
  metric: str
  k: int
  vocab_size: int
  padding_index: int | None
  chunk_size: int


def search(
  table: AbstractTable,
  vectors: pz.nx.NamedArrayBase,
  query_ids: pz.nx.NamedArrayBase | None,
  excluded: list[int],
  k: int,
  metric: str,
  *,
  limit: int | None = None,
  keep_padding: bool = False,
  labels: tuple[str | int, ...] | None = None,
) -> neighbors.Neighbors:
  """Top-``k`` rows for every query vector (batched over its axes other
  than the embedding axes), best first.

  ``query_ids`` (one a query vector, or None) and ``excluded`` rows score
  ``-inf``, as do the padding row (unless ``keep_padding``) and, with
  ``limit``, every row from ``limit`` on; ``k`` must be at most the rows
  searched. ``labels`` name the queries along ``"query"`` in the result.

  >>> import numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> from named_embed._src.tools import inspection
  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1, 0], [0.9, 0.1], [0, 1]], np.float32))
  >>> query = pz.nx.wrap(np.array([1, 0], np.float32)).tag("embedding")
  >>> found = inspection.search(table, query, None, [0], 2, "cosine")
  >>> found.ids.unwrap("neighbor").tolist()
  [1, 2]
  >>> inspection.search(table, query, None, [], 1, "dot", limit=1).pairs()
  [(0, 1.0)]
  """
  source, arrays = table.row_parts()
  axes = tuple(table.embedding_axes)
  batch = tuple(n for n in vectors.named_shape if n not in axes)
  sizes = tuple(vectors.named_shape[n] for n in batch)
  count = math.prod(sizes)
  dtype = accumulation_dtype(source, vectors)
  queries = vectors.order_as(*batch, *axes).data_array
  queries = queries.reshape(count, -1).astype(dtype)
  if query_ids is None:
    ids = jnp.full((count,), -1, jnp.int32)
  else:
    ids = query_ids.order_as(*batch).data_array.reshape(count)
    ids = ids.astype(jnp.int32)
  # Sorted, padded to a power of two with -1 (never a row): a handful of
  # kernels serve every exclusion list.
  unique = sorted(set(excluded))
  width = 1 << max(len(unique) - 1, 0).bit_length()
  skip = np.full(width, -1, np.int32)
  skip[width - len(unique) :] = unique
  config = _SearchConfig(
    source=source,
    rows_sharding=table.rows_sharding,
    metric=metric,
    k=k,
    vocab_size=table.vocab_size if limit is None else limit,
    padding_index=None if keep_padding else table.padding_index,
    chunk_size=row_scan.chunk_rows(source, source.num_rows),
  )
  with jax.named_scope("named_embed.nearest"):
    best_ids, scores = _search_kernel(arrays, queries, ids, skip, config)
  best_ids = pz.nx.wrap(best_ids.reshape(*sizes, k)).tag(*batch, NEIGHBOR_AXIS)
  scores = pz.nx.wrap(scores.reshape(*sizes, k)).tag(*batch, NEIGHBOR_AXIS)
  return neighbors.Neighbors(
    best_ids,
    scores,
    vocabulary=table.vocabulary,
    metric=metric,
    queries=labels if batch == (QUERY_AXIS,) else None,
  )


@functools.partial(jax.jit, static_argnums=4)
def _search_kernel(arrays, queries, query_ids, skip, config: _SearchConfig):
  """``(ids, scores)`` ``[Q, k]`` of ``queries [Q, E]``: every device
  scores its own rows chunk by chunk (rows made by the source: dequantised
  or merged one chunk at a time, their norms too), keeps its ``k`` best,
  and the devices' candidates are merged (ties go to the lower id, as in
  `jax.lax.top_k` over all rows)."""
  source = config.source
  arrays = row_source.prepare(source, arrays, config.rows_sharding)
  dtype = queries.dtype
  if config.metric == "cosine":
    norms = jnp.sqrt(jnp.sum(queries * queries, axis=1, keepdims=True))
    queries = queries / jnp.maximum(norms, jnp.asarray(_EPS, dtype))
  squares = jnp.sum(queries * queries, axis=1, keepdims=True)
  return row_scan.over_shards(
    functools.partial(_best_of_shard, config=config),
    source,
    arrays,
    config.rows_sharding,
    queries,
    squares,
    query_ids,
    skip,
  )


def _best_of_shard(
  reader, offset, axis, queries, squares, query_ids, skip, *, config
):
  dtype = queries.dtype
  negative = jnp.full((), -jnp.inf, dtype)

  def step(scores, start, size):
    rows = reader.rows(start, size).astype(dtype)  # [size, E]
    dots = lax.dot_general(
      queries,
      rows,
      (((1,), (1,)), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=dtype,
    )  # [Q, size]
    norms = jnp.sqrt(jnp.sum(rows * rows, axis=1))[None, :]
    if config.metric == "cosine":
      dots = dots / jnp.maximum(norms, jnp.asarray(_EPS, dtype))
    elif config.metric == "euclidean":
      squared = norms * norms - 2 * dots + squares
      dots = -jnp.sqrt(jnp.maximum(squared, jnp.zeros((), dtype)))
    ids = offset + start + jnp.arange(size, dtype=jnp.int32)
    drop = ids >= config.vocab_size  # alignment rows: not tokens
    if config.padding_index is not None:
      drop = drop | (ids == config.padding_index)
    place = jnp.minimum(jnp.searchsorted(skip, ids), skip.shape[0] - 1)
    drop = drop | (skip[place] == ids)
    drop = drop[None, :] | (ids[None, :] == query_ids[:, None])
    return lax.dynamic_update_slice_in_dim(
      scores, jnp.where(drop, negative, dots), start, axis=1
    )

  num_rows = reader.num_rows
  scores = jnp.zeros((queries.shape[0], num_rows), dtype)
  scores = row_scan.fold_chunks(
    step, scores, num_rows, min(config.chunk_size, num_rows)
  )
  best, ids = lax.top_k(scores, min(config.k, num_rows))
  ids = ids.astype(jnp.int32) + offset
  if axis is not None:  # merge every device's candidates, in row order
    best = lax.all_gather(best, axis, axis=1, tiled=True)
    ids = lax.all_gather(ids, axis, axis=1, tiled=True)
    best, place = lax.top_k(best, config.k)
    ids = jnp.take_along_axis(ids, place, axis=1)
  if config.metric == "euclidean":
    best = -best
  return ids, best
