"""The array an `EmbeddingTable` holds: how it is held, checked, and read.

A table holds its ``[vocabulary, *embedding]`` `NamedArray` in one of four
ways (`holder_kind`): a `pz.Parameter`, a `pz.ParameterValue`, a plain
frozen `NamedArray`, or an unbound `pz.ParameterSlot`. Everything that
needs to know which (the table's own methods, sharding, saving, rendering,
the kernels) asks this module.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.base import mesh_layout, validation
from named_embed._src.base.vocabulary import Vocabulary

KINDS = ("parameter", "parameter_value", "array", "slot")
"""How a table can hold its array (`holder_kind`)."""


def holder_kind(embeddings: Any) -> str:
  """How ``embeddings`` holds the table's array: ``"parameter"`` (a
  trainable `pz.Parameter`), ``"parameter_value"`` (a `pz.ParameterValue`,
  trainable through `jax.grad` of values), ``"array"`` (a plain, frozen
  `NamedArray`) or ``"slot"`` (an unbound `pz.ParameterSlot`)."""
  if isinstance(embeddings, pz.Parameter):
    return "parameter"
  if isinstance(embeddings, pz.ParameterValue):
    return "parameter_value"
  if isinstance(embeddings, pz.nx.NamedArrayBase):
    return "array"
  return "slot"


def is_frozen(embeddings: Any) -> bool:
  """Whether a table holding ``embeddings`` is frozen (a plain array)."""
  kind = type(embeddings)
  if kind is pz.nx.NamedArray:  # exact type checks first: the hot path
    return True
  if kind is pz.Parameter or kind is pz.ParameterValue:
    return False
  return isinstance(embeddings, pz.nx.NamedArrayBase)


def hold(
  kind: str,
  value: pz.nx.NamedArrayBase,
  label: str | None = None,
  metadata: dict | None = None,
) -> Any:
  """``value`` held as ``kind`` (see `holder_kind`; not ``"slot"``)."""
  if kind == "array":
    return value
  holder = {"parameter": pz.Parameter, "parameter_value": pz.ParameterValue}
  return holder[kind](value=value, label=label, metadata=metadata or {})


def held_like(embeddings: Any, value: pz.nx.NamedArrayBase) -> Any:
  """``value`` held the way ``embeddings`` is (Parameter, value or array),
  with the same label and metadata."""
  kind = holder_kind(embeddings)
  if kind == "array":
    return value
  return hold(kind, value, embeddings.label, embeddings.metadata)


def replace_value(embeddings: Any, value: pz.nx.NamedArrayBase) -> Any:
  """``embeddings`` holding ``value`` instead. A `pz.Parameter` is updated
  in place (penzai's parameters are mutable variables, and every layer
  that shares it, as tied layers do, must see the new value); anything
  else is returned new."""
  if isinstance(embeddings, pz.Parameter):
    embeddings.value = value
    return embeddings
  return held_like(embeddings, value)


def value_or_none(embeddings: Any) -> pz.nx.NamedArrayBase | None:
  """The `NamedArray` that ``embeddings`` holds, or None when unbound."""
  kind = type(embeddings)
  if kind is pz.Parameter or kind is pz.ParameterValue:  # exact: the hot path
    embeddings = embeddings.value
  elif isinstance(embeddings, (pz.Parameter, pz.ParameterValue)):
    embeddings = embeddings.value
  if type(embeddings) is pz.nx.NamedArray:
    return embeddings
  if isinstance(embeddings, pz.nx.NamedArrayBase):
    return embeddings
  return None


def value_and_frozen(
  embeddings: Any,
) -> tuple[pz.nx.NamedArrayBase | None, bool]:
  """`value_or_none` and `is_frozen` in one call (the eager hot path)."""
  if type(embeddings) is pz.nx.NamedArray:
    return embeddings, True
  return value_or_none(embeddings), is_frozen(embeddings)


def kernel_rows(
  rows: jax.Array, frozen: bool, rows_sharding: jax.sharding.NamedSharding
) -> jax.Array:
  """A table's raw rows as every kernel reads them: without gradient when
  the table is frozen, and pinned to the sharding `named_embed.shard`
  recorded (which also pins the gradient's)."""
  if frozen:
    rows = jax.lax.stop_gradient(rows)
  return mesh_layout.pin_rows(rows, rows_sharding)


def check_vocabulary(
  vocabulary: Vocabulary, vocab_size: int, padding_index: int | None
) -> None:
  if len(vocabulary) != vocab_size:
    raise ValueError(
      f"The vocabulary has {len(vocabulary)} tokens but the table has"
      f" {vocab_size} rows; they must match one to one."
    )
  pad = vocabulary.pad_id
  if pad is not None and padding_index is not None and pad != padding_index:
    raise ValueError(
      f"The vocabulary's pad token {vocabulary.token(pad)!r} is row {pad},"
      f" but the table's padding_index is {padding_index}."
    )


def check_bound_rows(true_vocab_size: int | None, num_rows: int) -> None:
  """Raises if a table's ``true_vocab_size`` exceeds the rows bound to it
  (a slot bound to a value of the wrong size)."""
  if true_vocab_size is not None and true_vocab_size > num_rows:
    raise ValueError(
      f"EmbeddingTable.true_vocab_size {true_vocab_size} exceeds the"
      f" {num_rows} rows bound to it."
    )


def check_table_array(value: pz.nx.NamedArrayBase, vocabulary_axis: str):
  if value.positional_shape:
    raise ValueError(
      "EmbeddingTable.embeddings must have named axes only; got positional"
      f" axes of shape {value.positional_shape} besides"
      f" {dict(value.named_shape)}. Name them with `.tag(...)`."
    )
  if vocabulary_axis not in value.named_shape:
    raise ValueError(
      f"EmbeddingTable.embeddings has axes {dict(value.named_shape)}, which"
      f" do not include the vocabulary axis {vocabulary_axis!r}."
    )
  if len(value.named_shape) < 2:
    raise ValueError(
      "EmbeddingTable.embeddings needs at least one embedding axis besides"
      f" {vocabulary_axis!r}; got axes {dict(value.named_shape)}."
    )
  empty = [name for name, size in value.named_shape.items() if size == 0]
  if empty:
    raise ValueError(
      f"EmbeddingTable.embeddings has axes {dict(value.named_shape)}: axis"
      f" {empty[0]!r} is empty. A table needs at least one row and one"
      " value a row (every lookup of an empty table would fail)."
    )
  dtype = getattr(value, "dtype", None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f"EmbeddingTable.embeddings must be floating, got dtype {dtype}."
    )


def as_table_array(
  embeddings: Any,
  vocabulary_axis: str,
  embedding_axes: tuple[str, ...] | list[str] | str | None,
) -> pz.nx.NamedArray:
  """Turns ``from_pretrained``'s input into a validated NamedArray.

  A flax nnx variable (`nnx.Param`, ...; recognised by its class, flax is
  not imported) is refused with a `TypeError`: a table made from it on
  every call is frozen by default, and its gradients are then silently
  zero.
  """
  for kind in type(embeddings).__mro__:
    if kind.__name__ == "Variable" and kind.__module__.startswith("flax."):
      raise TypeError(
        "EmbeddingTable.from_pretrained: `embeddings` is a flax"
        f" nnx.{type(embeddings).__name__} (an nnx variable). A table made"
        " from it on every call would never train it: the table is frozen"
        " by default (freeze=True), so its gradients are silently zero."
        " Hold the table in an nnx module instead, built once:"
        " `ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(array,"
        " freeze=False))` (from named_embed import nnx as ne_nnx), and"
        " call it (`emb(tokens)`, `emb.attend(hidden)`). To wrap the"
        " variable's current value on purpose, pass `variable[...]`."
      )
  if isinstance(embedding_axes, str):
    embedding_axes = (embedding_axes,)
  if isinstance(embeddings, pz.nx.NamedArrayBase):
    named = embeddings
    check_table_array(named, vocabulary_axis)
    others = [n for n in named.named_shape if n != vocabulary_axis]
    if embedding_axes is not None and set(embedding_axes) != set(others):
      raise ValueError(
        f"`embedding_axes` {tuple(embedding_axes)} do not match the"
        f" embedding axes {tuple(others)} of the given NamedArray"
        f" (axes {dict(named.named_shape)}, vocabulary axis"
        f" {vocabulary_axis!r})."
      )
    order = (vocabulary_axis, *(embedding_axes or others))
    return named.order_as(*order)
  if not hasattr(embeddings, "shape"):
    embeddings = np.asarray(embeddings)
  shape = tuple(embeddings.shape)
  if len(shape) < 2:
    raise ValueError(
      "`embeddings` must have a vocabulary axis and at least one embedding"
      f" axis; got an array of shape {shape}. Reshape a 1-D array of V"
      " scalars to (V, 1)."
    )
  if embedding_axes is None:
    if len(shape) != 2:
      raise ValueError(
        f"`embeddings` has shape {shape}: name its {len(shape) - 1}"
        " embedding axes with `embedding_axes=(...)`."
      )
    embedding_axes = ("embedding",)
  embedding_axes = tuple(embedding_axes)
  if len(embedding_axes) != len(shape) - 1:
    raise ValueError(
      f"`embedding_axes` {embedding_axes} names {len(embedding_axes)} axes,"
      f" but `embeddings` of shape {shape} has {len(shape) - 1} besides the"
      " vocabulary axis (axis 0)."
    )
  if len(set(embedding_axes)) != len(embedding_axes) or (
    vocabulary_axis in embedding_axes
  ):
    raise ValueError(
      f"Axis names must be distinct: vocabulary axis {vocabulary_axis!r},"
      f" embedding axes {embedding_axes}."
    )
  validation.check_float_dtype("embeddings", embeddings.dtype)
  if not isinstance(embeddings, jax.Array):
    embeddings = jnp.asarray(embeddings)
  return pz.nx.NamedArray(
    named_axes=collections.OrderedDict(
      zip((vocabulary_axis, *embedding_axes), shape)
    ),
    data_array=embeddings,
  )
