"""Converters between `EmbeddingTable` and other libraries' embeddings.

None of these libraries is imported: flax, torch and brainstate objects are
recognised by their attributes (duck typing), so named_embed does not
depend on them.

- flax linen ``Embed``: its variables ``{"params": {"embedding": array}}``;
- flax nnx ``Embed``: the module, whose ``embedding`` is an ``nnx.Param``;
- torch ``nn.Embedding``: the module, or its ``weight`` (a tensor or a
  numpy array) and its ``padding_idx``;
- brainstate ``Embedding``: the module, whose ``weight`` is a ``ParamState``
  (``weight.value``), with ``padding_idx`` and ``embedding_size``;
- penzai's own ``pz.nn.EmbeddingTable`` (penzai is a dependency: it is
  recognised by its class), whose holder is kept as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from penzai import pz

from named_embed._src.files import common
from named_embed._src.rows import table_arrays
from named_embed._src.tables.contract import AbstractTable, check_table
from named_embed._src.tables.table import EmbeddingTable


def _variable_value(variable: Any) -> Any:
  """The array in a flax nnx ``Variable`` / brainstate ``State``, or as is."""
  if hasattr(variable, "get_value"):  # flax nnx >= 0.11 (`.value` warns)
    return variable.get_value()
  if hasattr(variable, "value") and not hasattr(variable, "shape"):
    return variable.value
  return variable


# --------------------------------------------------------------------- flax


def from_flax(
  params_or_module: Any,
  *,
  vocabulary: common.VocabularyLike = None,
  vocabulary_axis: str = "vocabulary",
  embedding_axis: str = "embedding",
  padding_index: int | None = None,
  freeze: bool = True,
  name: str = "embeddings",
) -> EmbeddingTable:
  """A table from a flax ``Embed``: linen variables or an nnx module.

  Args:
    params_or_module: ``{"params": {"embedding": array}}`` (what
      ``flax.linen.Embed(...).init`` returns), its inner
      ``{"embedding": array}``, or a ``flax.nnx.Embed`` (anything with an
      ``embedding`` attribute holding an array or an ``nnx.Param``).
    vocabulary: A `Vocabulary`, a path to ``vocab.txt`` /
      ``tokenizer.json``, or None.
    vocabulary_axis: Name of the vocabulary axis.
    embedding_axis: Name of the embedding axis (``features`` in flax).
    padding_index: Padding row (flax has none); negative values count from
      the end.
    freeze: Frozen (default) or trainable, as in
      `EmbeddingTable.from_pretrained`.
    name: Parameter label prefix when ``freeze=False``.

  Returns:
    A table sharing the array (jax arrays are not copied).

  Raises:
    ValueError: for a dict without an ``embedding`` entry (the message
      lists the keys it has).
    TypeError: for an object that is neither.

  Example:

  >>> import numpy as np
  >>> from named_embed import formats
  >>> table = formats.from_flax({"params": {"embedding": np.ones((5, 3),
  ...                                                            np.float32)}})
  >>> table.vocab_size, table.embedding_axes
  (5, {'embedding': 3})
  """
  return common.build_table(
    _flax_embedding(params_or_module),
    source="from_flax",
    vocabulary=vocabulary,
    vocabulary_axis=vocabulary_axis,
    embedding_axes=(embedding_axis,),
    padding_index=padding_index,
    freeze=freeze,
    name=name,
  )


def _flax_embedding(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    inner = tree.get("params", tree)
    if isinstance(inner, Mapping) and "embedding" in inner:
      return _variable_value(inner["embedding"])
    keys = list(inner) if isinstance(inner, Mapping) else list(tree)
    raise ValueError(
      "from_flax expects the variables of a flax.linen.Embed,"
      " {'params': {'embedding': array}}, or their 'params' dict; this dict"
      f" has no 'embedding' entry, only {common.available(keys)}. For a larger"
      " model, pass the Embed's own sub-tree, e.g."
      " variables['params']['Embed_0']."
    )
  if hasattr(tree, "embedding"):
    return _variable_value(tree.embedding)
  raise TypeError(
    "from_flax expects {'params': {'embedding': array}} or a flax.nnx.Embed"
    f" (an object with an `embedding` attribute); got {type(tree).__name__}."
  )


def to_flax(table: AbstractTable) -> dict[str, dict[str, jax.Array]]:
  """The table as flax ``Embed`` variables ``{"params": {"embedding": ...}}``.

  The array is ``[vocab_size, features]`` in the table's dtype, usable as
  ``flax.linen.Embed(vocab_size, features).apply(variables, ids)`` or
  assigned to ``nnx.Embed(...).embedding.value``: the token rows as
  lookups read them (alignment rows left out), on the default device. Any
  kind of table: a quantised table's rows come dequantised, an adapted
  table's merged; any layout: the rows are copied out one chunk at a time
  (`named_embed._src.files.common.float_rows`). flax has no padding row:
  ``padding_index`` and the vocabulary are not carried.

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: for a table with several embedding axes (flax's ``Embed``
      has one ``features`` axis).

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed import formats
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((5, 3), np.float32))
  >>> formats.to_flax(table)["params"]["embedding"].shape
  (5, 3)
  >>> q = formats.to_flax(table.padded_to_multiple(4).quantized("int8"))
  >>> q["params"]["embedding"].shape, q["params"]["embedding"].dtype
  ((5, 3), dtype('float32'))
  """
  check_table(table, "ne.to_flax")
  common.check_one_axis(table, "flax's Embed")
  return {"params": {"embedding": jnp.asarray(common.float_rows(table))}}


# -------------------------------------------------------------------- torch


def _torch_numpy(weight: Any) -> np.ndarray:
  """A numpy array from a numpy/jax array or a torch tensor (duck-typed)."""
  if hasattr(weight, "detach") and hasattr(weight, "cpu"):
    weight = weight.detach().cpu()
    if str(getattr(weight, "dtype", "")) == "torch.bfloat16":
      # numpy has no bfloat16 for torch; widening to float32 is exact.
      return weight.float().numpy().astype(ml_dtypes.bfloat16)
    return weight.numpy()
  return np.asarray(weight)


def from_torch_weight(
  weight: Any,
  padding_idx: int | None = None,
  *,
  vocabulary: common.VocabularyLike = None,
  vocabulary_axis: str = "vocabulary",
  embedding_axis: str = "embedding",
  freeze: bool = True,
  name: str = "embeddings",
) -> EmbeddingTable:
  """A table from a torch ``nn.Embedding``'s ``weight`` and ``padding_idx``.

  Args:
    weight: ``[num_embeddings, embedding_dim]``: a numpy array (e.g.
      ``embedding.weight.detach().numpy()``) or a torch tensor (anything
      with ``.detach().cpu().numpy()``; bfloat16 tensors are converted
      exactly).
    padding_idx: torch's ``padding_idx``; negative values count from the
      end, as in torch.
    vocabulary: A `Vocabulary`, a path to ``vocab.txt`` /
      ``tokenizer.json``, or None.
    vocabulary_axis: Name of the vocabulary axis.
    embedding_axis: Name of the embedding axis.
    freeze: Frozen (default, as ``nn.Embedding.from_pretrained``) or
      trainable.
    name: Parameter label prefix when ``freeze=False``.

  Returns:
    The table; lookups send no gradient to row ``padding_idx``, as in torch.

  Example:

  >>> import numpy as np
  >>> from named_embed import formats
  >>> weight = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  >>> table = formats.from_torch_weight(weight, padding_idx=-1)
  >>> table.padding_index, table.embedding_axes
  (3, {'embedding': 3})
  """
  return common.build_table(
    _torch_numpy(weight),
    source="from_torch_weight",
    vocabulary=vocabulary,
    vocabulary_axis=vocabulary_axis,
    embedding_axes=(embedding_axis,),
    padding_index=padding_idx,
    freeze=freeze,
    name=name,
  )


def from_torch(module: Any, **kwargs: Any) -> EmbeddingTable:
  """`from_torch_weight` of a torch ``nn.Embedding`` module's ``weight``.

  Reads ``module.weight`` and ``module.padding_idx``; ``max_norm`` and
  ``scale_grad_by_freq`` are not read (see `EmbeddingTable.renormalized`).
  Keyword arguments go to `from_torch_weight`.

  Example:

  >>> import types, numpy as np
  >>> from named_embed import formats
  >>> module = types.SimpleNamespace(weight=np.zeros((4, 2), np.float32),
  ...                                padding_idx=0)
  >>> formats.from_torch(module).padding_index
  0
  """
  if not hasattr(module, "weight"):
    raise TypeError(
      "from_torch expects a torch nn.Embedding (an object with `weight` and"
      f" `padding_idx`); got {type(module).__name__}. For a bare array, use"
      " from_torch_weight(weight, padding_idx=...)."
    )
  padding_idx = getattr(module, "padding_idx", None)
  return from_torch_weight(module.weight, padding_idx, **kwargs)


def to_torch_weight(table: AbstractTable) -> np.ndarray:
  """The ``[vocab_size, embedding_dim]`` numpy array for ``nn.Embedding``.

  The token rows as lookups read them (alignment rows left out; a
  quantised table's dequantised, an adapted table's merged), copied to
  the host one chunk at a time, from any layout. Build the module with
  ``nn.Embedding.from_pretrained(torch.from_numpy(w),
  padding_idx=table.padding_index)``. A bfloat16 table gives an
  ``ml_dtypes.bfloat16`` array, which torch cannot take directly:
  ``torch.from_numpy(w.astype(np.float32)).bfloat16()`` is exact.

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: for a table with several embedding axes (torch's
      ``nn.Embedding`` has one ``embedding_dim``).

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed import formats
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> w = formats.to_torch_weight(table)
  >>> type(w).__name__, w.shape, w.dtype
  ('ndarray', (4, 2), dtype('float32'))
  >>> rows = table.with_trainable_rows([1], name="e")
  >>> formats.to_torch_weight(rows).tolist() == w.tolist()
  True
  """
  check_table(table, "ne.to_torch_weight")
  return common.flat_host_rows(table, "torch's nn.Embedding")


# --------------------------------------------------------------- brainstate


def from_brainstate(
  module: Any,
  *,
  vocabulary: common.VocabularyLike = None,
  vocabulary_axis: str = "vocabulary",
  embedding_axes: Sequence[str] | str | None = None,
  freeze: bool = True,
  name: str = "embeddings",
) -> EmbeddingTable:
  """A table from a ``brainstate.nn.Embedding`` (duck-typed).

  Reads ``module.weight.value`` (``[num_embeddings, *embedding_size]``),
  ``module.padding_idx`` and, if present, ``module.embedding_size`` (checked
  against the weight's shape). brainstate's ``max_norm`` and ``freeze`` are
  not read: pass ``freeze=`` here.

  Args:
    module: The module, or any object with ``weight.value``.
    vocabulary: A `Vocabulary`, a path to ``vocab.txt`` /
      ``tokenizer.json``, or None.
    vocabulary_axis: Name of the vocabulary axis.
    embedding_axes: Names of the embedding axes; required when
      ``embedding_size`` has several dimensions.
    freeze: Frozen (default) or trainable.
    name: Parameter label prefix when ``freeze=False``.

  Example:

  >>> import types, numpy as np
  >>> from named_embed import formats
  >>> module = types.SimpleNamespace(
  ...     weight=types.SimpleNamespace(value=np.ones((6, 2, 3), np.float32)),
  ...     padding_idx=0, embedding_size=(2, 3))
  >>> formats.from_brainstate(module, embedding_axes=("heads", "dim")
  ...                         ).embedding_axes
  {'heads': 2, 'dim': 3}
  """
  weight = getattr(module, "weight", None)
  if weight is None:
    raise TypeError(
      "from_brainstate expects a brainstate.nn.Embedding (an object with"
      f" `weight.value`); got {type(module).__name__}."
    )
  rows = _variable_value(weight)
  expected = getattr(module, "embedding_size", None)
  if expected is not None:
    expected = tuple(np.atleast_1d(expected).tolist())
    if tuple(np.shape(rows)[1:]) != expected:
      raise ValueError(
        f"from_brainstate: the weight has shape {np.shape(rows)}, but the"
        f" module's embedding_size is {expected}."
      )
  return common.build_table(
    rows,
    source="from_brainstate",
    vocabulary=vocabulary,
    vocabulary_axis=vocabulary_axis,
    embedding_axes=embedding_axes,
    padding_index=getattr(module, "padding_idx", None),
    freeze=freeze,
    name=name,
  )


def to_brainstate_weight(table: AbstractTable) -> jax.Array:
  """The ``[num_embeddings, *embedding_size]`` array for brainstate.

  Use it as ``brainstate.nn.Embedding.from_pretrained(w,
  padding_idx=table.padding_index)``; multi-axis tables keep their shape
  (brainstate's ``embedding_size`` may be a tuple). The token rows as
  lookups read them (as in `to_flax`: any kind, any layout), on the
  default device.

  Raises:
    TypeError: if ``table`` is not a named_embed table.

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed import formats
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.ones((6, 2, 4), np.float32), embedding_axes=("heads", "dim"))
  >>> formats.to_brainstate_weight(table).shape
  (6, 2, 4)
  >>> formats.to_brainstate_weight(table.quantized("int4")).shape
  (6, 2, 4)
  """
  check_table(table, "ne.to_brainstate_weight")
  return jnp.asarray(common.float_rows(table))


# ------------------------------------------------------------------- penzai


def from_penzai(
  pz_table: pz.nn.EmbeddingTable,
  *,
  vocabulary: common.VocabularyLike = None,
  padding_index: int | None = None,
) -> EmbeddingTable:
  """Our table from penzai's own ``pz.nn.EmbeddingTable``, holding what it
  holds: `EmbeddingTable.from_penzai`.

  The holder is kept as it is, not copied: a `pz.Parameter` stays that
  parameter (same object, label and value: every layer sharing it, as a
  tied model's lookup and decode do, still shares it), a
  `pz.ParameterValue` stays one, a plain `NamedArray` stays frozen, and an
  unbound `pz.ParameterSlot` stays unbound. The vocabulary axis name and
  the embedding axes (names, sizes and storage order) are kept.

  Args:
    pz_table: A ``penzai.pz.nn.EmbeddingTable`` (e.g. the table of a
      penzai transformer's ``pz.nn.EmbeddingLookup``).
    vocabulary: A `Vocabulary`, a path to ``vocab.txt`` /
      ``tokenizer.json``, or None (penzai's table has none).
    padding_index: The pad token's row, or None (penzai has none).

  Raises:
    TypeError: for anything but a ``pz.nn.EmbeddingTable`` (a penzai
      lookup or decode layer: pass its ``.table``), or a table whose
      embeddings are not a parameter, a parameter value, a slot or a
      `NamedArray`.
    ValueError: for a vocabulary or padding row that does not fit.

  Example:

  >>> import jax
  >>> from penzai import pz
  >>> from named_embed._src.files import converters
  >>> pz_table = pz.nn.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=5,
  ...     embedding_axes={"embedding": 3})
  >>> table = converters.from_penzai(pz_table)
  >>> table.embeddings is pz_table.embeddings, table.embeddings.label
  (True, 'embed.embeddings')
  """
  if not isinstance(pz_table, pz.nn.EmbeddingTable):
    table = getattr(pz_table, "table", None)
    hint = (
      f" This is a {type(pz_table).__name__} layer: pass its table,"
      " `from_penzai(layer.table)`."
      if isinstance(table, pz.nn.EmbeddingTable)
      else ""
    )
    raise TypeError(
      "from_penzai expects penzai's pz.nn.EmbeddingTable; got"
      f" {type(pz_table).__module__}.{type(pz_table).__qualname__}.{hint}"
    )
  embeddings = pz_table.embeddings
  if not isinstance(
    embeddings,
    (pz.Parameter, pz.ParameterValue, pz.ParameterSlot, pz.nx.NamedArrayBase),
  ):
    raise TypeError(
      "from_penzai: the table's embeddings must be a pz.Parameter, a"
      " pz.ParameterValue, a pz.ParameterSlot or a NamedArray; got"
      f" {type(embeddings).__name__}."
    )
  vocabulary = common.as_vocabulary(vocabulary)
  bound = table_arrays.value_or_none(embeddings) is not None
  try:
    table = EmbeddingTable(
      embeddings,
      pz_table.vocabulary_axis,
      padding_index,
      vocabulary=None if bound else vocabulary,
    )
    if bound and vocabulary is not None:
      table = table.with_vocabulary(vocabulary)
  except (ValueError, TypeError) as error:
    raise type(error)(f"from_penzai: {error}") from None
  return table


def to_penzai(table: AbstractTable) -> pz.nn.EmbeddingTable:
  """Penzai's own ``pz.nn.EmbeddingTable`` holding this table's array:
  `EmbeddingTable.to_penzai`.

  For a plain float `EmbeddingTable`: its holder goes across as it is (the
  same `pz.Parameter` object, `pz.ParameterValue`, frozen `NamedArray` or
  slot), with the vocabulary axis name. Penzai's table has no pad token
  row, vocabulary or recorded sharding: ``padding_index``, ``vocabulary``
  and ``rows_sharding`` are not carried (the arrays keep their placement).

  Raises:
    TypeError: for another kind of table (a quantised table: convert
      ``table.dequantized()``; an adapted one: ``table.merged()``), or for
      anything that is not a table.
    ValueError: for a table with alignment rows (penzai's table cannot
      mark rows that are not tokens).

  Example:

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.files import converters
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> pz_table = converters.to_penzai(table)
  >>> type(pz_table).__name__, pz_table.embeddings is table.embeddings
  ('EmbeddingTable', True)
  """
  check_table(table, "ne.to_penzai")
  if not isinstance(table, EmbeddingTable):
    raise TypeError(
      f"to_penzai: penzai's pz.nn.EmbeddingTable holds one float array; a"
      f" {type(table).__name__} holds more. Convert its float table: a"
      " quantised table's `dequantized()`, an adapted table's `merged()`."
    )
  if table.true_vocab_size is not None:
    extra = table.num_rows - table.true_vocab_size
    raise ValueError(
      f"to_penzai: the table has {extra} alignment rows after its"
      f" {table.true_vocab_size} tokens (num_rows {table.num_rows}), which"
      " penzai's EmbeddingTable cannot mark as not tokens. Convert a table"
      " without them, e.g. `ne.EmbeddingTable.from_pretrained("
      "table.token_rows(), freeze=...)`."
    )
  return pz.nn.EmbeddingTable(
    embeddings=table.embeddings, vocabulary_axis=table.vocabulary_axis
  )
