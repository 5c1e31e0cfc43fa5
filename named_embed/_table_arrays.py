"""Checks and conversions for the array an `EmbeddingTable` holds."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._validation import check_float_dtype
from named_embed.vocabulary import Vocabulary


def same_kind(embeddings: Any, value: pz.nx.NamedArray) -> Any:
  """``value`` held the way ``embeddings`` is (Parameter, value or array)."""
  if isinstance(embeddings, pz.Parameter):
    return pz.Parameter(
      value=value, label=embeddings.label, metadata=embeddings.metadata
    )
  if isinstance(embeddings, pz.ParameterValue):
    return pz.ParameterValue(
      value=value, label=embeddings.label, metadata=embeddings.metadata
    )
  return value


def value_or_none(embeddings: Any) -> pz.nx.NamedArrayBase | None:
  if isinstance(embeddings, pz.nx.NamedArrayBase):
    return embeddings
  if isinstance(embeddings, (pz.Parameter, pz.ParameterValue)):
    return embeddings.value
  return None


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
  """Turns ``from_pretrained``'s input into a validated NamedArray."""
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
  check_float_dtype("embeddings", embeddings.dtype)
  if not isinstance(embeddings, jax.Array):
    embeddings = jnp.asarray(embeddings)
  return pz.nx.NamedArray(
    named_axes=collections.OrderedDict(
      zip((vocabulary_axis, *embedding_axes), shape)
    ),
    data_array=embeddings,
  )
