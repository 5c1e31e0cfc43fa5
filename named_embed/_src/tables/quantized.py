"""`QuantizedTable`: a frozen table stored as int8 or int4 codes + scales."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.base import quantization, validation
from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.rows import row_chunks, row_source, table_arrays
from named_embed._src.tables import file_layout
from named_embed._src.tables.contract import AbstractTable
from named_embed._src.tables.table import EmbeddingTable


@pz.pytree_dataclass
class QuantizedTable(pz.Struct, AbstractTable):
  """An embedding table stored as symmetric integer codes and float scales.

  Made by `EmbeddingTable.quantized`. Each group of values (a whole row,
  or ``group_size`` values along the last embedding axis) is stored as
  integers ``q`` in ``[-q_max, q_max]`` and one float32 scale
  ``s = max|x| / q_max`` (``q_max`` is 127 for ``"int8"``, 7 for
  ``"int4"``), and reads back as ``s * q``: an error of at most ``s / 2``
  a value. ``"int4"`` packs two values a byte along the last embedding
  axis.

  Use it wherever a plain table goes (`EmbeddingLookup`, `EmbeddingDecode`,
  `decode_cross_entropy`, tied in both layers, `named_embed.shard`,
  `named_embed.save` / `load`). No call builds the float table: lookups
  gather codes and scales and dequantise the gathered rows only; decodes
  and the fused loss dequantise one chunk of rows at a time. The table is
  frozen (no parameters); add `with_lora` or `with_trainable_rows` to
  fine-tune over it. `dequantized` returns the float table.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[1.0, -0.5], [0.25, 0.0]], np.float32))
  >>> q8 = table.quantized("int8")
  >>> q8.nbytes  # 2 x 2 int8 codes + 2 float32 scales
  12
  >>> np.asarray(q8.dequantized().rows_array()).round(3).tolist()
  [[1.0, -0.5], [0.25, 0.0]]

  Attributes:
    codes: int8 codes ``{vocabulary, *embedding}``; for int4, uint8 bytes
      with the last embedding axis at half its size (two values a byte:
      byte ``j`` holds value ``j`` in its low nibble and value
      ``j + size / 2`` in its high nibble).
    scales: float32 scales ``{vocabulary}`` (one a row), or ``{vocabulary,
      *other embedding axes, last axis: its size / group_size}``.
    scheme: ``"int8"`` or ``"int4"``.
    group_size: Values a scale along the last embedding axis, or None for
      one scale a row.
    embedding_shape: The embedding axes and their sizes, as
      ``((name, size), ...)``.
    dtype: The float dtype rows read back in (the original table's).
    vocabulary_axis: As for `EmbeddingTable`.
    padding_index: As for `EmbeddingTable`.
    vocabulary: As for `EmbeddingTable`.
    true_vocab_size: As for `EmbeddingTable`.
    rows_sharding: As for `EmbeddingTable`: the sharding of ``codes``.
  """

  codes: pz.nx.NamedArray
  scales: pz.nx.NamedArray
  scheme: str = dataclasses.field(
    default="int8", metadata={"pytree_node": False}
  )
  group_size: int | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  embedding_shape: tuple[tuple[str, int], ...] = dataclasses.field(
    default=(), metadata={"pytree_node": False}
  )
  dtype: np.dtype = dataclasses.field(
    default=np.dtype("float32"), metadata={"pytree_node": False}
  )
  vocabulary_axis: str = dataclasses.field(
    default="vocabulary", metadata={"pytree_node": False}
  )
  padding_index: int | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  vocabulary: Vocabulary | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  true_vocab_size: int | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )
  rows_sharding: jax.sharding.NamedSharding | None = dataclasses.field(
    default=None, metadata={"pytree_node": False}
  )

  def __post_init__(self):
    validation.check_choice("scheme", self.scheme, tuple(quantization.SCHEMES))
    codes = self.codes
    if not isinstance(codes, pz.nx.NamedArrayBase):
      return
    num_rows = codes.named_shape.get(self.vocabulary_axis)
    if num_rows is None:
      raise ValueError(
        f"QuantizedTable.codes has axes {dict(codes.named_shape)}, without"
        f" the vocabulary axis {self.vocabulary_axis!r}."
      )
    vocab_size = num_rows
    if self.true_vocab_size is not None:
      validation.check_positive_int("true_vocab_size", self.true_vocab_size)
      if self.true_vocab_size > num_rows:
        raise ValueError(
          f"`true_vocab_size` {self.true_vocab_size} exceeds the"
          f" {num_rows} rows of the table."
        )
      vocab_size = self.true_vocab_size
    padding_index = validation.resolve_padding_index(
      self.padding_index, vocab_size
    )
    object.__setattr__(self, "padding_index", padding_index)
    if self.vocabulary is not None:
      table_arrays.check_vocabulary(self.vocabulary, vocab_size, padding_index)

  # -------------------------------------------------------------- properties

  @property
  def bits(self) -> int:
    """Bits a value: 8 or 4."""
    return quantization.SCHEMES[self.scheme]

  @property
  def embedding_axes(self) -> dict[str, int]:
    """Names and sizes of the embedding axes (of the rows read back)."""
    return dict(self.embedding_shape)

  @property
  def num_rows(self) -> int:
    """The number of rows, alignment rows included."""
    return self.codes.named_shape[self.vocabulary_axis]

  @property
  def vocab_size(self) -> int:
    """The number of tokens (rows, less any alignment rows)."""
    return self.true_vocab_size or self.num_rows

  @property
  def frozen(self) -> bool:
    """Always True: integer codes do not train."""
    return True

  @property
  def nbytes(self) -> int:
    """Bytes the stored table takes: codes and scales."""
    return int(self.codes.data_array.nbytes + self.scales.data_array.nbytes)

  # ----------------------------------------------------------------- methods

  def row_parts(self) -> tuple[row_source.RowSource, tuple[jax.Array, ...]]:
    """The static row source and raw arrays kernels read (vocabulary
    first)."""
    codes = row_source.raw_in_order(self.codes, self._codes_axes())
    scales = row_source.raw_in_order(self.scales, self._scales_axes())
    source = _source(
      self.num_rows,
      tuple(size for _, size in self.embedding_shape),
      self.dtype,
      self.bits,
      self.group_size,
    )
    return source, (codes, scales)

  def dequantized(self) -> EmbeddingTable:
    """The float table ``s * q`` (frozen, in `dtype`), with this table's
    vocabulary, padding row and alignment rows. This builds the whole float
    table: kernels never call it.

    >>> import numpy as np, named_embed as ne
    >>> q = ne.EmbeddingTable.from_pretrained(np.eye(2, dtype=np.float32)
    ...     ).quantized("int4")
    >>> q.dequantized().rows_array().tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    source, (codes, scales) = self.row_parts()
    rows = _dequantize_all(codes, scales, source)
    value = pz.nx.wrap(rows, self.vocabulary_axis, *self.embedding_axes)
    return EmbeddingTable(
      value,
      self.vocabulary_axis,
      self.padding_index,
      vocabulary=self.vocabulary,
      true_vocab_size=self.true_vocab_size,
      rows_sharding=self.rows_sharding,
    )

  def quantized(self, scheme: str = "int8", group_size: int | None = None):
    """Refuses: the table is quantised already.

    Raises:
      TypeError: always; re-quantise the float table instead:
        ``table.dequantized().quantized(...)``.
    """
    raise TypeError(
      f"This table is already quantised ({self.scheme}); quantising it"
      f" again to {scheme!r} would compound the rounding. Start from a float"
      f" table: `table.dequantized().quantized({scheme!r})`."
    )

  def with_lora(
    self,
    rank: int,
    alpha: float | None = None,
    *,
    name: str,
    init_base_rng: jax.Array,
  ) -> Any:
    """LoRA adapters over this quantised table (`named_embed._src.tables.lora`)."""
    # Deferred: the LoRA kind is built on this module.
    from named_embed._src.tables import lora

    return lora.with_lora(
      self, rank, alpha, name=name, init_base_rng=init_base_rng
    )

  def with_trainable_rows(self, tokens: list[str | int], *, name: str) -> Any:
    """Train ``tokens``' rows only (`named_embed._src.tables.trainable_rows`)."""
    # Deferred: the trainable-rows kind is built on this module.
    from named_embed._src.tables import trainable_rows

    return trainable_rows.with_trainable_rows(self, tokens, name=name)

  def summary(self, statistics: bool = True) -> str:
    """The treescope summary line (see `named_embed.summarize`)."""
    del statistics  # norms would need the float table
    shape = " × ".join(f"{n}:{s}" for n, s in self.embedding_shape)
    groups = (
      "a float32 scale a row"
      if self.group_size is None
      else f"a float32 scale per {self.group_size} values"
    )
    padding = "no padding row"
    if self.padding_index is not None:
      padding = f"padding row {self.padding_index}"
      if self.vocabulary is not None:
        padding += f" {self.vocabulary.token(self.padding_index)!r}"
    if self.true_vocab_size is not None:
      extra = self.num_rows - self.true_vocab_size
      rows = "alignment row" if extra == 1 else "alignment rows"
      padding += f", {self.true_vocab_size} tokens + {extra} {rows}"
    return (
      f"{self.vocabulary_axis}:{self.num_rows} × {shape} {self.scheme}"
      f" ({groups}) read as {np.dtype(self.dtype).name},"
      f" {self.nbytes:,} bytes ({self.nbytes / self.num_rows:.4g} a row),"
      f" {padding}"
    )

  def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
    # Deferred: rendering (tools) builds on the table kinds.
    from named_embed._src.tools import rendering

    return rendering.treescope_repr(self, path, subtree_renderer)

  # ----------------------------------------------------------------- helpers

  def _codes_axes(self) -> tuple[str, ...]:
    return (self.vocabulary_axis, *self.embedding_axes)

  def _scales_axes(self) -> tuple[str, ...]:
    if self.group_size is None:
      return (self.vocabulary_axis,)
    return self._codes_axes()

  # ------------------------------------------------ file layout (contract)

  FILE_KIND = "quantized"

  def file_layout(self) -> file_layout.FileLayout:
    """``codes`` (int8, or uint8 two values a byte) and ``scales``
    (float32), always frozen; entries ``scheme``, ``group_size``,
    ``embedding_sizes``, ``dtype`` (of the rows as read) and ``base:
    quantized`` (a quantised table is its own base).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
    >>> layout = table.quantized("int4", 2).file_layout()
    >>> {k: s.axes for k, s in layout.arrays.items()}
    {'codes': ('vocabulary', 'embedding'), 'scales': ('vocabulary', 'embedding')}
    >>> layout.entries["group_size"], layout.entries["dtype"]
    ('2', 'float32')
    """
    arrays = {
      "codes": file_layout.StoredArray(self._codes_axes(), self.codes, None),
      "scales": file_layout.StoredArray(self._scales_axes(), self.scales, None),
    }
    entries = {
      "base": "quantized",
      "scheme": self.scheme,
      "group_size": json.dumps(self.group_size),
      "embedding_sizes": json.dumps(list(self.embedding_axes.values())),
      "dtype": np.dtype(self.dtype).name,
    }
    return file_layout.FileLayout(arrays, entries)

  @classmethod
  def file_tensors(cls, metadata, path) -> tuple[str, ...]:
    """``("codes", "scales")``; a `ValueError` if the file names another
    base."""
    base = metadata.get("base")
    if base != "quantized":
      raise file_layout.corrupt(
        path,
        metadata.get("table"),
        f"its metadata names the base {base!r} where a quantized table's"
        " codes and scales are 'quantized'.",
      )
    return ("codes", "scales")

  @classmethod
  def from_file(cls, arrays, metadata, fields, hold, path) -> QuantizedTable:
    """The table of a file's ``codes`` and ``scales``, checked against the
    recorded scheme, group size and embedding sizes (see
    `AbstractTable.from_file`)."""
    axis, axes = fields["vocabulary_axis"], fields["embedding_axes"]
    sizes = json.loads(metadata["embedding_sizes"])
    group_size = json.loads(metadata["group_size"])
    codes = jnp.asarray(arrays["codes"])
    scales = jnp.asarray(arrays["scales"])
    scales_axes = (axis,) if group_size is None else (axis, *axes)
    table = cls(
      codes=pz.nx.wrap(codes, axis, *axes),
      scales=pz.nx.wrap(scales, *scales_axes),
      scheme=metadata["scheme"],
      group_size=group_size,
      embedding_shape=tuple(zip(axes, sizes, strict=True)),
      dtype=np.dtype(metadata["dtype"]),
      vocabulary_axis=axis,
      padding_index=fields["padding_index"],
      vocabulary=fields["vocabulary"],
      true_vocab_size=fields["true_vocab_size"],
    )
    _check_stored(table, codes, scales)
    return table

  # ------------------------------------------- inspection (every kind alike)

  def nearest(
    self,
    query: Any,
    k: int = 10,
    metric: str = "cosine",
    exclude: Any = None,
  ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """The ``k`` nearest rows: `named_embed.nearest`, on the rows
    as lookups read them (dequantised), scored one chunk at a time (the float
    table is never built).

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).quantized()
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
    ...     ne.Vocabulary(["cat", "dog", "car"])).quantized()
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
    ...     ne.Vocabulary(["cat", "dog", "car"])).quantized()
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
    alignment rows filled first, the placement kept). Old codes and scales are kept bit for bit; new rows are made in float by ``init`` (``"mean"`` and ``"normal"`` from the dequantised token rows, read chunk by chunk in float32) and quantised with the table's scheme and group size.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).quantized()
    >>> bigger = table.with_added_tokens(["<tool>"])
    >>> bigger.vocab_size, bigger.vocabulary.id("<tool>")
    (4, 3)
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.add_tokens_quantized(
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
    `with_added_tokens`).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).quantized()
    >>> table.resized(2).vocab_size
    2
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.resize_quantized(
      self, vocab_size, init, key=key, pad_to_multiple=pad_to_multiple
    )


DECODE_CHUNK_BYTES = 8 * 2**20
"""A quantised decode dequantises chunks of rows of about this many bytes."""


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedSource(row_source.RowSource):
  """The row source of a `QuantizedTable`: integer codes and float32
  scales (`named_embed._src.base.quantization`), both row-aligned, neither trains.
  Rows are dequantised where they are read: the gathered rows of a
  lookup, one chunk of rows at a time in a decode or the fused loss."""

  num_rows: int
  row_shape: tuple[int, ...]
  dtype: np.dtype
  bits: int
  group_size: int | None

  row_aligned = (True, True)
  trainable = (False, False)

  def _dequantize(self, codes, scales):
    return quantization.dequantize(
      codes, scales, self.bits, self.group_size, self.dtype
    )

  def gather(self, arrays, ids):
    codes, scales = arrays
    return self._dequantize(
      row_source.take(codes, ids), row_source.take(scales, ids)
    )

  def rows_of(self, arrays, first_id):
    del first_id
    return self._dequantize(*arrays)

  def logits(self, arrays, hidden, offset=0):
    del offset
    row_bytes = math.prod(self.row_shape) * 4
    chunk = max(
      256, 2 ** int(math.log2(max(DECODE_CHUNK_BYTES // row_bytes, 1)))
    )
    return row_chunks.chunked_logits(hidden, tuple(arrays), self, chunk)


def _check_stored(table: QuantizedTable, codes, scales) -> None:
  """Raises ValueError if a file's codes and scales do not fit the layout
  its metadata record."""
  sizes = list(table.embedding_axes.values())
  rows = codes.shape[0]
  packed = [*sizes[:-1], sizes[-1] // (2 if table.bits == 4 else 1)]
  want_codes = (rows, *packed)
  if table.group_size is None:
    want_scales = (rows,)
  else:
    want_scales = (rows, *sizes[:-1], sizes[-1] // table.group_size)
  dtype = np.uint8 if table.bits == 4 else np.int8
  if codes.shape != want_codes or codes.dtype != dtype:
    raise ValueError(
      f"codes {codes.dtype}{list(codes.shape)} do not fit"
      f" {table.scheme} rows of sizes {sizes} (expected {np.dtype(dtype)}"
      f"{list(want_codes)})."
    )
  if scales.shape != want_scales or scales.dtype != np.float32:
    raise ValueError(
      f"scales {scales.dtype}{list(scales.shape)} do not fit (expected"
      f" float32{list(want_scales)})."
    )


@functools.lru_cache(maxsize=256)
def _source(num_rows, row_shape, dtype, bits, group_size):
  return QuantizedSource(num_rows, row_shape, np.dtype(dtype), bits, group_size)


@functools.partial(jax.jit, static_argnums=2)
def _dequantize_all(codes, scales, source):
  return quantization.dequantize(
    codes, scales, source.bits, source.group_size, source.dtype
  )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_rows(rows, bits, group_size):
  return quantization.quantize(rows, bits, group_size)


def quantize(
  table: EmbeddingTable, scheme: str = "int8", group_size: int | None = None
) -> QuantizedTable:
  """The `QuantizedTable` of a float table: `EmbeddingTable.quantized`.

  Raises:
    TypeError: if ``table`` is not an `EmbeddingTable` (a `QuantizedTable`;
      a `LoraTable` or `TrainableRowsTable`, with the hint to merge it
      first; a raw array), for a ``scheme`` that is not a string, or a
      ``group_size`` that is not an int (a float or a bool).
    ValueError: for a ``scheme`` other than ``"int8"`` and ``"int4"``,
      ``group_size < 1``, a ``group_size`` that does not divide the last
      embedding axis, an odd last embedding axis under ``"int4"``, NaN or
      infinite values (naming their rows; checked on concrete values
      only, not under `jax.jit`), or an unbound table (a
      `pz.ParameterSlot`: bind its value first).
  """
  if not isinstance(table, EmbeddingTable):
    hint = ""
    if hasattr(table, "merged"):
      hint = " Fold its adapters in first: `table.merged().quantized(...)`."
    raise TypeError(
      "quantized(): `table` must be a float EmbeddingTable, got"
      f" {type(table).__name__}.{hint}"
    )
  scheme = validation.check_choice(
    "scheme", scheme, tuple(quantization.SCHEMES)
  )
  bits = quantization.SCHEMES[scheme]
  group_size = validation.check_optional_positive_int("group_size", group_size)
  rows, axes = table.rows_and_axes()
  if not jnp.issubdtype(rows.dtype, jnp.floating):
    raise TypeError(
      f"quantized(): `table` must hold floats, got dtype {rows.dtype}."
    )
  last, size = list(axes.items())[-1]
  if group_size is not None and size % group_size:
    raise ValueError(
      f"`group_size` {group_size} does not divide the size {size} of the"
      f" last embedding axis {last!r} (embedding axes {axes}); groups run"
      " along that axis."
    )
  if bits == 4 and size % 2:
    raise ValueError(
      f"int4 packs two values a byte along the last embedding axis {last!r},"
      f' whose size {size} is odd (embedding axes {axes}). Use "int8".'
    )
  quantization.check_finite(rows)
  codes, scales = _quantize_rows(rows, bits, group_size)
  names = (table.vocabulary_axis, *axes)
  scale_names = names if group_size is not None else names[:1]
  return QuantizedTable(
    codes=pz.nx.wrap(codes, *names),
    scales=pz.nx.wrap(scales, *scale_names),
    scheme=scheme,
    group_size=group_size,
    embedding_shape=tuple(axes.items()),
    dtype=np.dtype(rows.dtype),
    vocabulary_axis=table.vocabulary_axis,
    padding_index=table.padding_index,
    vocabulary=table.vocabulary,
    true_vocab_size=table.true_vocab_size,
    rows_sharding=table.rows_sharding,
  )
