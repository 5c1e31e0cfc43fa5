"""The contract every kind of table meets, and the check of a table argument.

A *kind of table* (`EmbeddingTable`, `QuantizedTable`, `LoraTable`,
`TrainableRowsTable`, and any kind added later) subclasses `AbstractTable`
and provides:

- its facts: ``vocabulary_axis``, ``embedding_axes``, ``num_rows`` (rows,
  alignment rows included), ``vocab_size`` (tokens), ``true_vocab_size``
  (tokens when there are alignment rows, else None), ``padding_index``,
  ``vocabulary``, ``rows_sharding`` (recorded by `named_embed.shard`),
  ``dtype`` (of the rows as read) and ``frozen``;
- ``row_parts()``: a static, hashable `named_embed._src.rows.row_source.RowSource`
  and the tuple of raw arrays it reads. The source is how the kind makes
  the rows of some ids, the logits of a hidden state, and the float rows
  of one vocabulary chunk; it says which arrays lead with the vocabulary
  (sliced, gathered and sharded with the rows) and which train;
- its file layout, to be saved and loaded (`named_embed._src.tables.file_layout`):
  ``FILE_KIND``, ``file_layout()``, and the class methods
  ``file_tensors(metadata, path)`` and ``from_file(...)``. A kind without
  one still runs every operation; `named_embed.save` refuses it with a
  `TypeError`.

Operations (lookups, pooled lookups, decodes, the fused loss, inspection,
exports) are written once against this contract: they never ask which
kind a table is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from penzai import pz

from named_embed._src.base import static
from named_embed._src.tables import file_layout


@dataclasses.dataclass(frozen=True, eq=False)
class StaticFacts(static.Static):
  """A table's static facts (`AbstractTable.static_facts`): equal by
  fields, hashed once (a plan cache key).

  >>> import numpy as np, named_embed as ne
  >>> ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32)
  ...     ).static_facts().embedding_axes
  (('embedding', 2),)
  """

  vocabulary_axis: str
  embedding_axes: tuple[tuple[str, int], ...]
  true_vocab_size: int | None
  padding_index: int | None
  rows_sharding: Any


class AbstractTable:
  """The contract of a kind of table (see the module docstring).

  A mixin of penzai `Struct`s: it holds no fields. ``row_parts`` is the
  only method a kind must write; the facts are its fields or properties.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tables.contract import AbstractTable
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> isinstance(table, AbstractTable), isinstance(table.quantized(),
  ...                                              AbstractTable)
  (True, True)
  >>> source, arrays = table.row_parts()
  >>> source.num_rows, [a.shape for a in arrays]
  (3, [(3, 2)])
  """

  # A plain class, not an `abc.ABC`: `check_table`'s isinstance runs on
  # every eager call, and an ABC's instance check costs ~10x more.

  def row_parts(self) -> tuple[Any, tuple]:
    """The static row source and the raw arrays its kernels read."""
    raise NotImplementedError(
      f"{type(self).__name__} must define row_parts() (the table contract)."
    )

  def static_facts(self) -> StaticFacts:
    """The facts eager calls key their per-call plans by, in one hashable
    tuple (a kind may compute it faster than property by property)."""
    return StaticFacts(
      self.vocabulary_axis,
      tuple(self.embedding_axes.items()),
      self.true_vocab_size,
      self.padding_index,
      self.rows_sharding,
    )

  def call_parts(self) -> tuple[Any, StaticFacts, tuple]:
    """``(source, facts, arrays)``: `row_parts` and `static_facts` in one
    call, the first thing every eager operation asks (a kind may answer
    faster than the two apart)."""
    source, arrays = self.row_parts()
    return source, self.static_facts(), arrays

  def with_rows_sharding(self, rows_sharding) -> Any:
    """This table with ``rows_sharding`` recorded (`named_embed.shard`
    records where the rows went; kernels pin them, and their gradients,
    there). The default replaces a ``rows_sharding`` field."""
    return dataclasses.replace(self, rows_sharding=rows_sharding)

  def most_similar(
    self,
    positive: Any = None,
    negative: Any = None,
    topn: int | None = 10,
    restrict_vocab: int | None = None,
  ) -> Any:
    """gensim's ``KeyedVectors.most_similar``: ``[(token, score), ...]``,
    best first, for the mean of the unit ``positive`` keys minus the
    ``negative`` ones (`named_embed._src.tools.similar.most_similar`).

    Every kind of table has it, on any layout.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [0.9, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"]))
    >>> [(t, round(s, 4)) for t, s in table.quantized().most_similar("cat")]
    [('dog', 0.9939), ('car', 0.0)]
    """
    # Deferred: most_similar (tools) is built on the table contract.
    from named_embed._src.tools import similar

    return similar.most_similar(self, positive, negative, topn, restrict_vocab)

  # ------------------------------------------------ files (file_layout.py)

  FILE_KIND: ClassVar[str | None] = None
  """The ``table`` entry of this kind's files; None: no file layout."""

  def file_layout(self) -> file_layout.FileLayout:
    """The tensors and metadata entries this table is saved as."""
    raise TypeError(
      f"ne.save: a {type(self).__name__} has no file layout (its kind"
      " declares no FILE_KIND and file_layout(); see the table contract in"
      " docs/architecture.md). Save the table it is made from, or give"
      " the kind a file layout."
    )

  @classmethod
  def file_tensors(cls, metadata: dict[str, Any], path: str) -> tuple:
    """The names of the tensors a file of this kind holds, by its
    metadata, the first leading with the vocabulary axis (its rows bound
    the file's vocabulary); a `ValueError` naming ``path`` for metadata of
    no such table."""
    raise TypeError(f"{cls.__name__} declares no file layout.")

  @classmethod
  def from_file(
    cls,
    arrays: dict[str, Any],
    metadata: dict[str, Any],
    fields: dict[str, Any],
    hold: file_layout.Hold,
    path: str,
  ) -> Any:
    """The table of a file's ``arrays`` (by tensor name: numpy, placed or
    abstract), its string ``metadata`` and its parsed table ``fields``
    (``vocabulary_axis``, ``embedding_axes``, ``padding_index``,
    ``vocabulary``, ``true_vocab_size``); ``hold`` holds a trainable
    array as the file or the caller says."""
    raise TypeError(f"{cls.__name__} declares no file layout.")


def stored_kind(name: Any) -> type[AbstractTable] | None:
  """The kind of table whose files say ``table: name``, or None.

  >>> import named_embed as ne
  >>> stored_kind("lora") is ne.LoraTable, stored_kind("hashed")
  (True, None)
  """
  return file_layout.stored_kinds(AbstractTable).get(name)


def _what(value: Any) -> str:
  """How a wrong argument is named in a message."""
  kind = type(value)
  if isinstance(value, pz.nx.NamedArrayBase):
    return f"a NamedArray {dict(value.named_shape)}"
  shape = getattr(value, "shape", None)
  if shape is not None and not callable(shape):
    return f"an array ({kind.__name__} of shape {tuple(shape)})"
  return f"{kind.__module__}.{kind.__qualname__}"


def _fix(value: Any) -> str:
  """What to do instead, for the usual mistakes."""
  if isinstance(value, pz.nn.EmbeddingTable):
    return (
      " This is penzai's own pz.nn.EmbeddingTable: convert it with"
      " `ne.EmbeddingTable.from_penzai(pz_table)`, which keeps its"
      " parameter (and label), or its frozen array, as they are."
    )
  inner = getattr(type(value), "__dataclass_fields__", {})
  if "table" in inner and isinstance(
    getattr(value, "table", None), pz.nn.EmbeddingTable
  ):
    return (
      f" This is penzai's {type(value).__name__} layer over its own"
      " pz.nn.EmbeddingTable: convert the table with"
      " `ne.EmbeddingTable.from_penzai(layer.table)` and use it in"
      " ne.EmbeddingLookup / ne.EmbeddingDecode."
    )
  if "table" in inner and isinstance(
    getattr(value, "table", None), AbstractTable
  ):
    return (
      f" This is a {type(value).__name__} layer: pass its table"
      " (`layer.table`) instead."
    )
  if isinstance(value, pz.nx.NamedArrayBase) or hasattr(value, "shape"):
    return (
      " Wrap the vectors first:"
      " `ne.EmbeddingTable.from_pretrained(array)` (frozen) or with"
      " `freeze=False` (trainable)."
    )
  return ""


def check_table(value: Any, caller: str, argument: str = "table") -> Any:
  """``value`` if it is a kind of table, else a `TypeError` naming what it
  got, what is wanted and, for the usual mistakes, the fix.

  Example:

  >>> import numpy as np
  >>> from named_embed._src.tables.contract import check_table
  >>> check_table(np.ones((3, 2)), "ne.lookup")
  Traceback (most recent call last):
  ...
  TypeError: ne.lookup: `table` must be a named_embed table (EmbeddingTable, QuantizedTable, LoraTable, TrainableRowsTable); got an array (ndarray of shape (3, 2)). Wrap the vectors first: `ne.EmbeddingTable.from_pretrained(array)` (frozen) or with `freeze=False` (trainable).
  """
  if isinstance(value, AbstractTable):
    return value
  raise TypeError(
    f"{caller}: `{argument}` must be a named_embed table (EmbeddingTable,"
    " QuantizedTable, LoraTable, TrainableRowsTable); got"
    f" {_what(value)}.{_fix(value)}"
  )
