"""`LoraTable`: a frozen table plus trainable low-rank adapters."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from named_embed._src.base import validation
from named_embed._src.rows import row_chunks, row_source, table_arrays
from named_embed._src.tables import adapted, file_layout
from named_embed._src.tables.quantized import QuantizedTable
from named_embed._src.tables.table import EmbeddingTable

RANK_AXIS = "rank"
"""The axis name of the adapters' rank."""


@pz.pytree_dataclass
class LoraTable(pz.Struct, adapted.AdaptedTable):
  """A frozen table plus LoRA adapters: rows ``base + (alpha / rank) * A @ B``.

  Made by `EmbeddingTable.with_lora` (or `QuantizedTable.with_lora`). The
  base never trains; ``A {vocabulary, rank}`` and ``B {rank, *embedding}``
  do, and `pz.unbind_params` finds just those two. Nothing builds the
  merged table: a lookup adds ``A[ids] @ B`` to the base rows, a decode
  adds ``(hidden . B) . A^T`` to the base logits, and the fused loss adds
  ``A[chunk] @ B`` one vocabulary chunk at a time. One `LoraTable` in an
  `EmbeddingLookup` and an `EmbeddingDecode` is tied: one ``A`` and one
  ``B``, whose gradients sum both uses.

  ``A`` starts at zero and ``B`` at N(0, 1) (HF PEFT's choice for
  embeddings, the reverse of its linear layers): the delta is zero at
  first. Used by a lookup only (untied), a token's row moves only once
  that token has been looked up in training: the gradient of ``A``
  reaches only the rows read (a random ``A`` with a zero ``B``, keras's
  choice, would move every row with the first update of ``B``). Tied to
  an `EmbeddingDecode`, every row moves after one step: the decode's
  softmax gradient reaches every row of ``A``. Adapters are float32
  whatever the base dtype; rows are computed in float32 and returned in
  the base's dtype.

  `merged` folds the adapters into a plain float table.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((5, 4), np.float32))
  >>> lora = table.with_lora(rank=2, alpha=4.0, name="embed",
  ...                        init_base_rng=jax.random.key(0))
  >>> sorted(p.label for p in pz.unbind_params(lora)[1])
  ['embed.lora_a', 'embed.lora_b']
  >>> lora.merged().rows_array().tolist() == table.rows_array().tolist()
  True

  Attributes:
    base: The frozen `EmbeddingTable` or `QuantizedTable`.
    lora_a: ``A {vocabulary, rank}`` (a `pz.Parameter` when trainable).
    lora_b: ``B {rank, *embedding}``.
    alpha: The delta is scaled by ``alpha / rank``.
  """

  base: EmbeddingTable | QuantizedTable
  lora_a: Any
  lora_b: Any
  alpha: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})

  def __post_init__(self):
    validation.check_number(
      "LoraTable.alpha", self.alpha, positive=True, finite=True
    )
    a = table_arrays.value_or_none(self.lora_a)
    b = table_arrays.value_or_none(self.lora_b)
    if a is None or b is None or not hasattr(self.base, "embedding_axes"):
      return
    want_a = {self.vocabulary_axis: self.num_rows, RANK_AXIS: None}
    want_b = {RANK_AXIS: None, **self.embedding_axes}
    rank = a.named_shape.get(RANK_AXIS)
    want_a[RANK_AXIS] = want_b[RANK_AXIS] = rank
    if dict(a.named_shape) != want_a or dict(b.named_shape) != want_b:
      raise ValueError(
        f"LoRA adapters must be A {want_a} and B {want_b} for this base;"
        f" got A {dict(a.named_shape)} and B {dict(b.named_shape)}."
      )

  # -------------------------------------------------------------- properties

  @property
  def rank(self) -> int:
    """The adapters' rank."""
    return _bound(self.lora_a, "lora_a").named_shape[RANK_AXIS]

  @property
  def scale(self) -> float:
    """``alpha / rank``, the factor of ``A @ B``."""
    return self.alpha / self.rank

  @property
  def frozen(self) -> bool:
    """True when neither adapter trains (both plain arrays)."""
    return table_arrays.is_frozen(self.lora_a) and table_arrays.is_frozen(
      self.lora_b
    )

  # ----------------------------------------------------------------- methods

  def row_parts(self) -> tuple[row_source.RowSource, tuple[jax.Array, ...]]:
    """The static row source and raw arrays kernels read."""
    base_source, base_arrays = row_source.table_parts(self.base)
    a = _bound(self.lora_a, "lora_a")
    b = _bound(self.lora_b, "lora_b")
    a = row_source.raw_in_order(a, (self.vocabulary_axis, RANK_AXIS))
    b = row_source.raw_in_order(b, (RANK_AXIS, *self.embedding_axes))
    source = _source(
      base_source,
      self.alpha / a.shape[1],
      not table_arrays.is_frozen(self.lora_a),
      not table_arrays.is_frozen(self.lora_b),
    )
    return source, (*base_arrays, a, b)

  # ------------------------------------------------ file layout (contract)

  FILE_KIND = "lora"
  ADAPTER_TENSORS = ("lora_a", "lora_b")

  def adapter_layout(self) -> file_layout.FileLayout:
    """``lora_a {vocabulary, rank}`` and ``lora_b {rank, *embedding}``,
    each with how it is held; entry ``alpha``."""
    axes = tuple(self.embedding_axes)
    arrays = {
      "lora_a": file_layout.StoredArray(
        (self.vocabulary_axis, RANK_AXIS), self.lora_a, "lora_a_"
      ),
      "lora_b": file_layout.StoredArray(
        (RANK_AXIS, *axes), self.lora_b, "lora_b_"
      ),
    }
    return file_layout.FileLayout(arrays, {"alpha": json.dumps(self.alpha)})

  @classmethod
  def from_base_and_file(cls, base, arrays, metadata, fields, hold):
    """The table of ``base`` and a file's ``lora_a``, ``lora_b``, ``alpha``."""
    a = pz.nx.wrap(
      jnp.asarray(arrays["lora_a"]), fields["vocabulary_axis"], RANK_AXIS
    )
    b = pz.nx.wrap(
      jnp.asarray(arrays["lora_b"]), RANK_AXIS, *fields["embedding_axes"]
    )
    return cls(
      base=base,
      lora_a=hold(a, "lora_a_", "embeddings.lora_a"),
      lora_b=hold(b, "lora_b_", "embeddings.lora_b"),
      alpha=float(json.loads(metadata["alpha"])),
    )

  def merged(self) -> EmbeddingTable:
    """The plain table ``base + (alpha / rank) * A @ B`` (frozen), with the
    base's vocabulary, padding row and alignment rows. Over a quantised
    base the result is a *float* table in the base's float dtype: quantise
    it again explicitly (``lora.merged().quantized("int8")``) if you want.
    This builds the whole table: kernels never call it.
    """
    source, arrays = self.row_parts()
    rows = _all_rows(arrays, source)
    return self.float_table(rows)

  def summary(self, statistics: bool = True) -> str:
    """The treescope summary line (see `named_embed.summarize`)."""
    # Deferred: rendering (tools) builds on the table kinds.
    from named_embed._src.tools import rendering

    a = table_arrays.value_or_none(self.lora_a)
    if a is None:
      head = f"LoRA alpha {self.alpha:g} (unbound adapters)"
    else:
      rank = a.named_shape[RANK_AXIS]
      head = (
        f"LoRA rank {rank}, alpha {self.alpha:g} (scale {self.alpha / rank:g})"
      )
    state = "frozen" if self.frozen else "trainable"
    return f"{head}, {state} adapters, over {rendering.summarize(self.base, statistics)}"

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
    as lookups read them (adapters added), scored one chunk at a time (the float
    table is never built).

    Example:

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_lora(
    ...     1, name="e", init_base_rng=jax.random.key(0))
    >>> ids, scores = table.nearest("cat", k=1)
    >>> table.vocabulary.decode(ids.unwrap("neighbor"))
    ['dog']
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.nearest(self, query, k, metric, exclude)

  def similarity(self, a: Any, b: Any, metric: str = "cosine") -> Any:
    """Similarity of two queries: `named_embed.similarity`.

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_lora(
    ...     1, name="e", init_base_rng=jax.random.key(0))
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

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_lora(
    ...     1, name="e", init_base_rng=jax.random.key(0))
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
    alignment rows filled first, the placement kept). The base grows (a quantised base quantises its new rows); ``A`` gets zero rows for the new tokens (so their rows read as the base's new rows), ``B`` and the parameter labels are kept.

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_lora(
    ...     1, name="e", init_base_rng=jax.random.key(0))
    >>> bigger = table.with_added_tokens(["<tool>"])
    >>> bigger.vocab_size, bigger.vocabulary.id("<tool>")
    (4, 3)
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.add_tokens_lora(
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

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"])).with_lora(
    ...     1, name="e", init_base_rng=jax.random.key(0))
    >>> table.resized(2).vocab_size
    2
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.resize_lora(
      self, vocab_size, init, key=key, pad_to_multiple=pad_to_multiple
    )

  # ------------------------------------------- adapters do not stack

  def with_lora(self, *args: Any, **kwargs: Any) -> Any:
    """Refuses: adapters do not stack.

    Raises:
      TypeError: always. A LoraTable's adapters train over one frozen
        base; fold them in first (``table.merged().with_lora(...)``).

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table = table.with_lora(1, name="e", init_base_rng=jax.random.key(0))
    >>> table.with_lora(2, name="e", init_base_rng=jax.random.key(0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: LoraTable.with_lora: adapters do not stack...
    """
    raise TypeError(_no_stacking("with_lora", "a LoRA adapter"))

  def with_trainable_rows(self, *args: Any, **kwargs: Any) -> Any:
    """Refuses: adapters do not stack.

    Raises:
      TypeError: always; fold the adapters in first
        (``table.merged().with_trainable_rows(...)``).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table = table.with_lora(1, name="e", init_base_rng=jax.random.key(0))
    >>> table.with_trainable_rows([1], name="e")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: LoraTable.with_trainable_rows: adapters do not stack...
    """
    raise TypeError(_no_stacking("with_trainable_rows", "trainable rows"))

  def quantized(self, *args: Any, **kwargs: Any) -> Any:
    """Refuses: the table's rows are a frozen base plus trained parts.

    Raises:
      TypeError: always; fold the adapters in, then quantise
        (``table.merged().quantized(...)``).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table = table.with_lora(1, name="e", init_base_rng=jax.random.key(0))
    >>> table.quantized("int8")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: LoraTable.quantized: a LoraTable holds a frozen base and the parts that train over it...
    """
    raise TypeError(
      "LoraTable.quantized: a LoraTable holds a frozen base and the parts that"
      " train over it, so there is no one float table to quantise (and the"
      " trained parts would stop training). Fold them in first, then"
      " quantise: `table.merged().quantized(...)` (a frozen QuantizedTable);"
      " to train over a quantised base, quantise the base before adapting"
      " it: `base.quantized(...).with_lora(...)`."
    )


def _bound(holder: Any, field: str) -> pz.nx.NamedArray:
  value = table_arrays.value_or_none(holder)
  if value is None:
    raise ValueError(
      f"LoraTable.{field} is an unbound {type(holder).__name__} (label"
      f" {getattr(holder, 'label', None)!r}); bind a value first, e.g."
      " `pz.bind_variables(model, params)`."
    )
  return value


@dataclasses.dataclass(frozen=True, eq=False)
class LoraSource(row_source.RowSource):
  """The row source of a `LoraTable`: a frozen base source plus ``scale * A
  @ B``; arrays ``(*base, A, B)`` with ``A [V, rank]`` (row-aligned) and
  ``B [rank, *embedding]``. Rows are the base's plus ``A[ids] @ B``; logits
  the base's plus ``(hidden . B^T) . A^T``, in a decode and in the fused
  loss alike (`LoraLossReader`): the merged rows never exist."""

  base: row_source.RowSource
  scale: float
  trainable_a: bool
  trainable_b: bool

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
    return (*self.base.row_aligned, True, False)

  @property
  def trainable(self):
    return (*self.base.trainable, self.trainable_a, self.trainable_b)

  def _delta(self, a_rows, b):
    """``scale * a_rows @ B`` in float32, ``[*lead, *row_shape]``."""
    flat_b = b.reshape(b.shape[0], -1).astype(jnp.float32)
    delta = jnp.einsum("...r,re->...e", a_rows.astype(jnp.float32), flat_b)
    delta = delta * jnp.float32(self.scale)
    return delta.reshape(*a_rows.shape[:-1], *self.row_shape)

  def gather(self, arrays, ids):
    *base, a, b = arrays
    rows = self.base.gather(base, ids).astype(jnp.float32)
    return (rows + self._delta(row_source.take(a, ids), b)).astype(self.dtype)

  def rows_of(self, arrays, first_id):
    *base, a, b = arrays
    rows = self.base.rows_of(base, first_id).astype(jnp.float32)
    return (rows + self._delta(a, b)).astype(self.dtype)

  def logits(self, arrays, hidden, offset=0):
    *base, a, b = arrays
    z = self.base.logits(base, hidden, offset)
    hb = row_chunks.contract(hidden, b.reshape(b.shape[0], -1))  # [N, rank]
    low_rank = row_chunks.contract(hb, a) * jnp.asarray(
      self.scale, hidden.dtype
    )
    return z + low_rank

  def loss_reader(self, arrays, hidden, offset=0):
    return LoraLossReader(self, tuple(arrays), hidden, offset)


class LoraLossReader(row_chunks.LossReader):
  """The fused loss of a `LoraTable` at the logit level: ``z = z_base +
  scale * (h . B^T) . A[chunk]^T``. Backwards, ``d A[chunk] = scale *
  dz^T . (h . B^T)`` and ``d (h . B^T) += scale * dz . A[chunk]`` per
  chunk; ``d B`` and ``B``'s share of ``d h`` once, after the loop."""

  def __init__(self, source: LoraSource, arrays: tuple, hidden, offset=0):
    *base, a, b = arrays
    self.source = source
    self.base = source.base.loss_reader(tuple(base), hidden, offset)
    self.hidden = hidden
    self.num_rows = self.base.num_rows
    self.a = a
    self.b = b
    self.b_flat = b.reshape(b.shape[0], -1)
    self.hb = row_chunks.contract(hidden, self.b_flat)  # [N, rank]

  def logits(self, start, size):
    z, context = self.base.logits(start, size)
    a_chunk = jax.lax.dynamic_slice_in_dim(self.a, start, size, axis=0)
    scale = jnp.asarray(self.source.scale, z.dtype)
    z = z + scale * row_chunks.contract(self.hb, a_chunk)
    return z, (context, a_chunk)

  def zero_grads(self):
    d_a = jnp.zeros_like(self.a) if self.source.trainable_a else None
    return self.base.zero_grads(), d_a, jnp.zeros_like(self.hb)

  def add_grads(self, carry, start, size, dz, context):
    base_carry, d_a, d_hb = carry
    base_context, a_chunk = context
    base_carry = self.base.add_grads(base_carry, start, size, dz, base_context)
    scaled = dz * jnp.asarray(self.source.scale, dz.dtype)
    if d_a is not None:
      d_chunk = jax.lax.dot_general(scaled, self.hb, (((0,), (0,)), ((), ())))
      d_a = jax.lax.dynamic_update_slice_in_dim(
        d_a, d_chunk.astype(d_a.dtype), start, axis=0
      )
    d_hb = d_hb + scaled @ a_chunk.astype(dz.dtype)
    return base_carry, d_a, d_hb

  def grads(self, carry):
    base_carry, d_a, d_hb = carry
    d_hidden, d_base = self.base.grads(base_carry)
    d_hidden = d_hidden + d_hb @ self.b_flat.astype(d_hb.dtype)
    d_b = None
    if self.source.trainable_b:
      d_b = jax.lax.dot_general(d_hb, self.hidden, (((0,), (0,)), ((), ())))
      d_b = d_b.reshape(self.b.shape).astype(self.b.dtype)
    return d_hidden, (*d_base, d_a, d_b)


@functools.lru_cache(maxsize=256)
def _source(base, scale, trainable_a, trainable_b):
  return LoraSource(base, scale, trainable_a, trainable_b)


@functools.partial(jax.jit, static_argnums=1)
def _all_rows(arrays, source):
  return source.rows_of(arrays, 0)


def frozen_base(table: Any, caller: str) -> EmbeddingTable | QuantizedTable:
  """``table`` as the frozen base of an adapter: a float `EmbeddingTable`
  (its array taken out of any `pz.Parameter`) or a `QuantizedTable`.

  Raises:
    TypeError: for anything else (an adapted table: merge it first).
  """
  if isinstance(table, QuantizedTable):
    return table
  if isinstance(table, EmbeddingTable):
    if table.frozen:
      return table
    return dataclasses.replace(table, embeddings=table.value)
  hint = ""
  if hasattr(table, "merged"):
    hint = f" Fold its adapters in first: `table.merged().{caller}(...)`."
  raise TypeError(
    f"{caller}(): `table` must be an EmbeddingTable or a QuantizedTable, got"
    f" {type(table).__name__}.{hint}"
  )


def with_lora(
  table: EmbeddingTable | QuantizedTable,
  rank: int,
  alpha: float | None = None,
  *,
  name: str,
  init_base_rng: jax.Array,
) -> LoraTable:
  """`EmbeddingTable.with_lora`: a frozen base plus LoRA adapters.

  Raises:
    TypeError: for a ``table`` that is neither an `EmbeddingTable` nor a
      `QuantizedTable` (a `LoraTable` or `TrainableRowsTable`, with the
      hint to merge it first; a raw array), a ``rank`` that is not an int
      (a float or a bool), an ``alpha`` that is not a number, a ``name``
      that is not a string, or an ``init_base_rng`` that is not a JAX
      random key (JAX raises it for a JAX array that is not key data).
    ValueError: for ``rank < 1``, an ``alpha`` that is NaN, infinite or not
      positive, an empty ``name``, a table with an axis already named
      ``"rank"`` (vocabulary or embedding axis), or an unbound trainable
      table (a `pz.ParameterSlot`: bind its value first).
  """
  base = frozen_base(table, "with_lora")
  rank = validation.check_positive_int("rank", rank)
  alpha = (
    float(rank)
    if alpha is None
    else validation.check_number("alpha", alpha, positive=True, finite=True)
  )
  validation.check_name("name", name)
  if not isinstance(init_base_rng, jax.Array):
    raise TypeError(
      "`init_base_rng` must be a JAX random key, e.g. jax.random.key(0);"
      f" got {type(init_base_rng).__name__}."
    )
  axes = base.embedding_axes
  if RANK_AXIS in axes or RANK_AXIS == base.vocabulary_axis:
    raise ValueError(
      f"The table already has an axis named {RANK_AXIS!r} (vocabulary axis"
      f" {base.vocabulary_axis!r}, embedding axes {axes}); LoRA needs that"
      " name for the adapters' rank."
    )
  label_b = f"{name}.lora_b"
  key_b = pz.nn.derive_param_key(init_base_rng, label_b)
  a = jnp.zeros((base.num_rows, rank), jnp.float32)
  b = jax.random.normal(key_b, (rank, *axes.values()), jnp.float32)
  return LoraTable(
    base=base,
    lora_a=pz.Parameter(
      value=pz.nx.wrap(a, base.vocabulary_axis, RANK_AXIS),
      label=f"{name}.lora_a",
    ),
    lora_b=pz.Parameter(value=pz.nx.wrap(b, RANK_AXIS, *axes), label=label_b),
    alpha=alpha,
  )


def _no_stacking(method: str, what: str) -> str:
  """The message of a LoraTable asked to take another adapter."""
  return (
    f"LoraTable.{method}: adapters do not stack. A LoraTable's adapters A and B"
    f" train over a frozen base, and {what} would have to train over"
    " the adapted rows, which are not a frozen table. Fold this table's"
    f" adapters in first: `table.merged().{method}(...)` (a float base;"
    " quantise it before adapting, `table.merged().quantized()."
    f"{method}(...)`, to keep a quantised base)."
  )
