"""`AdaptedTable`: what the tables over a frozen base share.

A LoRA table and a trainable-rows table adapt a frozen base table (a float
`EmbeddingTable` or a `QuantizedTable`): what such a table *is* (its axes,
vocabulary, pad token row, alignment rows, placement) is its base's, and
its merged rows make a frozen float table that is otherwise the base.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from penzai import pz

from named_embed._src.tables import file_layout
from named_embed._src.tables.contract import AbstractTable, stored_kind
from named_embed._src.tables.table import EmbeddingTable


class AdaptedTable(AbstractTable):
  """Mixin of the adapted tables (fields: ``base``): every fact of the
  table contract is the frozen ``base``'s.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((6, 4), np.float32),
  ...                                           padding_index=0)
  >>> lora = table.with_lora(rank=2, name="e", init_base_rng=jax.random.key(0))
  >>> lora.padding_index, lora.num_rows, lora.embedding_axes
  (0, 6, {'embedding': 4})
  """

  @property
  def vocabulary_axis(self) -> str:
    """The base's vocabulary axis name."""
    return self.base.vocabulary_axis

  @property
  def padding_index(self):
    """The base's pad token row, or None."""
    return self.base.padding_index

  @property
  def vocabulary(self):
    """The base's `Vocabulary`, or None."""
    return self.base.vocabulary

  @property
  def true_vocab_size(self):
    """The base's token count when it has alignment rows, else None."""
    return self.base.true_vocab_size

  @property
  def rows_sharding(self):
    """The base's recorded row sharding, or None."""
    return self.base.rows_sharding

  @property
  def vocab_size(self) -> int:
    """The number of tokens."""
    return self.base.vocab_size

  @property
  def num_rows(self) -> int:
    """The number of rows, alignment rows included."""
    return self.base.num_rows

  @property
  def embedding_axes(self) -> dict[str, int]:
    """The embedding axes and their sizes."""
    return self.base.embedding_axes

  @property
  def dtype(self) -> np.dtype:
    """The dtype of the rows as read (the base's)."""
    return np.dtype(self.base.dtype)

  def with_rows_sharding(self, rows_sharding):
    """This table with ``rows_sharding`` recorded on its base."""
    return dataclasses.replace(
      self, base=self.base.with_rows_sharding(rows_sharding)
    )

  def float_table(self, rows: jax.Array) -> EmbeddingTable:
    """A frozen float `EmbeddingTable` of ``rows`` that is otherwise the
    base (pad token row, vocabulary, alignment rows, placement)."""
    base = self.base
    value = pz.nx.wrap(rows, self.vocabulary_axis, *self.embedding_axes)
    return EmbeddingTable(
      value,
      self.vocabulary_axis,
      base.padding_index,
      vocabulary=base.vocabulary,
      true_vocab_size=base.true_vocab_size,
      rows_sharding=base.rows_sharding,
    )

  # ------------------------------------------------ file layout (contract)
  # An adapted table's file holds its base's tensors and entries, ``base``
  # naming the base's kind, then the adapter's own (`ADAPTER_TENSORS`,
  # `adapter_layout`, `from_base_and_file`).

  ADAPTER_TENSORS: tuple[str, ...] = ()

  def adapter_layout(self) -> file_layout.FileLayout:
    """The adapter's own tensors and entries (each adapted kind writes it)."""
    raise NotImplementedError(type(self).__name__)

  @classmethod
  def from_base_and_file(cls, base, arrays, metadata, fields, hold) -> Any:
    """The table of its frozen ``base`` and a file's adapter tensors."""
    raise NotImplementedError(cls.__name__)

  def file_layout(self) -> file_layout.FileLayout:
    """The base's tensors (frozen) and entries, ``base``, then the
    adapter's.

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((6, 4), np.float32))
    >>> lora = table.with_lora(rank=2, name="e", init_base_rng=jax.random.key(0))
    >>> layout = lora.file_layout()
    >>> list(layout.arrays), layout.entries["base"]
    (['embeddings', 'lora_a', 'lora_b'], 'embedding')
    """
    base = self.base.file_layout()
    arrays = {
      name: stored._replace(holder_prefix=None)
      for name, stored in base.arrays.items()
    }
    adapter = self.adapter_layout()
    arrays.update(adapter.arrays)
    entries = {**base.entries, "base": self.base.FILE_KIND, **adapter.entries}
    return file_layout.FileLayout(arrays, entries)

  @classmethod
  def _base_kind(cls, metadata: dict[str, Any], path: str) -> type:
    name = metadata.get("base")
    kind = stored_kind(name)
    if kind is None or issubclass(kind, AdaptedTable):
      bases = sorted(
        key
        for key, found in file_layout.stored_kinds(AbstractTable).items()
        if not issubclass(found, AdaptedTable)
      )
      raise file_layout.corrupt(
        path,
        cls.FILE_KIND,
        f"its metadata names the base {name!r} (known: {bases}).",
      )
    return kind

  @classmethod
  def file_tensors(cls, metadata, path) -> tuple[str, ...]:
    """The base's tensors, then `ADAPTER_TENSORS`."""
    base = cls._base_kind(metadata, path)
    return (*base.file_tensors(metadata, path), *cls.ADAPTER_TENSORS)

  @classmethod
  def from_file(cls, arrays, metadata, fields, hold, path) -> Any:
    """The base (always frozen), then the adapter (held per ``hold``)."""
    base = cls._base_kind(metadata, path).from_file(
      arrays, metadata, fields, _frozen, path
    )
    return cls.from_base_and_file(base, arrays, metadata, fields, hold)


def _frozen(value: Any, prefix: str, default_label: str) -> Any:
  """A base's arrays load frozen, whatever ``freeze`` says."""
  del prefix, default_label
  return value
