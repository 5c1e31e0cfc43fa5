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
from jax.sharding import AxisType, Mesh, NamedSharding
from penzai import pz

from named_embed import _table_arrays
from named_embed._layout import mesh_axes
from named_embed._new_rows import Init, new_rows
from named_embed._validation import check_positive_int
from named_embed.table import EmbeddingTable
from named_embed.vocabulary import SPECIAL_ROLES, Vocabulary

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
  >>> from named_embed import resizing
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  ... ).with_vocabulary(ne.Vocabulary(["a", "b"]))
  >>> bigger = resizing.add_tokens(table, ["<tool>"])
  >>> bigger.vocabulary.id("<tool>"), bigger.rows_array()[2].tolist()
  (2, [2.0, 3.0])
  """
  _check_table(table, "with_added_tokens")
  tokens = _check_new_tokens(table, tokens)
  vocabulary = _extended_vocabulary(table.vocabulary, tokens, roles)
  if vocabulary == table.vocabulary:
    return table
  embeddings, true_size = _resized_rows(
    table, len(vocabulary), init, key, pad_to_multiple
  )
  padding_index = table.padding_index
  if padding_index is None:
    padding_index = vocabulary.pad_id
  return dataclasses.replace(
    table,
    embeddings=embeddings,
    true_vocab_size=true_size,
    vocabulary=vocabulary,
    padding_index=padding_index,
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
  >>> from named_embed import resizing
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> resizing.resize(table, 5, "zeros").rows_array().tolist()[3:]
  [[0.0, 0.0], [0.0, 0.0]]
  """
  _check_table(table, "resized")
  vocab_size = check_positive_int("vocab_size", vocab_size)
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
  embeddings, true_size = _resized_rows(
    table, vocab_size, init, key, pad_to_multiple
  )
  return dataclasses.replace(
    table,
    embeddings=embeddings,
    true_vocab_size=true_size,
    vocabulary=vocabulary,
  )


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
  >>> from named_embed import resizing
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((13, 2), np.float32))
  >>> aligned = table.padded_to_multiple(8)  # 16 rows: 3 alignment rows
  >>> resizing.row_multiple(table), resizing.row_multiple(aligned)
  (1, 16)
  >>> resizing.row_multiple(aligned, None, 8)
  8
  """
  if pad_to_multiple is not None:
    multiple = check_positive_int("pad_to_multiple", pad_to_multiple)
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
  multiple = row_multiple(table, sharding, pad_to_multiple)
  num_rows = -(-vocab_size // multiple) * multiple
  old = table.vocab_size
  if vocab_size == old and num_rows == rows.shape[0]:
    new_rows(table, rows, 0, init, key)  # still checks `init`
    return table.embeddings, table.true_vocab_size
  keep = min(old, vocab_size)
  work, work_sharding = _auto_view(rows, sharding)
  fill = new_rows(table, work, vocab_size - keep, init, key)
  # Rows past the tokens: the old alignment rows that remain, as they were;
  # zeros for the rest (dropped tokens, rows added for the multiple).
  aligned = (max(old, vocab_size), min(rows.shape[0], num_rows))
  assemble = functools.partial(
    _assemble, keep=keep, aligned=aligned, num_rows=num_rows
  )
  assembled = jax.jit(assemble, out_shardings=work_sharding)(work, fill)
  if sharding is not None:
    assembled = jax.device_put(assembled, sharding)  # Explicit again: no copy
  value = pz.nx.wrap(assembled, table.vocabulary_axis, *axes)
  true_size = vocab_size if num_rows > vocab_size else None
  return _table_arrays.held_like(table.embeddings, value), true_size


def _named_sharding(table: EmbeddingTable, rows: jax.Array):
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
  parts = [rows[:keep], fill]
  done = keep + fill.shape[0]
  if stop > start:
    parts += [zeros(start - done), rows[start:stop]]
    done = stop
  parts.append(zeros(num_rows - done))
  return jnp.concatenate(parts, axis=0)
