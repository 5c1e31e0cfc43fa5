"""`EmbeddingTable`: the named-axis array of embedding vectors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.base import norms, validation
from named_embed._src.base.initializers import default_initializer, initialize
from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.rows import row_source, table_arrays
from named_embed._src.tables import file_layout
from named_embed._src.tables.contract import AbstractTable, StaticFacts

if TYPE_CHECKING:
  from named_embed._src.tools.inspection import Query

EmbeddingsLike = pz.Parameter | pz.ParameterValue | pz.nx.NamedArray


@pz.pytree_dataclass
class EmbeddingTable(pz.Struct, AbstractTable):
  """A table of embedding vectors, one row per token of a vocabulary.

  The table holds a `NamedArray` with one *vocabulary* axis and one or more
  *embedding* axes (``{"embedding": 64}``, or ``{"heads": 4, "head_dim": 16}``).
  It has no ``__call__``: wrap it in an `EmbeddingLookup` to turn token ids
  into vectors, or in an `EmbeddingDecode` to turn vectors into token logits.
  Keeping the parameters in a separate object is what makes weight tying
  explicit: pass the *same* table to both layers and the model holds one
  parameter, which `pz.unbind_params` finds once and whose gradient is the
  sum of both uses.

  What ``embeddings`` holds decides how the table trains:

  - a `pz.Parameter` (``from_config``, or ``from_pretrained(freeze=False)``):
    trainable, found by `pz.unbind_params`;
  - a `pz.ParameterValue`: what a `Parameter` becomes after
    `pz.freeze_params` or `pz.bind_variables` of frozen values; trainable
    through `jax.grad` of the values;
  - a plain `NamedArray` (``from_pretrained``, the default): *frozen*.
    Optimisers and `pz.unbind_params` never see it, and lookups and decodes
    stop its gradient.

  Example:

  >>> import jax, named_embed as ne
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=10,
  ...     embedding_axes={"embedding": 4})
  >>> table.vocab_size, table.embedding_axes, table.frozen
  (10, {'embedding': 4}, False)

  Attributes:
    embeddings: The embedding array (see above), with named axes only.
    vocabulary_axis: Name of the axis indexed by token ids.
    padding_index: Row of the padding token, or None. A lookup returns this
      row as stored and sends it no gradient (torch's ``padding_idx``).
    vocabulary: The token strings of the rows (a `Vocabulary`), or None.
      Static metadata: attaching it changes no pytree leaf, and its hash is
      computed once, so jitted calls cost the same.
    true_vocab_size: The number of real tokens when the table has extra
      alignment rows at the end (see `padded_to_multiple`), else None. Ids at
      or beyond it are out of range, decodes give those rows ``-inf``
      logits, and the loss never sees them.
    rows_sharding: The `NamedSharding` of the ``[vocabulary, *embedding]``
      rows, recorded by `named_embed.shard`, or None. It tells the fused
      loss how the vocabulary is split over a mesh with `Auto` axes (with
      `Explicit` axes the arrays' types say it already).
  """

  embeddings: EmbeddingsLike
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
    if not isinstance(self.vocabulary_axis, str) or not self.vocabulary_axis:
      raise TypeError(
        "EmbeddingTable: `vocabulary_axis` must be a non-empty string, got"
        f" {self.vocabulary_axis!r}."
      )
    value = table_arrays.value_or_none(self.embeddings)
    if value is not None and hasattr(value, "named_shape"):
      table_arrays.check_table_array(value, self.vocabulary_axis)
      vocab_size = value.named_shape[self.vocabulary_axis]
      if self.true_vocab_size is not None:
        validation.check_positive_int("true_vocab_size", self.true_vocab_size)
        if self.true_vocab_size > vocab_size:
          raise ValueError(
            f"`true_vocab_size` {self.true_vocab_size} exceeds the"
            f" {vocab_size} rows of the table."
          )
        vocab_size = self.true_vocab_size
      object.__setattr__(
        self,
        "padding_index",
        validation.resolve_padding_index(self.padding_index, vocab_size),
      )
      if self.vocabulary is not None:
        if not isinstance(self.vocabulary, Vocabulary):
          raise TypeError(
            "`vocabulary` must be a named_embed.Vocabulary, got"
            f" {type(self.vocabulary).__name__}."
          )
        table_arrays.check_vocabulary(
          self.vocabulary, vocab_size, self.padding_index
        )

  # ---------------------------------------------------------------- builders

  @classmethod
  def from_config(
    cls,
    name: str,
    init_base_rng: jax.Array | None,
    vocab_size: int,
    embedding_axes: Mapping[str, int],
    vocabulary_axis: str = "vocabulary",
    initializer: Callable[..., Any] = default_initializer,
    dtype: jax.typing.DTypeLike = jnp.float32,
    padding_index: int | None = None,
    pad_to_multiple: int | None = None,
  ) -> EmbeddingTable:
    """Builds a trainable table from hyperparameters.

    Args:
      name: Label of the parameter; the parameter is called
        ``f"{name}.embeddings"``, as in penzai.
      init_base_rng: Base random key. The parameter's key is derived from it
        and the label (`pz.nn.derive_param_key`). None gives an unfilled
        `pz.ParameterSlot`, to be bound later.
      vocab_size: Number of rows, a positive integer.
      embedding_axes: Names and sizes of the embedding axes.
      vocabulary_axis: Name of the vocabulary axis; must not be one of
        ``embedding_axes``.
      initializer: A penzai initializer (keyword arguments ``input_axes``,
        ``output_axes``, ``parallel_axes``, ``convolution_spatial_axes``,
        ``dtype``), or a ``jax.nn.initializers`` function ``(key, shape,
        dtype)`` called with shape ``(vocab_size, *embedding sizes)``. The
        default draws from a normal distribution with standard deviation
        ``1/sqrt(prod(embedding sizes))``, like penzai's ``EmbeddingTable``.
      dtype: A floating storage dtype.
      padding_index: Row to zero at initialisation and keep out of lookup
        gradients; negative values count from the end.
      pad_to_multiple: If set, append zero rows up to a multiple of this
        (see `padded_to_multiple`), e.g. to shard the vocabulary axis.

    Returns:
      A table whose ``embeddings`` is a `pz.Parameter` (vocabulary axis first).

    Raises:
      ValueError: for non-positive sizes, a vocabulary axis inside
        ``embedding_axes``, or ``padding_index`` outside ``[-V, V)``.
      TypeError: for a non-floating dtype.

    Example:

    >>> import jax, named_embed as ne
    >>> table = ne.EmbeddingTable.from_config(
    ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=5,
    ...     embedding_axes={"heads": 2, "head_dim": 3}, padding_index=0)
    >>> table.value.named_shape
    {'vocabulary': 5, 'heads': 2, 'head_dim': 3}
    >>> float(abs(table.value.untag("vocabulary", "heads", "head_dim")
    ...           .unwrap()[0]).sum())
    0.0
    """
    embedding_axes = validation.check_embedding_axes(
      embedding_axes, vocabulary_axis
    )
    validation.check_positive_int("vocab_size", vocab_size)
    dtype = validation.check_float_dtype("dtype", dtype)
    padding_index = validation.resolve_padding_index(padding_index, vocab_size)
    label = f"{name}.embeddings"
    if pad_to_multiple is not None:
      validation.check_positive_int("pad_to_multiple", pad_to_multiple)
    if init_base_rng is None:
      true_size = None
      if pad_to_multiple and vocab_size % pad_to_multiple:
        true_size = vocab_size
      return cls(
        pz.ParameterSlot(label),
        vocabulary_axis,
        padding_index,
        true_vocab_size=true_size,
      )
    key = pz.nn.derive_param_key(init_base_rng, label)
    value = initialize(
      initializer, key, vocabulary_axis, vocab_size, embedding_axes, dtype
    )
    if padding_index is not None:
      value = pz.nx.nmap(
        lambda v: v.at[padding_index].set(jnp.zeros((), v.dtype))
      )(value.untag(vocabulary_axis)).tag(vocabulary_axis)
      value = value.order_as(vocabulary_axis, *embedding_axes)
    table = cls(
      pz.Parameter(value=value, label=label), vocabulary_axis, padding_index
    )
    if pad_to_multiple is not None:
      table = table.padded_to_multiple(pad_to_multiple)
    return table

  @classmethod
  def from_pretrained(
    cls,
    embeddings: pz.nx.NamedArray | jax.typing.ArrayLike,
    vocabulary_axis: str = "vocabulary",
    embedding_axes: tuple[str, ...] | list[str] | str | None = None,
    name: str = "embeddings",
    padding_index: int | None = None,
    freeze: bool = True,
  ) -> EmbeddingTable:
    """Builds a table around existing vectors; frozen by default, as in torch.

    Args:
      embeddings: A `NamedArray` with the vocabulary axis and only named
        axes, or a numpy/jax array whose first axis is the vocabulary.
      vocabulary_axis: Name of the vocabulary axis.
      embedding_axes: Names for the non-vocabulary axes of a plain array
        (default ``("embedding",)``, which fits a 2-D array). For a
        `NamedArray`, if given, it must list exactly its embedding axes.
      name: Label prefix of the parameter when ``freeze=False``.
      padding_index: Padding row (kept as given, never zeroed); negative
        values count from the end.
      freeze: If True, the table holds a plain `NamedArray` and receives no
        gradients; if False, a `pz.Parameter` labelled ``f"{name}.embeddings"``.

    Returns:
      A new table. A jax array is stored as given (no copy, no cast); a
      numpy array is moved to the default device (float64 becomes float32
      unless ``jax_enable_x64`` is set, as everywhere in JAX).

    Raises:
      ValueError: for a 1-D array, axis names that do not fit the array, or
        ``padding_index`` outside ``[-V, V)``.
      TypeError: for a non-floating array.

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(
    ...     np.arange(6.0, dtype=np.float32).reshape(3, 2), padding_index=-1)
    >>> table.padding_index, table.frozen, table.embedding_axes
    (2, True, {'embedding': 2})
    """
    value = table_arrays.as_table_array(
      embeddings, vocabulary_axis, embedding_axes
    )
    padding_index = validation.resolve_padding_index(
      padding_index, value.named_shape[vocabulary_axis]
    )
    if not freeze:
      value = pz.Parameter(value=value, label=f"{name}.embeddings")
    return cls(value, vocabulary_axis, padding_index)

  @classmethod
  def from_penzai(
    cls,
    pz_table: pz.nn.EmbeddingTable,
    *,
    vocabulary: Any = None,
    padding_index: int | None = None,
  ) -> EmbeddingTable:
    """Converts penzai's own ``pz.nn.EmbeddingTable``, keeping what it holds.

    A `pz.Parameter` stays the same parameter (object, label and value),
    a `pz.ParameterValue` stays one, a plain `NamedArray` stays frozen and
    a `pz.ParameterSlot` unbound; the vocabulary axis name and the
    embedding axes are kept. See
    `named_embed._src.files.converters.from_penzai`.

    Args:
      pz_table: The penzai table (e.g. ``lookup_layer.table``).
      vocabulary: A `Vocabulary`, a path to ``vocab.txt`` /
        ``tokenizer.json``, or None.
      padding_index: The pad token's row, or None.

    Example:

    >>> import jax, named_embed as ne
    >>> from penzai import pz
    >>> pz_table = pz.nn.EmbeddingTable.from_config(
    ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=5,
    ...     embedding_axes={"embedding": 3})
    >>> table = ne.EmbeddingTable.from_penzai(pz_table)
    >>> table.embeddings.label, table.frozen, table.embedding_axes
    ('embed.embeddings', False, {'embedding': 3})
    """
    # Deferred: the converters (files) build on this module.
    from named_embed._src.files import converters

    return converters.from_penzai(
      pz_table, vocabulary=vocabulary, padding_index=padding_index
    )

  def to_penzai(self) -> pz.nn.EmbeddingTable:
    """Penzai's ``pz.nn.EmbeddingTable`` holding this table's array, as it
    holds it (the same `pz.Parameter`, value, frozen array or slot).

    Penzai's table has no pad row, vocabulary or recorded sharding: they
    are not carried. A table with alignment rows is refused (`ValueError`).
    See `named_embed._src.files.converters.to_penzai`.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32),
    ...                                           freeze=False)
    >>> pz_table = table.to_penzai()
    >>> type(pz_table).__module__, pz_table.embeddings.label
    ('penzai.nn.embeddings', 'embeddings.embeddings')
    """
    # Deferred: the converters (files) build on this module.
    from named_embed._src.files import converters

    return converters.to_penzai(self)

  # -------------------------------------------------------------- properties

  @property
  def value(self) -> pz.nx.NamedArray:
    """The embedding `NamedArray`, whatever holds it.

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32)
    ...     ).value.named_shape
    {'vocabulary': 4, 'embedding': 2}
    """
    value = table_arrays.value_or_none(self.embeddings)
    if value is None:
      raise ValueError(
        "EmbeddingTable.embeddings is an unbound"
        f" {type(self.embeddings).__name__} (label"
        f" {getattr(self.embeddings, 'label', None)!r}); bind a value first,"
        " e.g. `pz.bind_variables(model, params)`."
      )
    return value

  @property
  def frozen(self) -> bool:
    """True when the table holds a plain `NamedArray` (no gradients).

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32),
    ...                                   freeze=False).frozen
    False
    """
    return table_arrays.is_frozen(self.embeddings)

  @property
  def vocab_size(self) -> int:
    """The number of tokens (rows, less any alignment rows).

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32)).vocab_size
    4
    """
    if self.true_vocab_size is not None:
      return self.true_vocab_size
    return self.num_rows

  @property
  def num_rows(self) -> int:
    """The number of rows, alignment rows included.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((5, 2), np.float32))
    >>> table.padded_to_multiple(4).num_rows
    8
    """
    return self.value.named_shape[self.vocabulary_axis]

  @property
  def embedding_axes(self) -> dict[str, int]:
    """Names and sizes of the embedding axes, in storage order.

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((4, 2, 3), np.float32),
    ...     embedding_axes=("heads", "head_dim")).embedding_axes
    {'heads': 2, 'head_dim': 3}
    """
    value = self.embeddings  # a frozen table's value: the eager hot path
    if type(value) is not pz.nx.NamedArray:
      value = self.value
    if type(value) is pz.nx.NamedArray:
      axes = iter(value.named_axes.items())
      first, _ = next(axes)
      if first == self.vocabulary_axis:  # stored vocabulary first
        return dict(axes)
    return {
      name: size
      for name, size in value.named_shape.items()
      if name != self.vocabulary_axis
    }

  @property
  def dtype(self) -> np.dtype:
    """The storage dtype.

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float16)).dtype
    dtype('float16')
    """
    return np.dtype(self.value.dtype)

  # ----------------------------------------------------------------- methods

  def rows_array(self) -> jax.Array:
    """The raw ``[vocabulary, *embedding]`` array (no transpose if stored so).

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32)
    ...     ).rows_array().shape
    (4, 2)
    """
    return self.rows_and_axes()[0]

  def row_parts(self) -> tuple[row_source.RowSource, tuple[jax.Array]]:
    """The table contract (`named_embed._src.tables.contract.AbstractTable`): a
    `DenseSource` (trainable unless frozen) and the raw rows.

    >>> import numpy as np, named_embed as ne
    >>> source, (rows,) = ne.EmbeddingTable.from_pretrained(
    ...     np.ones((4, 2), np.float32)).row_parts()
    >>> source.num_rows, source.trainable, rows.shape
    (4, (False,), (4, 2))
    """
    value, frozen = table_arrays.value_and_frozen(self.embeddings)
    if (
      type(value) is pz.nx.NamedArray
      and self.true_vocab_size is None
      and next(iter(value.named_axes)) == self.vocabulary_axis
    ):  # stored vocabulary first: no transpose, no check (the eager hot path)
      rows = value.data_array
    else:
      rows = self.rows_array()
    source = row_source.dense_source(rows.shape, rows.dtype, not frozen)
    return source, (rows,)

  def static_facts(self) -> StaticFacts:
    """The table contract's static facts, read straight off a stored
    value that leads with the vocabulary (the eager hot path).

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32)
    ...     ).static_facts().vocabulary_axis
    'vocabulary'
    """
    value = self.embeddings
    if type(value) is not pz.nx.NamedArray:
      value = table_arrays.value_or_none(value)
    if type(value) is pz.nx.NamedArray:
      axes = tuple(value.named_axes.items())
      if axes[0][0] == self.vocabulary_axis:
        return StaticFacts(
          self.vocabulary_axis,
          axes[1:],
          self.true_vocab_size,
          self.padding_index,
          self.rows_sharding,
        )
    return super().static_facts()

  def call_parts(self) -> tuple[row_source.RowSource, StaticFacts, tuple]:
    """`AbstractTable.call_parts`. A frozen table's source and facts are
    worked out once and kept on the table (its value never changes: a
    frozen dataclass holding an immutable `NamedArray`); a trainable
    table's are read afresh, as its parameter's value may be replaced.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> source, facts, (rows,) = table.call_parts()
    >>> source.num_rows, facts.embedding_axes, rows.shape
    (3, (('embedding', 2),), (3, 2))
    """
    kept = self.__dict__.get("_call_parts")
    if kept is not None:
      return kept
    source, arrays = self.row_parts()
    parts = (source, self.static_facts(), arrays)
    if type(self.embeddings) is pz.nx.NamedArray:
      object.__setattr__(self, "_call_parts", parts)
    return parts

  # ------------------------------------------------ file layout (contract)

  FILE_KIND = "embedding"
  """A plain table's files name no kind; ``embedding`` names it as the
  base of an adapted table's file."""

  def file_layout(self) -> file_layout.FileLayout:
    """One tensor, ``embeddings``, held as the table holds it.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> table.file_layout().arrays["embeddings"].axes
    ('vocabulary', 'embedding')
    """
    axes = (self.vocabulary_axis, *self.embedding_axes)
    stored = file_layout.StoredArray(axes, self.embeddings, "")
    return file_layout.FileLayout({"embeddings": stored}, {})

  @classmethod
  def file_tensors(cls, metadata, path) -> tuple[str, ...]:
    """``("embeddings",)``."""
    return ("embeddings",)

  @classmethod
  def from_file(cls, arrays, metadata, fields, hold, path) -> EmbeddingTable:
    """The table of a file's ``embeddings`` (see `AbstractTable.from_file`)."""
    axis = fields["vocabulary_axis"]
    value = pz.nx.wrap(
      jnp.asarray(arrays["embeddings"]), axis, *fields["embedding_axes"]
    )
    return cls(
      hold(value, "", "embeddings.embeddings"),
      axis,
      padding_index=fields["padding_index"],
      vocabulary=fields["vocabulary"],
      true_vocab_size=fields["true_vocab_size"],
    )

  def token_rows(self) -> jax.Array:
    """The ``[vocab_size, *embedding]`` rows of real tokens (alignment rows
    left out; no copy when there are none).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((5, 2), np.float32))
    >>> table.padded_to_multiple(4).token_rows().shape
    (5, 2)
    """
    rows = self.rows_array()
    if self.true_vocab_size is None:
      return rows
    return rows[: self.true_vocab_size]

  def rows_and_axes(self) -> tuple[jax.Array, dict[str, int]]:
    """`rows_array` and `embedding_axes` together, reading the value once.

    >>> import numpy as np, named_embed as ne
    >>> rows, axes = ne.EmbeddingTable.from_pretrained(
    ...     np.ones((4, 2), np.float32)).rows_and_axes()
    >>> rows.shape, axes
    ((4, 2), {'embedding': 2})
    """
    value = self.value
    vocabulary_axis = self.vocabulary_axis
    true_size = self.true_vocab_size
    table_arrays.check_bound_rows(true_size, value.named_shape[vocabulary_axis])
    if isinstance(value, pz.nx.NamedArray):
      named_axes = value.named_axes
      if next(iter(named_axes)) == vocabulary_axis:
        axes = dict(named_axes)
        del axes[vocabulary_axis]
        return value.data_array, axes
    axes = {
      name: size
      for name, size in value.named_shape.items()
      if name != vocabulary_axis
    }
    return value.untag(vocabulary_axis, *axes).unwrap(), axes

  def padded_to_multiple(self, multiple: int) -> EmbeddingTable:
    """Returns the table with zero rows appended up to a multiple of rows.

    Sharding the vocabulary axis over ``M`` devices needs a row count that
    ``M`` divides. The alignment rows are not tokens: ``vocab_size`` stays,
    ids of alignment rows are out of range under every policy, decodes
    give them ``-inf`` logits (so softmax and loss ignore them), and they
    receive no gradient. A trainable table gets a new `pz.Parameter` with
    the same label.

    Args:
      multiple: A positive int, e.g. the mesh axis size (or 128 times it).

    Returns:
      A new table (this one if no alignment rows are needed).

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((5, 2), np.float32))
    >>> padded = table.padded_to_multiple(4)
    >>> padded.num_rows, padded.vocab_size, padded.true_vocab_size
    (8, 5, 5)
    """
    multiple = validation.check_positive_int("multiple", multiple)
    rows = self.rows_array()
    extra = -rows.shape[0] % multiple
    if not extra:
      return self
    padded = jnp.concatenate(
      [rows, jnp.zeros((extra, *rows.shape[1:]), rows.dtype)], axis=0
    )
    value = pz.nx.wrap(padded, self.vocabulary_axis, *self.embedding_axes)
    return dataclasses.replace(
      self,
      embeddings=table_arrays.held_like(self.embeddings, value),
      true_vocab_size=self.vocab_size,
    )

  def with_vocabulary(self, vocabulary: Vocabulary | None) -> EmbeddingTable:
    """Returns this table with ``vocabulary`` attached (or detached: None).

    The vocabulary's ``pad`` role sets ``padding_index`` when the table has
    none; when both are set they must agree.

    Raises:
      ValueError: if the vocabulary's length is not the table's vocab size,
        or its pad row differs from ``padding_index``.

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
    >>> vocab = ne.Vocabulary(["<pad>", "a", "b"], pad="<pad>")
    >>> table = table.with_vocabulary(vocab)
    >>> table.padding_index, table.vocabulary.token(2)
    (0, 'b')
    """
    padding_index = self.padding_index
    if vocabulary is not None:
      if not isinstance(vocabulary, Vocabulary):
        raise TypeError(
          f"`vocabulary` must be a named_embed.Vocabulary, got"
          f" {type(vocabulary).__name__}."
        )
      if padding_index is None:
        padding_index = vocabulary.pad_id
      table_arrays.check_vocabulary(vocabulary, self.vocab_size, padding_index)
    return dataclasses.replace(
      self, vocabulary=vocabulary, padding_index=padding_index
    )

  def with_added_tokens(
    self,
    tokens: list[str],
    init: Any = "mean",
    *,
    key: jax.Array | None = None,
    roles: Mapping[str, str] | None = None,
    pad_to_multiple: int | None = None,
  ) -> EmbeddingTable:
    """Returns the table with new, distinct ``tokens`` in its vocabulary.

    New ids follow the old ones; old rows are kept bit for bit; alignment
    rows are filled first (and initialised), and rows are added only to
    keep the multiple (`named_embed._src.tools.resizing.row_multiple`). The holder
    (parameter label, frozen array) and sharding are kept; put the result
    in a model with `named_embed.replace_table`.

    Args:
      tokens: The new token strings.
      init: ``"mean"`` (float32 mean of the token rows, pad row left out:
        each new token's probability is then at most 1/V), ``"zeros"``,
        ``"normal"`` (N(0, s^2), s the std of the token rows' entries), an
        initializer ``(key, shape, dtype)`` or penzai's, or the new rows.
      key: Random key for ``"normal"`` and initializers.
      roles: Roles to set, e.g. ``{"pad": "<pad>"}`` (sets padding_index).
      pad_to_multiple: Keep the row count a multiple of this instead.

    Raises:
      ValueError: for a table without a vocabulary (use `resized`), or a
        token already in it or repeated (named in the message).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(
    ...     np.array([[0, 0], [1, 2], [3, 4]], np.float32), padding_index=0
    ... ).with_vocabulary(ne.Vocabulary(["<pad>", "a", "b"]))
    >>> bigger = table.with_added_tokens(["<tool>", "</tool>"])
    >>> bigger.vocabulary.encode(["<tool>"]), bigger.rows_array()[3].tolist()
    ([3], [2.0, 3.0])
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.add_tokens(
      self, tokens, init, key=key, roles=roles, pad_to_multiple=pad_to_multiple
    )

  def resized(
    self,
    vocab_size: int,
    init: Any = "mean",
    *,
    key: jax.Array | None = None,
    pad_to_multiple: int | None = None,
  ) -> EmbeddingTable:
    """Returns the table with its first ``vocab_size`` tokens, or with rows
    appended (initialised as in `with_added_tokens`, whose rules hold).

    The size counts tokens, never alignment rows. Raises `ValueError` if
    shrinking would drop the pad row or a special token (named), or if a
    table with a vocabulary would grow (use `with_added_tokens`).

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((6, 2), np.float32))
    >>> table.resized(4).vocab_size, table.resized(9, "zeros").vocab_size
    (4, 9)
    """
    # Deferred: resizing (tools) builds on the table kinds.
    from named_embed._src.tools import resizing

    return resizing.resize(
      self, vocab_size, init, key=key, pad_to_multiple=pad_to_multiple
    )

  def renormalized(
    self, max_norm: float, norm_type: float = 2.0
  ) -> EmbeddingTable:
    """Returns a table whose rows have p-norm at most ``max_norm``.

    Rows with norm above ``max_norm`` are scaled by
    ``max_norm / (norm + 1e-7)``, as torch's in-place renorm does to the
    rows a lookup touches, but for every row and without mutation. The
    result is a table of the same kind: a trainable table gets a new
    `pz.Parameter` with the same label, meant to replace the old table.

    Args:
      max_norm: Non-negative bound on the row norm.
      norm_type: The p of the p-norm over all embedding axes (any float,
        ``inf`` included).

    Returns:
      A new `EmbeddingTable`.

    Example:

    >>> import numpy as np, named_embed as ne
    >>> t = ne.EmbeddingTable.from_pretrained(
    ...     np.array([[3.0, 4.0], [0.3, 0.4]], np.float32))
    >>> np.round(np.asarray(t.renormalized(1.0).rows_array()), 4).tolist()
    [[0.6, 0.8], [0.3, 0.4]]
    """
    max_norm = validation.check_number("max_norm", max_norm, minimum=0.0)
    _, norm_type = validation.check_renorm(None, norm_type)
    rows = self.rows_array()
    new_rows = norms.renorm_rows(rows, max_norm, norm_type)
    value = pz.nx.wrap(new_rows, self.vocabulary_axis, *self.embedding_axes)
    return dataclasses.replace(
      self, embeddings=table_arrays.held_like(self.embeddings, value)
    )

  # ------------------------------------------------- compressed and adapted

  def quantized(self, scheme: str = "int8", group_size: int | None = None):
    """Returns the table stored as integers: a frozen `QuantizedTable`.

    Symmetric quantisation: each group (a row, or ``group_size`` values
    along the last embedding axis) gets one float32 scale ``max|x| /
    q_max`` and integer codes in ``[-q_max, q_max]``; ``"int8"`` keeps a
    byte a value, ``"int4"`` two values a byte. Lookups, decodes and the
    fused loss on the result never build the float table. See
    ``docs/compression.md`` for the layouts, sizes and accuracy.

    Args:
      scheme: ``"int8"`` or ``"int4"``.
      group_size: Values a scale along the last embedding axis (it must
        divide that axis), or None for one scale a row.

    Raises:
      TypeError: for a ``scheme`` that is not a string, or a
        ``group_size`` that is not an int (a float or a bool).
      ValueError: for a ``scheme`` other than ``"int8"`` and ``"int4"``,
        ``group_size < 1``, a ``group_size`` that does not divide the last
        embedding axis, an odd last embedding axis under ``"int4"``, NaN or
        infinite values (naming their rows; checked on concrete values
        only, not under `jax.jit`), or an unbound table (a
        `pz.ParameterSlot`: bind its value first).

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 64), np.float32))
    >>> q4 = table.quantized("int4", group_size=32)
    >>> q4.nbytes  # 4 x 32 bytes of codes + 4 x 2 float32 scales
    160
    """
    # Deferred: the quantised kind is built on this module.
    from named_embed._src.tables import quantized

    return quantized.quantize(self, scheme, group_size)

  def with_lora(
    self,
    rank: int,
    alpha: float | None = None,
    *,
    name: str,
    init_base_rng: jax.Array,
  ):
    """Returns this table, frozen, plus trainable LoRA adapters: a `LoraTable`
    with rows ``base + (alpha / rank) * A @ B``, ``A {vocabulary, rank}``
    zero at first and ``B {rank, *embedding}`` normal.

    Args:
      rank: The adapters' rank, at least 1.
      alpha: Scale numerator (default ``rank``: a scale of 1).
      name: Label prefix: parameters ``f"{name}.lora_a"`` and
        ``f"{name}.lora_b"``.
      init_base_rng: Random key for ``B``.

    Raises:
      TypeError: for a ``rank`` that is not an int (a float or a bool), an
        ``alpha`` that is not a number, a ``name`` that is not a string, or
        an ``init_base_rng`` that is not a JAX random key (JAX raises it
        for a JAX array that is not key data).
      ValueError: for ``rank < 1``, an ``alpha`` that is NaN, infinite or
        not positive, an empty ``name``, a table with an axis already
        named ``"rank"`` (vocabulary or embedding axis), or an unbound
        trainable table (a `pz.ParameterSlot`: bind its value first).

    Example:

    >>> import jax, numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((6, 4), np.float32))
    >>> lora = table.with_lora(rank=2, alpha=4.0, name="embed",
    ...                        init_base_rng=jax.random.key(0))
    >>> lora.rank, lora.scale, lora.lora_a.value.named_shape
    (2, 2.0, {'vocabulary': 6, 'rank': 2})
    """
    # Deferred: the LoRA kind is built on this module.
    from named_embed._src.tables import lora

    return lora.with_lora(
      self, rank, alpha, name=name, init_base_rng=init_base_rng
    )

  def with_trainable_rows(self, tokens: list[str | int], *, name: str):
    """Returns this table, frozen, of which only the rows of ``tokens`` train:
    a `TrainableRowsTable` with one parameter ``{rows: k, *embedding}``
    labelled ``f"{name}.trainable_rows"``, starting at those rows.

    Args:
      tokens: Token strings (looked up in the vocabulary) and/or row ids.
      name: Label prefix of the parameter.

    Raises:
      ValueError: for a token not in the vocabulary, an id out of range, a
        row named twice, or an empty list.
      TypeError: for a string instead of a list.

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((6, 4), np.float32))
    >>> table.with_trainable_rows([5, 4], name="embed").row_ids
    (4, 5)
    """
    # Deferred: the trainable-rows kind is built on this module.
    from named_embed._src.tables import trainable_rows

    return trainable_rows.with_trainable_rows(self, tokens, name=name)

  # -------------------------------------------------------------- inspection

  def nearest(
    self,
    query: Query,
    k: int = 10,
    metric: str = "cosine",
    exclude: str | int | list[str | int] | None = None,
  ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """The ``k`` nearest rows: `named_embed.nearest`.

    Args:
      query: A token, an id, a list of them, or a `NamedArray` of ids or of
        vectors (with the embedding axes and any batch axes).
      k: Number of neighbours.
      metric: ``"cosine"``, ``"dot"`` or ``"euclidean"`` (a distance).
      exclude: Further tokens or ids never to return.

    Returns:
      ``(ids, scores)`` with the query's batch axes and ``"neighbor"``.

    Example:

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [1, 0.1], [0, 1]], np.float32)).with_vocabulary(
    ...     ne.Vocabulary(["cat", "dog", "car"]))
    >>> ids, scores = table.nearest("cat", k=1)
    >>> table.vocabulary.decode(ids.unwrap("neighbor"))
    ['dog']
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.nearest(self, query, k, metric, exclude)

  def similarity(
    self, a: Query, b: Query, metric: str = "cosine"
  ) -> pz.nx.NamedArray:
    """Similarity of two queries: `named_embed.similarity`.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 0], [0, 2]], np.float32))
    >>> float(table.similarity(0, 1)), float(table.similarity(1, 1, "dot"))
    (0.0, 4.0)
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.similarity(self, a, b, metric)

  def analogy(
    self,
    positive: Query | list[Query],
    negative: Query | list[Query] = (),
    k: int = 10,
  ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """``a - b + c`` queries: `named_embed.analogy`.

    >>> import numpy as np, named_embed as ne
    >>> table = ne.EmbeddingTable.from_pretrained(np.array(
    ...     [[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], np.float32)
    ...     ).with_vocabulary(ne.Vocabulary(["king", "man", "woman", "queen"]))
    >>> ids, _ = table.analogy(["king", "woman"], ["man"], k=1)
    >>> table.vocabulary.decode(ids.unwrap("neighbor"))
    ['queen']
    """
    # Deferred: inspection (tools) builds on the table kinds.
    from named_embed._src.tools import inspection

    return inspection.analogy(self, positive, negative, k)

  def __treescope_repr__(self, path: str | None, subtree_renderer: Any):
    # Deferred: rendering (tools) builds on the table kinds.
    from named_embed._src.tools import rendering

    return rendering.treescope_repr(self, path, subtree_renderer)

  def summary(self, statistics: bool = True) -> str:
    """The treescope summary line (see `named_embed.summarize`): axes,
    dtype, pad token row, alignment rows and, unless ``statistics`` is
    False or the table is traced or unbound, the norms of the token rows.

    >>> import numpy as np, named_embed as ne
    >>> ne.EmbeddingTable.from_pretrained(
    ...     np.array([[3, 4], [0, 1]], np.float32)).summary()
    'vocabulary:2 × embedding:2 float32, no padding row, row norms min 1 mean 3 max 5'
    """
    # Deferred: rendering (tools) builds on the table kinds.
    from named_embed._src.tools import rendering

    return rendering.embedding_table_summary(self, statistics)
