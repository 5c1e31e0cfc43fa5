"""The hidden side of a decode: what a decode or fused loss accepts.

A decode contracts every embedding axis of the table against ``hidden``;
`check_hidden` checks that ``hidden`` holds them (with the right sizes, and
without the vocabulary axis), and `joint_dtype` is the dtype both operands
are computed in. `hidden_layout` says, once per axis layout, how a
kernel reads ``hidden`` as stored (`HiddenLayout`).
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.base import named_arrays


@functools.lru_cache(maxsize=64)
def joint_dtype(hidden_dtype: Any, table_dtype: Any) -> np.dtype:
  """The dtype both operands are cast to (JAX's standard promotion, whatever
  the global `jax_numpy_dtype_promotion` mode)."""
  with jax.numpy_dtype_promotion("standard"):
    return np.dtype(jnp.promote_types(hidden_dtype, table_dtype))


def check_hidden(
  table: Any,
  embedding_axes: dict[str, int],
  hidden: Any,
  caller: str,
) -> pz.nx.NamedArray:
  """Checks that ``hidden`` holds the table's embedding axes; returns it in
  positional-prefix layout.

  Raises:
    TypeError: if ``hidden`` is not a `NamedArray`.
    ValueError: for a missing embedding axis, a size mismatch, or a clash
      with the vocabulary axis.
  """
  if not isinstance(hidden, pz.nx.NamedArrayBase):
    raise TypeError(
      f"named_embed.{caller} expects a NamedArray holding the embedding axes"
      f" {embedding_axes}; got {type(hidden).__name__} of shape"
      f" {getattr(hidden, 'shape', None)}. Name its axes first, e.g."
      f" `pz.nx.wrap(x).tag(..., {', '.join(map(repr, embedding_axes))})`."
    )
  given = dict(hidden.named_shape)
  missing = [name for name in embedding_axes if name not in given]
  if missing:
    raise ValueError(
      f"named_embed.{caller}: the input lacks embedding axis/axes {missing};"
      f" expected all of {embedding_axes}, got axes {given}."
    )
  wrong = {n: given[n] for n in embedding_axes if given[n] != embedding_axes[n]}
  if wrong:
    raise ValueError(
      f"named_embed.{caller}: embedding axis sizes {wrong} of the input do not"
      f" match the table's {embedding_axes} (input axes {given})."
    )
  if table.vocabulary_axis in given:
    raise ValueError(
      f"named_embed.{caller}: the input already has the vocabulary axis"
      f" {table.vocabulary_axis!r} (input axes {given}); the output adds it."
    )
  return named_arrays.as_prefix_layout(hidden)


@dataclasses.dataclass(frozen=True)
class HiddenLayout:
  """How a decode kernel reads ``hidden`` as stored, ``[*positional,
  *named]`` (hashable: part of a jit cache key).

  Attributes:
    subscripts: einsum subscripts ``hidden, rows [V, *embedding] -> [*pos,
      *batch, V]``: a contraction of the array as stored (no transpose).
    permutation: The axes of ``hidden`` reordered to ``[*pos, *batch,
      *embedding]``, for kernels that read ``[N, E]`` rows of it.
    batch_ndim: The number of batch dimensions (positional and named).
  """

  subscripts: str
  permutation: tuple[int, ...]
  batch_ndim: int


@functools.lru_cache(maxsize=1024)
def hidden_layout(
  n_positional: int, hidden_named: tuple[str, ...], embedding: tuple[str, ...]
) -> HiddenLayout:
  """The `HiddenLayout` of ``hidden [*pos, *hidden_named]`` against a
  table with ``embedding`` axes.

  >>> from named_embed._src.ops.decode_inputs import hidden_layout
  >>> hidden_layout(1, ("embedding", "seq"), ("embedding",))
  HiddenLayout(subscripts='bcd,ac->bda', permutation=(0, 2, 1), batch_ndim=2)
  """
  letters = iter(string.ascii_letters)
  vocab = next(letters)
  pos = "".join(next(letters) for _ in range(n_positional))
  named = {name: next(letters) for name in hidden_named}
  table = vocab + "".join(named[name] for name in embedding)
  batch = "".join(named[n] for n in hidden_named if n not in embedding)
  hidden = pos + "".join(named.values())
  where = {name: n_positional + i for i, name in enumerate(hidden_named)}
  batch_named = [where[n] for n in hidden_named if n not in embedding]
  permutation = (
    *range(n_positional),
    *batch_named,
    *(where[name] for name in embedding),
  )
  return HiddenLayout(
    subscripts=f"{hidden},{table}->{pos}{batch}{vocab}",
    permutation=permutation,
    batch_ndim=n_positional + len(batch_named),
  )
