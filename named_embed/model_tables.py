"""Finding and replacing the tables a model holds: `replace_table`."""

from __future__ import annotations

import collections
import functools
from typing import TypeVar

from penzai import pz

from named_embed import _table_arrays
from named_embed.table import EmbeddingTable

Model = TypeVar("Model")


def replace_table(
  model: Model, table: EmbeddingTable, new_table: EmbeddingTable
) -> Model:
  """Puts ``new_table`` wherever ``model`` holds ``table``.

  Tables are matched by what they hold: a trainable table by its
  `pz.Parameter` object (every layer that shares the parameter, as tied
  layers do), a `pz.ParameterValue` or unbound slot by its label, and a
  frozen table by identity (the same table object, or the same array).
  Every match gets the one ``new_table`` object, so a tied model stays tied
  (one parameter) and an untied model keeps its other tables.

  Args:
    model: Any pytree: a penzai model, a list of layers, a table.
    table: The table the model holds now.
    new_table: Its replacement, e.g. ``table.with_added_tokens([...])``.

  Raises:
    TypeError: if ``table`` or ``new_table`` is not an `EmbeddingTable`.
    ValueError: if no table of ``model`` matches ``table`` (the message
      lists the tables it holds).

  Example:

  >>> import jax, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=4,
  ...     embedding_axes={"embedding": 3})
  >>> model = pz.nn.Sequential([ne.EmbeddingLookup(table),
  ...                           ne.EmbeddingDecode(table)])
  >>> model = ne.replace_table(model, table, table.resized(6))
  >>> [(p.label, p.value.named_shape["vocabulary"])
  ...  for p in pz.unbind_params(model)[1]]
  [('embed.embeddings', 6)]
  """
  for name, value in (("table", table), ("new_table", new_table)):
    if not isinstance(value, EmbeddingTable):
      raise TypeError(
        f"replace_table: `{name}` must be an EmbeddingTable, got"
        f" {type(value).__name__}."
      )
  selection = (
    pz.select(model)
    .at_instances_of(EmbeddingTable)
    .where(functools.partial(_holds_same, table))
  )
  if selection.count() == 0:
    found = pz.select(model).at_instances_of(EmbeddingTable).get_sequence()
    held = collections.Counter(_describe(t) for t in found)
    listing = "; ".join(
      d if n == 1 else f"{d} (in {n} places)" for d, n in held.items()
    )
    raise ValueError(
      f"replace_table: no table of the model matches {_describe(table)}."
      f" It holds: {listing or 'no table'}. Trainable tables"
      " are matched by their Parameter object (a new Parameter with the same"
      " label is another parameter), frozen ones by identity: pass the table"
      " object the model holds, e.g. `model.sublayers[0].table`."
    )
  return selection.set(new_table)


def _holds_same(table: EmbeddingTable, candidate: EmbeddingTable) -> bool:
  if candidate is table:
    return True
  mine, theirs = table.embeddings, candidate.embeddings
  kind = _table_arrays.holder_kind(mine)
  if kind in ("parameter", "array"):
    return theirs is mine
  return _table_arrays.holder_kind(theirs) == kind and theirs.label == getattr(
    mine, "label", None
  )


def _describe(table: EmbeddingTable) -> str:
  kind = _table_arrays.holder_kind(table.embeddings)
  label = getattr(table.embeddings, "label", None)
  if kind == "array":
    shape = dict(table.value.named_shape)
    return f"a frozen table {shape}"
  return f"a table holding a {kind.replace('_', ' ')} labelled {label!r}"
