"""Growing, shrinking and re-tying vocabularies (docs/vocabularies.md).

`add_tokens` (`EmbeddingTable.with_added_tokens`) and `resize`
(`EmbeddingTable.resized`) return a new table, eagerly (not under
`jax.jit`: shapes change); `named_embed.replace_table` (`model_tables`) puts it in every
layer of a model that held the old one. Old token rows are copied bit for bit; new
rows are initialised (by default at the float32 mean of the token rows,
the pad row left out); sizes count tokens, never alignment rows, which new
tokens fill first; the pad row and special tokens are never dropped
silently; the holder (parameter and label, frozen array) and the sharding
are kept.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from penzai import pz

from named_embed._src.base import quantization, validation
from named_embed._src.base.mesh_layout import mesh_axes
from named_embed._src.base.vocabulary import SPECIAL_ROLES, Vocabulary
from named_embed._src.rows import table_arrays
from named_embed._src.tables import lora
from named_embed._src.tables.lora import LoraTable
from named_embed._src.tables.quantized import QuantizedTable
from named_embed._src.tables.table import EmbeddingTable
from named_embed._src.tables.trainable_rows import TrainableRowsTable
from named_embed._src.tools.new_rows import (
  Init,
  new_rows,
  source_token_stats,
  token_stats,
)

MAX_INFERRED_MULTIPLE = 128
"""The largest row multiple `row_multiple` infers (Megatron-LM's default)."""


def add_tokens(
  table: EmbeddingTable,
  tokens: Iterable[str],
  init: Init = "mean",
  *,
  key: jax.Array | None = None,
  roles: Mapping[str, str] | None = None,
  pad_to_multiple: int | None = None,
) -> EmbeddingTable:
  """``table`` with ``tokens`` appended to its vocabulary (ids after the old
  ones, alignment rows filled first); see `EmbeddingTable.with_added_tokens`.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  ... ).with_vocabulary(ne.Vocabulary(["a", "b"]))
  >>> bigger = resizing.add_tokens(table, ["<tool>"])
  >>> bigger.vocabulary.id("<tool>"), bigger.rows_array()[2].tolist()
  (2, [2.0, 3.0])
  """
  _check_table(table, "with_added_tokens")
  vocabulary = _vocabulary_with(table, tokens, roles)
  if vocabulary == table.vocabulary:
    return table
  embeddings, true_size = _resized_rows(
    table, len(vocabulary), init, key, pad_to_multiple
  )
  return dataclasses.replace(
    table,
    embeddings=embeddings,
    true_vocab_size=true_size,
    vocabulary=vocabulary,
    padding_index=_padding_with(table, vocabulary),
  )


def resize(
  table: EmbeddingTable,
  vocab_size: int,
  init: Init = "mean",
  *,
  key: jax.Array | None = None,
  pad_to_multiple: int | None = None,
) -> EmbeddingTable:
  """``table`` with its first ``vocab_size`` tokens, or with rows appended;
  see `EmbeddingTable.resized`.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> resizing.resize(table, 5, "zeros").rows_array().tolist()[3:]
  [[0.0, 0.0], [0.0, 0.0]]
  """
  _check_table(table, "resized")
  vocab_size, vocabulary = _vocabulary_of_size(table, vocab_size)
  embeddings, true_size = _resized_rows(
    table, vocab_size, init, key, pad_to_multiple
  )
  return dataclasses.replace(
    table,
    embeddings=embeddings,
    true_vocab_size=true_size,
    vocabulary=vocabulary,
  )


# ---------------------------------------------------- the other kinds


def add_tokens_quantized(
  table: QuantizedTable,
  tokens: Iterable[str],
  init: Init = "mean",
  *,
  key: jax.Array | None = None,
  roles: Mapping[str, str] | None = None,
  pad_to_multiple: int | None = None,
) -> QuantizedTable:
  """`add_tokens` of a `QuantizedTable` (`QuantizedTable.with_added_tokens`):
  old codes and scales kept bit for bit; the new rows made in float by
  ``init`` (``"mean"`` and ``"normal"`` from the dequantised token rows,
  read chunk by chunk) and quantised with the table's scheme and groups.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> q = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  ... ).with_vocabulary(ne.Vocabulary(["a", "b"])).quantized()
  >>> bigger = resizing.add_tokens_quantized(q, ["<tool>"])
  >>> bigger.dequantized().rows_array()[2].round(2).tolist()
  [2.0, 3.0]
  """
  vocabulary = _vocabulary_with(table, tokens, roles)
  if vocabulary == table.vocabulary:
    return table
  codes, scales, true_size = _resized_codes(
    table, len(vocabulary), init, key, pad_to_multiple
  )
  return dataclasses.replace(
    table,
    codes=codes,
    scales=scales,
    true_vocab_size=true_size,
    vocabulary=vocabulary,
    padding_index=_padding_with(table, vocabulary),
  )


def resize_quantized(
  table: QuantizedTable,
  vocab_size: int,
  init: Init = "mean",
  *,
  key: jax.Array | None = None,
  pad_to_multiple: int | None = None,
) -> QuantizedTable:
  """`resize` of a `QuantizedTable` (`QuantizedTable.resized`); new rows
  as in `add_tokens_quantized`.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> q = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32)
  ...     ).quantized("int4")
  >>> resizing.resize_quantized(q, 5, "zeros").dequantized().rows_array(
  ...     ).tolist()[2:]
  [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
  """
  vocab_size, vocabulary = _vocabulary_of_size(table, vocab_size)
  codes, scales, true_size = _resized_codes(
    table, vocab_size, init, key, pad_to_multiple
  )
  return dataclasses.replace(
    table,
    codes=codes,
    scales=scales,
    true_vocab_size=true_size,
    vocabulary=vocabulary,
  )


def add_tokens_lora(
  table: LoraTable, tokens: Iterable[str], init: Init = "mean", **options
) -> LoraTable:
  """`LoraTable.with_added_tokens`: the base grows by its own
  ``with_added_tokens`` (``options``: ``key``, ``roles``,
  ``pad_to_multiple``), then ``A`` follows it (`lora_over`).

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> lora = ne.EmbeddingTable.from_pretrained(np.ones((2, 2), np.float32)
  ...     ).with_vocabulary(ne.Vocabulary(["a", "b"])).with_lora(
  ...     1, name="e", init_base_rng=jax.random.key(0))
  >>> resizing.add_tokens_lora(lora, ["c"]).lora_a.value.named_shape
  {'vocabulary': 3, 'rank': 1}
  """
  return lora_over(table, table.base.with_added_tokens(tokens, init, **options))


def resize_lora(
  table: LoraTable, vocab_size: int, init: Init = "mean", **options
) -> LoraTable:
  """`LoraTable.resized`: the base resized by its own ``resized``, then
  ``A`` follows it (`lora_over`).

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> lora = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32)
  ...     ).with_lora(1, name="e", init_base_rng=jax.random.key(0))
  >>> resizing.resize_lora(lora, 2).num_rows
  2
  """
  return lora_over(table, table.base.resized(vocab_size, init, **options))


def add_tokens_trainable_rows(
  table: TrainableRowsTable,
  tokens: Iterable[str],
  init: Init = "mean",
  **options,
) -> TrainableRowsTable:
  """`TrainableRowsTable.with_added_tokens`: the base grows by its own
  ``with_added_tokens``; the trained rows and their ids are kept (the new
  tokens are frozen base rows).

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> rows = ne.EmbeddingTable.from_pretrained(np.ones((2, 2), np.float32)
  ...     ).with_vocabulary(ne.Vocabulary(["a", "b"])).with_trainable_rows(
  ...     ["b"], name="e")
  >>> grown = resizing.add_tokens_trainable_rows(rows, ["c"])
  >>> grown.vocab_size, grown.row_ids
  (3, (1,))
  """
  base = table.base.with_added_tokens(tokens, init, **options)
  return dataclasses.replace(table, base=base)


def resize_trainable_rows(
  table: TrainableRowsTable, vocab_size: int, init: Init = "mean", **options
) -> TrainableRowsTable:
  """`TrainableRowsTable.resized`: the base resized by its own
  ``resized``; a shrink that would drop a trained row raises `ValueError`
  (`check_trained_rows_kept`).

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> rows = ne.EmbeddingTable.from_pretrained(np.ones((5, 2), np.float32)
  ...     ).with_trainable_rows([1], name="e")
  >>> resizing.resize_trainable_rows(rows, 3).vocab_size
  3
  """
  check_trained_rows_kept(
    table, validation.check_positive_int("vocab_size", vocab_size)
  )
  base = table.base.resized(vocab_size, init, **options)
  return dataclasses.replace(table, base=base)


def lora_over(table: LoraTable, base: Any) -> LoraTable:
  """``table``'s adapters over ``base``, ``table.base`` resized: ``A``'s
  rows of the tokens kept are kept bit for bit, those of new tokens are
  zero (their rows read as the base's), the alignment rows kept or zero;
  ``B``, the labels and the placement are kept.

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> lora = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32)
  ...     ).with_lora(1, name="e", init_base_rng=jax.random.key(0))
  >>> grown = resizing.lora_over(lora, lora.base.resized(5, "zeros"))
  >>> grown.lora_a.value.named_shape, grown.lora_a.label
  ({'vocabulary': 5, 'rank': 1}, 'e.lora_a')
  """
  a = table_arrays.value_or_none(table.lora_a)
  if a is None:
    raise ValueError(
      "Resizing a LoraTable needs its adapters bound; `lora_a` is an"
      f" unbound {type(table.lora_a).__name__}."
    )
  names = (table.vocabulary_axis, lora.RANK_AXIS)
  rows = a.order_as(*names).data_array
  plan = _Plan.between(table, base)
  grown = plan.grow(rows, jnp.zeros((plan.count, rows.shape[1]), rows.dtype))
  value = pz.nx.wrap(grown, *names)
  return dataclasses.replace(
    table, base=base, lora_a=table_arrays.held_like(table.lora_a, value)
  )


def check_trained_rows_kept(table: TrainableRowsTable, vocab_size: int):
  """Raises `ValueError` if resizing ``table`` to ``vocab_size`` tokens
  would drop some of its trained rows (named).

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> rows = ne.EmbeddingTable.from_pretrained(np.ones((6, 2), np.float32)
  ...     ).with_trainable_rows([1, 5], name="e")
  >>> resizing.check_trained_rows_kept(rows, 4)
  Traceback (most recent call last):
  ...
  ValueError: resized(4) would drop the trained rows [5] of this TrainableRowsTable (its rows train ids (1, 5)). Keep at least 6 tokens, or merge first: `table.merged().resized(4)`.
  """
  dropped = [i for i in table.row_ids if i >= vocab_size]
  if dropped:
    raise ValueError(
      f"resized({vocab_size}) would drop the trained rows {dropped} of this"
      f" TrainableRowsTable (its rows train ids {table.row_ids}). Keep at"
      f" least {max(dropped) + 1} tokens, or merge first:"
      f" `table.merged().resized({vocab_size})`."
    )


def _vocabulary_with(table: Any, tokens: Any, roles: Any) -> Vocabulary:
  """The vocabulary of ``table`` with ``tokens`` added (checked)."""
  tokens = _check_new_tokens(table, tokens)
  return _extended_vocabulary(table.vocabulary, tokens, roles)


def _padding_with(table: Any, vocabulary: Vocabulary) -> int | None:
  if table.padding_index is None:
    return vocabulary.pad_id
  return table.padding_index


def _vocabulary_of_size(table: Any, vocab_size: int):
  """``(vocab_size, vocabulary)`` of ``table`` resized (checked)."""
  vocab_size = validation.check_positive_int("vocab_size", vocab_size)
  old = table.vocab_size
  vocabulary = table.vocabulary
  if vocab_size > old and vocabulary is not None:
    raise ValueError(
      f"resized({vocab_size}): this table has a vocabulary of {old} tokens,"
      f" and the {vocab_size - old} new rows would have none. Name them:"
      " `table.with_added_tokens([...])`, or detach the vocabulary first:"
      f" `table.with_vocabulary(None).resized({vocab_size})`."
    )
  if vocab_size < old:
    _check_nothing_special_dropped(table, vocab_size)
    if vocabulary is not None:
      vocabulary = Vocabulary(
        vocabulary.tokens[:vocab_size], **vocabulary.roles
      )
  return vocab_size, vocabulary


def row_multiple(
  table: EmbeddingTable,
  sharding: NamedSharding | None = None,
  pad_to_multiple: int | None = None,
) -> int:
  """The multiple the row count of a resized ``table`` is kept at.

  ``pad_to_multiple`` if given. Else, for a table with alignment rows, the
  largest power of two up to `MAX_INFERRED_MULTIPLE` that divides its row
  count (64 for Gemma 3's 262,208 rows): the multiple is not recorded, and
  checkpoints align to powers of two, so the guess may overshoot but never
  undershoots one up to 128. Else 1. Always a multiple of the devices that
  split the vocabulary axis (``sharding``), so the result divides the mesh.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import resizing
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((13, 2), np.float32))
  >>> aligned = table.padded_to_multiple(8)  # 16 rows: 3 alignment rows
  >>> resizing.row_multiple(table), resizing.row_multiple(aligned)
  (1, 16)
  >>> resizing.row_multiple(aligned, None, 8)
  8
  """
  if pad_to_multiple is not None:
    multiple = validation.check_positive_int("pad_to_multiple", pad_to_multiple)
  elif table.true_vocab_size is not None:
    rows = table.num_rows
    multiple = min(rows & -rows, MAX_INFERRED_MULTIPLE)
  else:
    multiple = 1
  if sharding is not None and len(sharding.spec):
    axes = mesh_axes(sharding.spec[0])
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    multiple = math.lcm(multiple, shards)
  return multiple


# ------------------------------------------------------------------ checks


def _check_table(table: Any, method: str) -> None:
  if not isinstance(table, EmbeddingTable):
    raise TypeError(
      f"{method}: expected an EmbeddingTable, got {type(table).__name__}."
    )


def _check_new_tokens(table: EmbeddingTable, tokens: Any) -> tuple[str, ...]:
  vocabulary = table.vocabulary
  if vocabulary is None:
    raise ValueError(
      "with_added_tokens: this table has no vocabulary, so it cannot take"
      " tokens. Add rows without tokens with `table.resized(n)`, or attach"
      " a vocabulary first with `table.with_vocabulary(...)`."
    )
  if isinstance(tokens, str) or not isinstance(tokens, Iterable):
    raise TypeError(
      f"`tokens` must be a list of strings, got {tokens!r}; for one token,"
      f" write [{tokens!r}]."
    )
  tokens = tuple(tokens)
  for token in tokens:
    if not isinstance(token, str):
      raise TypeError(f"`tokens` must be strings, got {token!r}.")
  present = [
    f"{t!r} (row {vocabulary.id(t)})" for t in tokens if t in vocabulary
  ]
  if present:
    verb = "is" if len(present) == 1 else "are"
    raise ValueError(
      f"Added tokens must be new, but {', '.join(present)} {verb} already in"
      f" the vocabulary of {len(vocabulary)} tokens."
    )
  counts = collections.Counter(tokens)
  repeated = [f"{t!r} ({n} times)" for t, n in counts.items() if n > 1]
  if repeated:
    raise ValueError(
      "Added tokens must be distinct, but `tokens` repeats"
      f" {', '.join(repeated)}."
    )
  return tokens


def _extended_vocabulary(
  vocabulary: Vocabulary, tokens: tuple[str, ...], roles: Any
) -> Vocabulary:
  """``vocabulary`` with ``tokens`` appended and the new ``roles`` set."""
  roles = {} if roles is None else roles
  if not isinstance(roles, Mapping):
    raise TypeError(
      f"`roles` must map roles to tokens, e.g. {{'pad': '<pad>'}}; got"
      f" {roles!r}."
    )
  merged = vocabulary.roles
  for role, token in roles.items():
    if role not in SPECIAL_ROLES:
      raise ValueError(
        f"`roles` has an unknown role {role!r}; the roles are {SPECIAL_ROLES}."
      )
    if role in merged and merged[role] != token:
      raise ValueError(
        f"The vocabulary's {role} token is already {merged[role]!r}; it"
        f" cannot become {token!r}."
      )
    merged[role] = token
  try:
    return Vocabulary((*vocabulary.tokens, *tokens), **merged)
  except ValueError as error:
    raise ValueError(f"`roles`: {error}") from None


def _check_nothing_special_dropped(table: EmbeddingTable, size: int) -> None:
  vocabulary = table.vocabulary
  roles = {} if vocabulary is None else vocabulary.roles
  pad = table.padding_index
  dropped = []  # (row, what)
  if pad is not None and pad >= size and "pad" not in roles:
    dropped.append((pad, f"the pad row {pad}"))
  for role, token in roles.items():
    row = vocabulary.id(token)
    if row >= size:
      dropped.append((row, f"the {role} token {token!r} (row {row})"))
  if dropped:
    raise ValueError(
      f"resized({size}) would drop {' and '.join(w for _, w in dropped)}; a"
      " resize never drops the pad row or a special token silently. Keep at"
      f" least {max(r for r, _ in dropped) + 1} tokens, or take the role off"
      " first (a new Vocabulary without it, and `dataclasses.replace(table,"
      " padding_index=None)`)."
    )


# -------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Where the rows of a resized table come from: rows ``[0, keep)`` kept,
  ``count`` new ones, then alignment rows up to ``num_rows``: the old ones
  ``[start, stop)`` that remain (``aligned``), zeros elsewhere."""

  keep: int
  count: int
  aligned: tuple[int, int]
  num_rows: int

  @classmethod
  def of(cls, old_tokens: int, old_rows: int, tokens: int, rows: int):
    keep = min(old_tokens, tokens)
    aligned = (max(old_tokens, tokens), min(old_rows, rows))
    return cls(keep, tokens - keep, aligned, rows)

  @classmethod
  def between(cls, old: Any, new: Any) -> _Plan:
    """The plan that made table ``new`` from table ``old``."""
    return cls.of(old.vocab_size, old.num_rows, new.vocab_size, new.num_rows)

  def grow(self, array: jax.Array, fill: jax.Array, sharding=None):
    """``array`` (rows first) resized by this plan, ``fill`` its new rows,
    placed like ``array`` (its own `NamedSharding`, else ``sharding``)."""
    own = getattr(array, "sharding", None)
    sharding = own if isinstance(own, NamedSharding) else sharding
    work, work_sharding = _auto_view(array, sharding)
    if work_sharding is not None:  # the new rows, replicated on that mesh
      fill = jax.device_put(
        fill, NamedSharding(work_sharding.mesh, PartitionSpec())
      )
    assemble = functools.partial(
      _assemble, keep=self.keep, aligned=self.aligned, num_rows=self.num_rows
    )
    out = jax.jit(assemble, out_shardings=work_sharding)(work, fill)
    if sharding is not None:
      out = jax.device_put(out, sharding)  # Explicit again: no copy
    return out


def _sizes(table: Any, sharding, vocab_size: int, pad_to_multiple):
  """``(plan, true_vocab_size)`` of ``table`` resized to ``vocab_size``
  tokens, or None when nothing changes."""
  multiple = row_multiple(table, sharding, pad_to_multiple)
  num_rows = -(-vocab_size // multiple) * multiple
  if vocab_size == table.vocab_size and num_rows == table.num_rows:
    return None, table.true_vocab_size
  plan = _Plan.of(table.vocab_size, table.num_rows, vocab_size, num_rows)
  return plan, (vocab_size if num_rows > vocab_size else None)


def _resized_rows(
  table: EmbeddingTable,
  vocab_size: int,
  init: Init,
  key: jax.Array | None,
  pad_to_multiple: int | None,
) -> tuple[Any, int | None]:
  """The new ``embeddings`` holder and ``true_vocab_size`` of a table with
  ``vocab_size`` tokens: old token rows kept, new ones initialised,
  alignment rows up to the multiple, placed like the old rows."""
  rows, axes = table.rows_and_axes()
  sharding = _named_sharding(table, rows)
  plan, true_size = _sizes(table, sharding, vocab_size, pad_to_multiple)
  count = 0 if plan is None else plan.count
  work, _ = _auto_view(rows, sharding)
  stats = functools.partial(
    token_stats, work, table.vocab_size, table.padding_index
  )
  fill = new_rows(
    table, rows.shape[1:], rows.dtype, count, init, key, stats
  )  # with no plan: still checks `init`
  if plan is None:
    return table.embeddings, true_size
  value = pz.nx.wrap(
    plan.grow(rows, fill, sharding), table.vocabulary_axis, *axes
  )
  return table_arrays.held_like(table.embeddings, value), true_size


def _resized_codes(
  table: QuantizedTable,
  vocab_size: int,
  init: Init,
  key: jax.Array | None,
  pad_to_multiple: int | None,
):
  """``(codes, scales, true_vocab_size)`` of a quantised table with
  ``vocab_size`` tokens: old codes and scales kept, new rows quantised."""
  source, (codes, scales) = table.row_parts()
  sharding = _named_sharding(table, codes)
  plan, true_size = _sizes(table, sharding, vocab_size, pad_to_multiple)
  count = 0 if plan is None else plan.count
  stats = functools.partial(source_token_stats, table)
  fill = new_rows(
    table, source.row_shape, source.dtype, count, init, key, stats
  )
  if plan is None:
    return table.codes, table.scales, true_size
  quantization.check_finite(fill)
  if plan.count:
    fill_codes, fill_scales = _quantized_rows(
      fill, source.bits, source.group_size
    )
  else:  # nothing to quantise (quantising no rows divides by zero)
    fill_codes = jnp.zeros((0, *codes.shape[1:]), codes.dtype)
    fill_scales = jnp.zeros((0, *scales.shape[1:]), scales.dtype)
  codes = plan.grow(codes, fill_codes, sharding)
  scales = plan.grow(scales, fill_scales, _lead_only(sharding, scales))
  return (
    pz.nx.wrap(codes, *table.codes.named_axes),
    pz.nx.wrap(scales, *table.scales.named_axes),
    true_size,
  )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantized_rows(rows, bits, group_size):
  return quantization.quantize(rows, bits, group_size)


def _lead_only(sharding: NamedSharding | None, array: jax.Array):
  """``sharding``'s split of the rows, for another array led by them."""
  if sharding is None or not len(sharding.spec):
    return None
  spec = PartitionSpec(sharding.spec[0], *([None] * (array.ndim - 1)))
  return NamedSharding(sharding.mesh, spec)


def _named_sharding(table: Any, rows: jax.Array):
  if table.rows_sharding is not None:
    return table.rows_sharding
  sharding = getattr(rows, "sharding", None)
  return sharding if isinstance(sharding, NamedSharding) else None


def _auto_view(rows: jax.Array, sharding: NamedSharding | None):
  """``rows`` on the same devices, typed with `Auto` mesh axes, so that
  slicing and concatenating across shards is left to GSPMD (Explicit axes
  refuse slices that shard boundaries do not divide). No data moves."""
  if sharding is None:
    return rows, None
  mesh = sharding.mesh
  auto = Mesh(
    mesh.devices,
    mesh.axis_names,
    axis_types=(AxisType.Auto,) * len(mesh.axis_names),
  )
  auto_sharding = NamedSharding(auto, sharding.spec)
  return jax.device_put(rows, auto_sharding), auto_sharding


def _assemble(rows, fill, *, keep: int, aligned: tuple[int, int], num_rows):
  """Rows ``[0, keep)`` of ``rows``, then ``fill`` (the new tokens), then
  alignment rows up to ``num_rows``: ``rows[start:stop]`` for ``aligned =
  (start, stop)`` (the old alignment rows that remain), zeros elsewhere."""
  zeros = lambda n: jnp.zeros((max(n, 0), *rows.shape[1:]), rows.dtype)  # noqa: E731
  start, stop = aligned
  parts = [rows[:keep], fill.astype(rows.dtype)]
  done = keep + fill.shape[0]
  if stop > start:
    parts += [zeros(start - done), rows[start:stop]]
    done = stop
  parts.append(zeros(num_rows - done))
  return jnp.concatenate(parts, axis=0)
