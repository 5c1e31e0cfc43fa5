"""Plumbing between NamedArrays and the raw-array kernels."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

import jax
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
  if type(tokens) is pz.nx.NamedArray:  # the common case, fast
    ids, named = tokens.data_array, tokens.named_axes
  elif isinstance(tokens, pz.nx.NamedArrayBase):
    prefix = as_prefix_layout(tokens)
    ids, named = prefix.data_array, prefix.named_axes
  else:
    ids = tokens
    if not hasattr(ids, "dtype"):
      ids = np.asarray(ids)
    named = collections.OrderedDict()
  if np.dtype(ids.dtype).kind not in "iu":  # bool and floats are not ids
    raise TypeError(
      f"`{argument}` must hold integer token ids, got dtype {ids.dtype}"
      f" (shape {tuple(ids.shape)}). Non-integer ids are never converted"
      f" silently: convert explicitly, e.g. `{argument}.astype(jnp.int32)`."
    )
  return ids, named


def wrap_ids(ids: object) -> pz.nx.NamedArray:
  """Plain ids as a positional `NamedArray`, host ids left on the host.

  Unlike `pz.nx.wrap` (which calls `jnp.asarray`, keeping only the low 32
  bits of int64 ids while x64 is off), numpy arrays and Python ints stay
  as they are, so `named_embed._src.base.range_policy.admit_ids` sees their values.

  >>> wrap_ids([2**32 + 1]).data_array
  array([4294967297])
  """
  if not hasattr(ids, "dtype"):
    ids = np.asarray(ids)
  return wrap_named(ids, collections.OrderedDict())


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


def wrap_named(
  data: jax.Array, named_axes: collections.OrderedDict
) -> pz.nx.NamedArray:
  """A NamedArray of ``data`` whose trailing axes are ``named_axes`` (taken
  as given, not copied: pass a dict nobody mutates).

  The dataclass constructor without penzai's per-call abstract-class check
  (`pz.nx.NamedArray` is concrete): the eager hot path of lookups.
  """
  result = object.__new__(pz.nx.NamedArray)
  # The fields as the frozen dataclass's __init__ sets them (it has no
  # __post_init__), without its per-field object.__setattr__ calls.
  result.__dict__.update(named_axes=named_axes, data_array=data)
  return result


def named_result(
  data: jax.Array, named_axes: Mapping[str, int]
) -> pz.nx.NamedArray:
  """Wraps ``data`` whose trailing axes are ``named_axes``, in that order."""
  return pz.nx.NamedArray(
    named_axes=collections.OrderedDict(named_axes), data_array=data
  )
