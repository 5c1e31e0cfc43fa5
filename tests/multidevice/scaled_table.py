"""A kind of table written only here: the proof that a new kind is one module.

`ScaledTable` is a frozen base table times one trainable gain a row
(``rows = gain[:, None] * base``). It is written against the table
contract only (`named_embed._src.tables.contract.AbstractTable`, through
`named_embed._src.tables.adapted.AdaptedTable` for the facts it shares with its base)
and its row source writes just the two required methods, ``gather`` and
``rows_of``: every operation (lookups of both strategies, pooled lookups,
decodes, the fused loss, inspection, sharding) then works on it with no
change anywhere in the package. Its file layout (``FILE_KIND``, the
``gain`` tensor: `named_embed._src.tables.file_layout`) is a few lines
more, and `ne.save` / `ne.load` (placed on a mesh too) then work on it.
The kinds matrix (`kinds_matrix_test.py`) runs every operation on it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.rows import row_source, table_arrays
from named_embed._src.tables import adapted, file_layout


@dataclasses.dataclass(frozen=True, eq=False)
class ScaledSource(row_source.RowSource):
  """The base's arrays plus ``gain [V]`` (row-aligned, trainable)."""

  base: row_source.RowSource
  trains: bool

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
    return (*self.base.row_aligned, True)

  @property
  def trainable(self):
    return (*self.base.trainable, self.trains)

  def _scaled(self, rows, gain):
    gain = gain.reshape(gain.shape + (1,) * (rows.ndim - gain.ndim))
    return (rows.astype(jnp.float32) * gain).astype(self.dtype)

  def gather(self, arrays, ids):
    *base, gain = arrays
    rows = self.base.gather(tuple(base), ids)
    return self._scaled(rows, row_source.take(gain, ids))

  def rows_of(self, arrays, first_id):
    *base, gain = arrays
    return self._scaled(self.base.rows_of(tuple(base), first_id), gain)


@functools.lru_cache(maxsize=64)
def _source(base, trains):
  return ScaledSource(base, trains)


@pz.pytree_dataclass
class ScaledTable(pz.Struct, adapted.AdaptedTable):
  """A frozen base whose rows are scaled by a trainable gain each.

  >>> import numpy as np, named_embed as ne
  >>> from scaled_table import ScaledTable
  >>> base = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> table = ScaledTable.over(base, name="g")
  >>> ne.lookup(table, np.array([1])).data_array.tolist()
  [[1.0, 1.0]]
  """

  base: Any
  gain: Any

  @classmethod
  def over(cls, base, *, name: str, gain=None):
    """``base`` (frozen) with gains (default ones) labelled
    ``f"{name}.gain"``."""
    base = dataclasses.replace(base, embeddings=base.value)
    if gain is None:
      gain = np.ones((base.num_rows,), np.float32)
    gain = pz.nx.wrap(jnp.asarray(gain, jnp.float32), base.vocabulary_axis)
    return cls(base=base, gain=pz.Parameter(value=gain, label=f"{name}.gain"))

  @property
  def frozen(self) -> bool:
    """True when the gains do not train."""
    return table_arrays.is_frozen(self.gain)

  def row_parts(self):
    """The table contract: the base's source and arrays plus the gains."""
    base_source, base_arrays = self.base.row_parts()
    gain = table_arrays.value_or_none(self.gain).data_array
    source = _source(base_source, not self.frozen)
    return source, (*base_arrays, gain)

  def merged(self):
    """The frozen float table of the scaled rows."""
    source, arrays = self.row_parts()
    rows = jax.jit(lambda a: source.rows_of(a, 0))(arrays)
    return self.float_table(rows)

  # The file layout: the base's tensors, then ``gain {vocabulary}``.

  FILE_KIND = "test_scaled"
  ADAPTER_TENSORS = ("gain",)

  def adapter_layout(self):
    """The gains, with how they are held."""
    gain = file_layout.StoredArray((self.vocabulary_axis,), self.gain, "gain_")
    return file_layout.FileLayout({"gain": gain}, {})

  @classmethod
  def from_base_and_file(cls, base, arrays, metadata, fields, hold):
    """The table of ``base`` and a file's ``gain``."""
    gain = pz.nx.wrap(jnp.asarray(arrays["gain"]), fields["vocabulary_axis"])
    return cls(base=base, gain=hold(gain, "gain_", "embeddings.gain"))
