"""`TrainableRowsTable`: a frozen table of which a few rows train."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.base import validation
from named_embed._src.rows import row_chunks, row_source, table_arrays
from named_embed._src.tables import adapted, file_layout
from named_embed._src.tables.lora import frozen_base
from named_embed._src.tables.quantized import QuantizedTable
from named_embed._src.tables.table import EmbeddingTable

ROWS_AXIS = "rows"
"""The axis name of the trainable rows."""


@pz.pytree_dataclass
class TrainableRowsTable(pz.Struct, adapted.AdaptedTable):
  """A frozen table of which only the rows of a few tokens train.

  Made by `EmbeddingTable.with_trainable_rows` (HF PEFT's
  ``trainable_token_indices``): typically the rows of tokens just added
  to the vocabulary. The table holds the frozen base and one parameter
  ``{rows: k, *embedding}`` for the ``k`` chosen rows, so an optimiser's
  state is ``k x D``, not ``V x D``. Every kernel reads the chosen rows
  from the parameter and the others from the base: lookups of other ids
  return base rows, decodes give the chosen tokens' logits from the
  parameter (all other logits from the base), the fused loss does the
  same chunk by chunk, and gradients reach the parameter only. The rows
  start as the base's (dequantised, over a quantised base), so the table
  computes what the base computes until it trains.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.arange(8, dtype=np.float32).reshape(4, 2)
  ... ).with_vocabulary(ne.Vocabulary(["a", "b", "<tool>", "</tool>"]))
  >>> rows = table.with_trainable_rows(["</tool>", "<tool>"], name="embed")
  >>> rows.row_ids, rows.rows.value.named_shape
  ((2, 3), {'rows': 2, 'embedding': 2})
  >>> [p.label for p in pz.unbind_params(rows)[1]]
  ['embed.trainable_rows']

  Attributes:
    base: The frozen `EmbeddingTable` or `QuantizedTable`.
    rows: The trainable rows ``{rows: k, *embedding}`` (a `pz.Parameter`),
      in the order of ``row_ids``, in the base's float dtype.
    row_ids: The ids of those rows, sorted.
  """

  base: EmbeddingTable | QuantizedTable
  rows: Any
  row_ids: tuple[int, ...] = dataclasses.field(
    default=(), metadata={"pytree_node": False}
  )

  def __post_init__(self):
    value = table_arrays.value_or_none(self.rows)
    if value is None or not hasattr(self.base, "embedding_axes"):
      return
    ids = self.row_ids
    if list(ids) != sorted(set(ids)) or not all(
      0 <= i < self.base.vocab_size for i in ids
    ):
      raise ValueError(
        "`row_ids` must be distinct sorted ids in [0,"
        f" {self.base.vocab_size}); got {ids}."
      )
    want = {ROWS_AXIS: len(ids), **self.embedding_axes}
    if dict(value.named_shape) != want:
      raise ValueError(
        f"The trainable rows must have axes {want} for {len(ids)} row ids;"
        f" got {dict(value.named_shape)}."
      )

  @property
  def frozen(self) -> bool:
    """True when the rows do not train (a plain array)."""
    return table_arrays.is_frozen(self.rows)

  @property
  def tokens(self) -> list[str] | None:
    """The tokens of ``row_ids``, or None without a vocabulary."""
    if self.vocabulary is None:
      return None
    return [self.vocabulary.token(i) for i in self.row_ids]

  def row_parts(self) -> tuple[row_source.RowSource, tuple[jax.Array, ...]]:
    """The static row source and raw arrays kernels read."""
    base_source, base_arrays = row_source.table_parts(self.base)
    value = table_arrays.value_or_none(self.rows)
    if value is None:
      raise ValueError(
        f"TrainableRowsTable.rows is an unbound {type(self.rows).__name__}"
        f" (label {getattr(self.rows, 'label', None)!r}); bind a value"
        " first, e.g. `pz.bind_variables(model, params)`."
      )
    values = row_source.raw_in_order(value, (ROWS_AXIS, *self.embedding_axes))
    source = _source(
      base_source, self.row_ids, not table_arrays.is_frozen(self.rows)
    )
    return source, (*base_arrays, values)

  # ------------------------------------------------ file layout (contract)

  FILE_KIND = "trainable_rows"
  ADAPTER_TENSORS = ("trainable_rows",)

  def adapter_layout(self) -> file_layout.FileLayout:
    """``trainable_rows {rows, *embedding}`` with how it is held; entry
    ``row_ids``."""
    axes = (ROWS_AXIS, *self.embedding_axes)
    stored = file_layout.StoredArray(axes, self.rows, "rows_")
    return file_layout.FileLayout(
      {"trainable_rows": stored}, {"row_ids": json.dumps(self.row_ids)}
    )

  @classmethod
  def from_base_and_file(cls, base, arrays, metadata, fields, hold):
    """The table of ``base`` and a file's ``trainable_rows``, ``row_ids``."""
    rows = pz.nx.wrap(
      jnp.asarray(arrays["trainable_rows"]),
      ROWS_AXIS,
      *fields["embedding_axes"],
    )
    row_ids = tuple(int(i) for i in json.loads(metadata["row_ids"]))
    return cls(
      base=base, rows=hold(rows, "rows_", "embeddings.rows"), row_ids=row_ids
    )

  def merged(self) -> EmbeddingTable:
    """The plain table with the trained rows written in (frozen), with the
    base's vocabulary, padding row and alignment rows. Over a quantised
    base the result is a *float* table (in the base's float dtype):
    quantise it again explicitly if you want. This builds the whole table:
    kernels never call it.
    """
    source, arrays = self.row_parts()
    rows = _all_rows(arrays, source)
    return self.float_table(rows)

  def summary(self, statistics: bool = True) -> str:
    """The treescope summary line (see `named_embed.summarize`)."""
    # Deferred: rendering (tools) builds on the table kinds.
    from named_embed._src.tools import rendering

    shown = self.tokens or [f"id {i}" for i in self.row_ids]
    listed = ", ".join(map(repr, shown[:5]))
    more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    state = "frozen" if self.frozen else "trainable"
    return (
      f"{len(self.row_ids)} {state} row{'s' if len(self.row_ids) > 1 else ''}"
      f" ({listed}{more}) over"
      f" {rendering.summarize(self.base, statistics)}"
    )

  def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
    # Deferred: rendering (tools) builds on the table kinds.
    from named_embed._src.tools import rendering

    return rendering.treescope_repr(self, path, subtree_renderer)

  # ------------------------------------------- inspection (every kind alike)

  def nearest(
    self,
    query: Any,
    k: int = 10,
    metric: str = "cosine",
    exclude: Any = None,
  ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """The ``k`` nearest rows: `named_embed.nearest`, on the rows
    as lookups read them (trained rows written in), scored one chunk at a time (the float
    table is never built).

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_trainable_rows(
    ...     ["dog"], name="e")
    >>> ids, scores = table.nearest("cat", k=1)
    >>> table.vocabulary.decode(ids.unwrap("neighbor"))
    ['dog']
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.nearest(self, query, k, metric, exclude)

  def similarity(self, a: Any, b: Any, metric: str = "cosine") -> Any:
    """Similarity of two queries: `named_embed.similarity`.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_trainable_rows(
    ...     ["dog"], name="e")
    >>> round(float(table.similarity("cat", "car")), 2)
    0.0
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.similarity(self, a, b, metric)

  def analogy(
    self, positive: Any, negative: Any = (), k: int = 10
  ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """``a - b + c`` queries: `named_embed.analogy`.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_trainable_rows(
    ...     ["dog"], name="e")
    >>> ids, _ = table.analogy(["dog"], ["cat"], k=1)
    >>> table.vocabulary.decode(ids.unwrap("neighbor"))
    ['car']
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.analogy(self, positive, negative, k)

  # ------------------------------------------------------------- resizing

  def with_added_tokens(
    self,
    tokens: list[str],
    init: Any = "mean",
    *,
    key: jax.Array | None = None,
    roles: Any = None,
    pad_to_multiple: int | None = None,
  ) -> Any:
    """Returns the table with new, distinct ``tokens`` in its vocabulary, as
    `EmbeddingTable.with_added_tokens` does (its rules and arguments hold:
    alignment rows filled first, the placement kept). The base grows; the trained rows and ``row_ids`` are kept, so the new tokens are frozen base rows. To train them too, choose the trainable rows after adding the tokens (``base.with_added_tokens([...]).with_trainable_rows([...])``).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_trainable_rows(
    ...     ["dog"], name="e")
    >>> bigger = table.with_added_tokens(["<tool>"])
    >>> bigger.vocab_size, bigger.vocabulary.id("<tool>")
    (4, 3)
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.add_tokens_trainable_rows(
      self, tokens, init, key=key, roles=roles, pad_to_multiple=pad_to_multiple
    )

  def resized(
    self,
    vocab_size: int,
    init: Any = "mean",
    *,
    key: jax.Array | None = None,
    pad_to_multiple: int | None = None,
  ) -> Any:
    """Returns the table with its first ``vocab_size`` tokens, or with rows
    appended, as `EmbeddingTable.resized` does (new rows as in
    `with_added_tokens`). A shrink that would drop a trained row raises `ValueError`.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_trainable_rows(
    ...     ["dog"], name="e")
    >>> table.resized(2).vocab_size
    2
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.resize_trainable_rows(
      self, vocab_size, init, key=key, pad_to_multiple=pad_to_multiple
    )

  # ------------------------------------------- adapters do not stack

  def with_lora(self, *args: Any, **kwargs: Any) -> Any:
    """Refuses: adapters do not stack.

    Raises:
      TypeError: always. A TrainableRowsTable's adapters train over one frozen
        base; fold them in first (``table.merged().with_lora(...)``).

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table = table.with_trainable_rows([0], name="e")
    >>> table.with_lora(2, name="e", init_base_rng=jax.random.key(0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: TrainableRowsTable.with_lora: adapters do not stack...
    """
    raise TypeError(_no_stacking("with_lora", "a LoRA adapter"))

  def with_trainable_rows(self, *args: Any, **kwargs: Any) -> Any:
    """Refuses: adapters do not stack.

    Raises:
      TypeError: always; fold the adapters in first
        (``table.merged().with_trainable_rows(...)``).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table = table.with_trainable_rows([0], name="e")
    >>> table.with_trainable_rows([1], name="e")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: TrainableRowsTable.with_trainable_rows: adapters do not stack...
    """
    raise TypeError(_no_stacking("with_trainable_rows", "trainable rows"))

  def quantized(self, *args: Any, **kwargs: Any) -> Any:
    """Refuses: the table's rows are a frozen base plus trained parts.

    Raises:
      TypeError: always; fold the adapters in, then quantise
        (``table.merged().quantized(...)``).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table = table.with_trainable_rows([0], name="e")
    >>> table.quantized("int8")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: TrainableRowsTable.quantized: a TrainableRowsTable holds a frozen base and the parts that train over it...
    """
    raise TypeError(
      "TrainableRowsTable.quantized: a TrainableRowsTable holds a frozen base and the parts that"
      " train over it, so there is no one float table to quantise (and the"
      " trained parts would stop training). Fold them in first, then"
      " quantise: `table.merged().quantized(...)` (a frozen QuantizedTable);"
      " to train over a quantised base, quantise the base before adapting"
      " it: `base.quantized(...).with_lora(...)`."
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TrainableRowsSource(row_source.RowSource):
  """The row source of a `TrainableRowsTable`: a frozen base source whose
  rows ``row_ids`` (sorted) are replaced by trained ones; arrays ``(*base,
  values)`` with ``values [k, *embedding]``. Logits are the base's with
  the trained rows' columns overwritten, in a decode and in the fused loss
  alike (`TrainableRowsLossReader`)."""

  base: row_source.RowSource
  row_ids: tuple[int, ...]
  trainable_values: bool

  @property
  def num_rows(self):
    return self.base.num_rows

  @property
  def row_shape(self):
    return self.base.row_shape

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def row_aligned(self):
    return (*self.base.row_aligned, False)

  @property
  def trainable(self):
    return (*self.base.trainable, self.trainable_values)

  def _select(self, ids, base_rows, values):
    """``values[j]`` where ``ids`` is ``row_ids[j]``, else ``base_rows``."""
    chosen = jnp.asarray(self.row_ids, jnp.int32)
    # "compare_all" (no scan) also runs on ids split over Explicit mesh
    # axes; a scan costs less for many rows.
    method = "compare_all" if len(self.row_ids) <= 1024 else "scan"
    position = jnp.searchsorted(chosen, ids.astype(jnp.int32), method=method)
    position = jnp.minimum(position, len(self.row_ids) - 1)
    hit = row_source.take(chosen, position) == ids
    picked = row_source.take(values, position).astype(base_rows.dtype)
    hit = hit.reshape(hit.shape + (1,) * (base_rows.ndim - hit.ndim))
    return jnp.where(hit, picked, base_rows)

  def gather(self, arrays, ids):
    *base, values = arrays
    return self._select(ids, self.base.gather(base, ids), values)

  def rows_of(self, arrays, first_id):
    *base, values = arrays
    rows = self.base.rows_of(base, first_id)
    ids = first_id + jnp.arange(rows.shape[0], dtype=jnp.int32)
    return self._select(ids, rows, values)

  def logits(self, arrays, hidden, offset=0):
    *base, values = arrays
    z = self.base.logits(base, hidden, offset)
    own = row_chunks.contract(
      hidden, values.reshape(values.shape[0], -1)
    )  # [N, k]
    columns, _ = _local_columns(self.row_ids, offset, z.shape[1])
    return z.at[:, columns].set(own, mode="drop")

  def loss_reader(self, arrays, hidden, offset=0):
    return TrainableRowsLossReader(self, tuple(arrays), hidden, offset)


def _local_columns(row_ids, first_id, size):
  """Columns of ``row_ids`` in a chunk of ``size`` rows from global id
  ``first_id`` (``size``, dropped by a scatter, where outside), and which
  are inside."""
  local = jnp.asarray(row_ids, jnp.int32) - first_id
  inside = (local >= 0) & (local < size)
  return jnp.where(inside, local, size), inside


class TrainableRowsLossReader(row_chunks.LossReader):
  """The fused loss of a `TrainableRowsTable` at the logit level: the
  trained rows' logits ``h . values^T [N, k]`` are made once and written
  over their columns in each chunk; backwards, those columns' ``d z`` is
  gathered into ``d own [N, k]`` (and zeroed for the base), and ``d
  values`` and their share of ``d h`` are made once, after the loop."""

  def __init__(self, source, arrays: tuple, hidden, offset=0):
    *base, values = arrays
    self.source = source
    self.base = source.base.loss_reader(tuple(base), hidden, offset)
    self.hidden = hidden
    self.num_rows = self.base.num_rows
    self.offset = offset
    self.values = values
    self.values_flat = values.reshape(values.shape[0], -1)
    self.own = row_chunks.contract(hidden, self.values_flat)  # [N, k]

  def logits(self, start, size):
    z, context = self.base.logits(start, size)
    columns, inside = _local_columns(
      self.source.row_ids, self.offset + start, size
    )
    z = z.at[:, columns].set(self.own.astype(z.dtype), mode="drop")
    return z, (context, columns, inside)

  def zero_grads(self):
    return self.base.zero_grads(), jnp.zeros_like(self.own)

  def add_grads(self, carry, start, size, dz, context):
    base_carry, d_own = carry
    base_context, columns, inside = context
    picked = jnp.take(dz, jnp.minimum(columns, size - 1), axis=1)
    d_own = d_own + jnp.where(inside[None, :], picked, jnp.zeros((), dz.dtype))
    base_dz = dz.at[:, columns].set(0.0, mode="drop")
    base_carry = self.base.add_grads(
      base_carry, start, size, base_dz, base_context
    )
    return base_carry, d_own

  def grads(self, carry):
    base_carry, d_own = carry
    d_hidden, d_base = self.base.grads(base_carry)
    d_hidden = d_hidden + d_own @ self.values_flat.astype(d_own.dtype)
    d_values = None
    if self.source.trainable_values:
      d_values = jax.lax.dot_general(
        d_own, self.hidden, (((0,), (0,)), ((), ()))
      )
      d_values = d_values.reshape(self.values.shape).astype(self.values.dtype)
    return d_hidden, (*d_base, d_values)


@functools.lru_cache(maxsize=256)
def _source(base, row_ids, trainable):
  return TrainableRowsSource(base, row_ids, trainable)


@functools.partial(jax.jit, static_argnums=1)
def _all_rows(arrays, source):
  return source.rows_of(arrays, 0)


@functools.partial(jax.jit, static_argnums=2)
def _gather(arrays, ids, source):
  return source.gather(arrays, ids)


def resolve_ids(table: Any, tokens: Any) -> tuple[int, ...]:
  """Sorted row ids of ``tokens`` (token strings and/or ids).

  Raises:
    TypeError: for a string instead of a list, or an item that is neither
      a string nor an int.
    ValueError: for an empty list, a token not in the vocabulary (or any
      token string on a table without one), an id outside ``[0, V)``, or
      a row named twice.
  """
  if isinstance(tokens, (str, bytes)) or not isinstance(
    tokens, (list, tuple, np.ndarray)
  ):
    raise TypeError(
      "`tokens` must be a list of tokens or ids, e.g. ['<tool>', '</tool>'];"
      f" got {tokens!r}."
    )
  if not len(tokens):
    raise ValueError("`tokens` must name at least one row; got an empty list.")
  ids = [_row_id(table, item) for item in list(tokens)]
  repeated = sorted({i for i in ids if ids.count(i) > 1})
  if repeated:
    raise ValueError(
      f"`tokens` names rows {repeated} more than once ({list(tokens)!r})."
    )
  return tuple(sorted(ids))


def _row_id(table: Any, item: Any) -> int:
  vocab_size = table.vocab_size
  if isinstance(item, str):
    if table.vocabulary is None:
      raise ValueError(
        f"`tokens` holds the token {item!r}, but the table has no"
        " vocabulary: give row ids, or attach one with `with_vocabulary`."
      )
    if item not in table.vocabulary:
      raise ValueError(
        f"`tokens`: {item!r} is not in the vocabulary ({vocab_size} tokens)."
        " Add it first with `table.with_added_tokens([...])`."
      )
    return table.vocabulary.id(item)
  if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
    raise TypeError(
      f"`tokens` items must be token strings or int ids, got {item!r}."
    )
  if not 0 <= item < vocab_size:
    raise ValueError(
      f"`tokens`: id {int(item)} is outside [0, {vocab_size}) for a"
      f" vocabulary of {vocab_size} tokens."
    )
  return int(item)


def with_trainable_rows(
  table: EmbeddingTable | QuantizedTable, tokens: Any, *, name: str
) -> TrainableRowsTable:
  """`EmbeddingTable.with_trainable_rows`: train only ``tokens``' rows."""
  base = frozen_base(table, "with_trainable_rows")
  validation.check_name("name", name)
  axes = base.embedding_axes
  if ROWS_AXIS in axes or ROWS_AXIS == base.vocabulary_axis:
    raise ValueError(
      f"The table already has an axis named {ROWS_AXIS!r} (vocabulary axis"
      f" {base.vocabulary_axis!r}, embedding axes {axes}); the trainable"
      " rows need that name."
    )
  row_ids = resolve_ids(base, tokens)
  source, arrays = row_source.table_parts(base)
  ids = jnp.asarray(row_ids, jnp.int32)
  values = _gather(arrays, ids, source)
  return TrainableRowsTable(
    base=base,
    rows=pz.Parameter(
      value=pz.nx.wrap(values, ROWS_AXIS, *axes),
      label=f"{name}.trainable_rows",
    ),
    row_ids=row_ids,
  )


def _no_stacking(method: str, what: str) -> str:
  """The message of a TrainableRowsTable asked to take another adapter."""
  return (
    f"TrainableRowsTable.{method}: adapters do not stack. A TrainableRowsTable's trained rows"
    f" train over a frozen base, and {what} would have to train over"
    " the adapted rows, which are not a frozen table. Fold this table's"
    f" adapters in first: `table.merged().{method}(...)` (a float base;"
    " quantise it before adapting, `table.merged().quantized()."
    f"{method}(...)`, to keep a quantised base)."
  )
