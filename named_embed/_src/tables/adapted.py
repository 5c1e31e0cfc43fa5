"""`AdaptedTable`: what the tables over a frozen base share.

A LoRA table and a trainable-rows table adapt a frozen base table (a float
`EmbeddingTable` or a `QuantizedTable`): what such a table *is* (its axes,
vocabulary, pad token row, alignment rows, placement) is its base's, and
its merged rows make a frozen float table that is otherwise the base.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from penzai import pz

from named_embed._src.tables.contract import AbstractTable
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
