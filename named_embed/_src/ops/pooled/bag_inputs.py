"""The options and inputs of a pooled lookup, checked and laid out.

`options` validates the options once per distinct combination. Two forms reach the kernel (`named_embed._src.ops.pooled.reductions`) as raw arrays:

- fixed-size bags: integer tokens with a named axis ``over``, as raw ids
  with the position of the member axis (the kernel moves it last and
  flattens the others into the bag axis); per-member weights in the same
  layout;
- ragged bags: flat ``ids [N]`` and the ``offsets`` where bags start, as
  torch's ``F.embedding_bag`` takes them. Concrete offsets are checked
  here; traced ones are made well defined by the kernel
  (`reductions.bag_index`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import numpy as np
from penzai import pz

from named_embed._src.base import named_arrays, range_policy, validation
from named_embed._src.ops.pooled import reductions
from named_embed._src.rows import gather


@dataclasses.dataclass(frozen=True)
class PoolOptions:
  """A pooled lookup's validated options (hashable)."""

  rows: gather.LookupConfig
  mode: str
  chunk_size: int | None


@functools.lru_cache(maxsize=256, typed=True)
def options(
  mode,
  out_of_range,
  max_norm,
  norm_type,
  scale_grad_by_freq,
  chunk_size,
  dtype=None,
) -> PoolOptions:
  """Validates the options once per distinct combination.

  Raises:
    ValueError: for an unknown ``mode`` or ``out_of_range``, a negative
      ``max_norm``, ``chunk_size < 1``, or ``scale_grad_by_freq`` with
      ``"max"``.
    TypeError: for options of the wrong type (``dtype`` not a float dtype).
  """
  mode = validation.check_choice("mode", mode, reductions.MODES)
  rows = gather.lookup_config(
    out_of_range, max_norm, norm_type, scale_grad_by_freq, dtype
  )
  if rows.scale_grad_by_freq and mode == "max":
    raise ValueError(
      "`scale_grad_by_freq` is not supported with mode='max' (as in torch):"
      " the gradient of a max reaches one member per feature, so there is"
      " no frequency to divide by. Use mode='sum' or 'mean', or drop it."
    )
  return PoolOptions(
    rows, mode, validation.check_optional_positive_int("chunk_size", chunk_size)
  )


def check_axis_name(argument: str, name: Any) -> str:
  if not isinstance(name, str):
    raise TypeError(f"`{argument}` must be an axis name (a str), got {name!r}.")
  return name


def check_weights_mode(weights: Any, mode: str) -> None:
  if weights is not None and mode != "sum":
    raise ValueError(
      "`weights` (per-member weights) are only supported with mode='sum',"
      f" as torch's per_sample_weights; got mode={mode!r}."
    )


class Bags(NamedTuple):
  """A pooled lookup's arrays in the kernel's layout, and its static
  layout.

  Attributes:
    ids: Integer ids: the tokens' data (positional axes first), or the flat
      ``[N]`` ids of ragged bags. Error messages name positions in it.
    weights: Per-member weights in the layout of ``ids``, or None.
    offsets: Ragged bags: where each bag starts (and, with
      ``include_last_offset``, where the last ends); else None.
    checked: Which ids are in a bag (ids after the last offset are not),
      or None for all.
    layout: The static facts of the bags (hashable: part of the per-call
      plan's key), read by `bag_layout`: ``("fixed", over, named token
      axes, ids shape)`` or ``("ragged", bag_axis, num_bags,
      include_last_offset)``.
  """

  ids: Any
  weights: Any
  offsets: Any
  checked: Any
  layout: tuple


class BagLayout(NamedTuple):
  """What the static layout of some bags (`Bags.layout`) means.

  Attributes:
    member_dim: Fixed-size bags: the dimension of ``ids`` holding the
      members; None for ragged bags.
    out_shape: Shape of the pooled result before the embedding axes.
    out_axes: Named axes of the result before the embedding axes.
    token_axes: Named axes of the tokens (checked against the table's).
    include_last_offset: Ragged bags: the last offset ends the last bag.
  """

  member_dim: int | None
  out_shape: tuple[int, ...]
  out_axes: collections.OrderedDict
  token_axes: tuple[str, ...]
  include_last_offset: bool


def bag_layout(layout: tuple, ids_shape: tuple[int, ...], caller: str):
  """The `BagLayout` of ``Bags.layout`` (once per plan).

  Raises:
    ValueError: if ``over`` is not an axis of the tokens.
  """
  if layout[0] == "ragged":
    _, bag_axis, num_bags, include_last_offset = layout
    return BagLayout(
      member_dim=None,
      out_shape=(num_bags,),
      out_axes=collections.OrderedDict([(bag_axis, num_bags)]),
      token_axes=(bag_axis,),
      include_last_offset=include_last_offset,
    )
  _, over, named, _ = layout
  named = dict(named)
  n_positional = len(ids_shape) - len(named)
  if over not in named:
    raise ValueError(
      f"named_embed.{caller}: `over`={over!r} is not an axis of `tokens`"
      f" (named axes {named}, positional shape {ids_shape[:n_positional]})."
      " `over` names the axis that holds each bag's members."
    )
  out_axes = collections.OrderedDict(
    (name, size) for name, size in named.items() if name != over
  )
  return BagLayout(
    member_dim=n_positional + list(named).index(over),
    out_shape=(*ids_shape[:n_positional], *out_axes.values()),
    out_axes=out_axes,
    token_axes=tuple(named),
    include_last_offset=False,
  )


def fixed_bags(tokens: Any, over: str, weights: Any, caller: str) -> Bags:
  """Fixed-size bags along the named axis ``over`` of ``tokens`` (whether
  ``over`` is one of its axes is checked by `bag_layout`).

  Raises:
    TypeError: for tokens that are not a NamedArray, non-integer ids, or
      non-floating weights.
    ValueError: if the weights' axes differ from the tokens'.
  """
  if not isinstance(tokens, pz.nx.NamedArrayBase):
    shape = tuple(getattr(tokens, "shape", np.shape(tokens)))
    raise TypeError(
      f"named_embed.{caller}: fixed-size bags need `tokens` as a NamedArray"
      f" with the axis `over`={over!r}; got {type(tokens).__name__} of shape"
      f" {shape}. Name its axes, e.g. `pz.nx.wrap(ids).tag('batch',"
      f" {over!r})`, or pass flat ids with `offsets=`."
    )
  ids, named = named_arrays.split_tokens(tokens)
  if weights is not None:
    weights = _fixed_weights(weights, ids, named, caller)
  layout = ("fixed", over, tuple(named.items()), tuple(ids.shape))
  return Bags(ids, weights, None, None, layout)


def _fixed_weights(weights, ids, named, caller: str):
  """``weights`` as a raw array in the layout of the raw ``ids``."""
  if isinstance(weights, pz.nx.NamedArrayBase):
    prefix = named_arrays.as_prefix_layout(weights)
    positional = ids.shape[: ids.ndim - len(named)]
    if (
      dict(prefix.named_shape) != dict(named)
      or prefix.positional_shape != positional
    ):
      raise ValueError(
        f"named_embed.{caller}: `weights` must have the axes of `tokens`"
        f" (named {dict(named)}, positional {positional}); got named"
        f" {dict(prefix.named_shape)}, positional {prefix.positional_shape}."
      )
    weights = prefix.order_as(*named).data_array
  elif tuple(np.shape(weights)) != tuple(ids.shape):
    raise ValueError(
      f"named_embed.{caller}: `weights` as a plain array must have the"
      f" shape of the tokens' data {tuple(ids.shape)} (positional axes"
      f" first, then {list(named)}); got shape {tuple(np.shape(weights))}."
      " Pass a NamedArray to align them by name."
    )
  return _float_weights(weights)


def _float_weights(weights):
  if not hasattr(weights, "dtype"):
    weights = np.asarray(weights)
  if not jax.numpy.issubdtype(weights.dtype, jax.numpy.floating):
    raise TypeError(
      f"`weights` must be floating (one weight per member), got dtype"
      f" {weights.dtype}."
    )
  return weights


def ragged_bags(
  ids: Any,
  offsets: Any,
  weights: Any,
  include_last_offset: bool,
  bag_axis: str,
  caller: str,
) -> Bags:
  """Ragged bags: flat ``ids`` cut at ``offsets`` (torch's layout).

  Raises:
    TypeError: for non-integer ids or offsets, non-floating weights.
    ValueError: for named tokens, ids or offsets that are not 1-D, weights
      of another shape, or bad concrete offsets (see `check_offsets`).
  """
  if isinstance(ids, pz.nx.NamedArrayBase) and ids.named_shape:
    raise ValueError(
      f"named_embed.{caller}: `offsets` takes flat ids (a 1-D array); got"
      f" `tokens` with named axes {dict(ids.named_shape)}. For fixed-size"
      " bags along a named axis, drop `offsets` and pass `over=`."
    )
  if isinstance(ids, pz.nx.NamedArrayBase):
    ids = named_arrays.as_prefix_layout(ids).data_array
  ids, _ = named_arrays.split_tokens(ids)
  if ids.ndim != 1:
    raise ValueError(
      f"named_embed.{caller}: with `offsets`, `tokens` must be flat ids (a"
      f" 1-D array); got shape {tuple(ids.shape)}. Flatten them, or pass"
      " fixed-size bags as a NamedArray with `over=`."
    )
  offsets = _offsets_array(offsets)
  num_bags = offsets.shape[0] - int(include_last_offset)
  checked = None
  if not isinstance(offsets, jax.core.Tracer):
    check_offsets(np.asarray(offsets), ids.shape[0], include_last_offset)
    if include_last_offset:
      checked = np.arange(ids.shape[0]) < int(offsets[-1])
  if weights is not None:
    if isinstance(weights, pz.nx.NamedArrayBase):
      weights = named_arrays.as_prefix_layout(weights).data_array
    weights = _float_weights(weights)
    if tuple(weights.shape) != tuple(ids.shape):
      raise ValueError(
        f"named_embed.{caller}: `weights` must have the shape of the flat"
        f" ids {tuple(ids.shape)}; got {tuple(weights.shape)}."
      )
  layout = ("ragged", bag_axis, num_bags, bool(include_last_offset))
  return Bags(ids, weights, offsets, checked, layout)


def admit_ids(bags: Bags, policy: str, vocab_size: int) -> tuple[Bags, bool]:
  """``bags`` with ids ready for the kernel, and whether ``"error"`` checks
  them at run time (`named_embed._src.base.range_policy.admit_ids`; ids after the
  last offset are in no bag and exempt).

  Raises:
    IndexError: under ``"error"``, for concrete out-of-range ids in a bag.
  """
  # With traced offsets, which ids are in a bag is known at run time only.
  runtime = policy == "error" and isinstance(bags.offsets, jax.core.Tracer)
  ids, runtime_check = range_policy.admit_ids(
    bags.ids, policy, vocab_size, bags.checked, runtime
  )
  return bags._replace(ids=ids), runtime_check


def _offsets_array(offsets: Any):
  if not hasattr(offsets, "dtype"):
    offsets = np.asarray(offsets)
    if offsets.size == 0:
      offsets = offsets.astype(np.int32)
  if np.dtype(offsets.dtype).kind not in "iu":
    raise TypeError(
      f"`offsets` must hold integer positions, got dtype {offsets.dtype}."
    )
  if offsets.ndim != 1:
    raise ValueError(
      f"`offsets` must be a 1-D array (where each bag starts), got shape"
      f" {tuple(offsets.shape)}."
    )
  return offsets


def check_offsets(
  offsets: np.ndarray, num_ids: int, include_last_offset: bool
) -> None:
  """Raises `ValueError` naming the first bad offset.

  Offsets must start at 0, be non-decreasing and not exceed the number of
  ids; with ``include_last_offset`` there must be at least one (the end of
  the last bag).

  >>> check_offsets(np.array([0, 3, 2]), 5, False)
  Traceback (most recent call last):
    ...
  ValueError: `offsets` must be non-decreasing: offsets[2] = 2 is less than offsets[1] = 3.
  """
  if include_last_offset and offsets.size == 0:
    raise ValueError(
      "`offsets` is empty, but include_last_offset=True needs at least one"
      " offset: the end of the last bag."
    )
  if offsets.size and offsets[0] != 0:
    raise ValueError(
      f"`offsets` must start at 0 (the first bag starts at the first id);"
      f" got offsets[0] = {offsets[0]}."
    )
  drops = np.flatnonzero(np.diff(offsets.astype(np.int64)) < 0)
  if drops.size:
    i = int(drops[0]) + 1
    raise ValueError(
      f"`offsets` must be non-decreasing: offsets[{i}] = {offsets[i]} is"
      f" less than offsets[{i - 1}] = {offsets[i - 1]}."
    )
  beyond = np.flatnonzero(offsets.astype(np.int64) > num_ids)
  if beyond.size:
    i = int(beyond[0])
    raise ValueError(
      f"`offsets` must not exceed the number of ids, {num_ids}: offsets[{i}]"
      f" = {offsets[i]}."
    )
