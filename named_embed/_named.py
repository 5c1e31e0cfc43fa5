"""Plumbing between NamedArrays and the raw-array kernels."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz


def as_prefix_layout(array: pz.nx.NamedArrayBase) -> pz.nx.NamedArray:
  """The same array as a NamedArray whose positional axes come first."""
  if isinstance(array, pz.nx.NamedArray):
    return array
  return array.with_positional_prefix()


def split_tokens(
  tokens: object, argument: str = "tokens"
) -> tuple[jax.Array | np.ndarray, collections.OrderedDict]:
  """Returns raw ids ``[*positional, *named]`` and the named token axes.

  Raises:
    TypeError: if the ids are not integers.
  """
  if isinstance(tokens, pz.nx.NamedArrayBase):
    prefix = as_prefix_layout(tokens)
    ids, named = prefix.data_array, prefix.named_axes
  else:
    ids = tokens
    if not hasattr(ids, "dtype"):
      ids = np.asarray(ids)
    named = collections.OrderedDict()
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(
      f"`{argument}` must hold integer token ids, got dtype {ids.dtype}"
      f" (shape {tuple(ids.shape)}). Non-integer ids are never converted"
      f" silently: convert explicitly, e.g. `{argument}.astype(jnp.int32)`."
    )
  return ids, named


def check_no_clash(
  what: str,
  given_axes: Mapping[str, int] | Iterable[str],
  table_axes: Iterable[str],
) -> None:
  """Raises ValueError if any of ``given_axes`` is also a table axis."""
  given = list(given_axes)
  table = list(table_axes)
  clash = [name for name in given if name in table]
  if clash:
    raise ValueError(
      f"{what}: axis name(s) {clash} appear both in the input (axes"
      f" {given}) and in the embedding table (axes {table}). Rename the"
      " input axes, e.g. with `.untag(...).tag(...)`."
    )


def named_result(
  data: jax.Array, named_axes: Mapping[str, int]
) -> pz.nx.NamedArray:
  """Wraps ``data`` whose trailing axes are ``named_axes``, in that order."""
  return pz.nx.NamedArray(
    named_axes=collections.OrderedDict(named_axes), data_array=data
  )
