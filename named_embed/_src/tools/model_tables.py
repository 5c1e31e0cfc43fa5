"""Finding and replacing the tables a model holds: `replace_table`."""

from __future__ import annotations

import collections
import functools
from typing import TypeVar

import jax
from penzai import pz

from named_embed._src.rows import table_arrays
from named_embed._src.tables import contract

Model = TypeVar("Model")


def replace_table(
  model: Model,
  table: contract.AbstractTable,
  new_table: contract.AbstractTable,
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
    TypeError: if ``table`` or ``new_table`` is not a table (of any kind:
      float, quantised, LoRA, trainable rows).
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
    contract.check_table(value, "replace_table", name)
  selection = (
    pz.select(model)
    .at_instances_of(contract.AbstractTable)
    .where(functools.partial(_holds_same, table))
  )
  if selection.count() == 0:
    found = (
      pz.select(model).at_instances_of(contract.AbstractTable).get_sequence()
    )
    held = collections.Counter(_describe(t) for t in found)
    listing = "; ".join(
      d if n == 1 else f"{d} (in {n} places)" for d, n in held.items()
    )
    raise ValueError(
      f"replace_table: no table of the model matches {_describe(table)}."
      f" It holds: {listing or 'no table'}. Trainable tables"
      " are matched by their Parameter objects (a new Parameter with the"
      " same label is another parameter), frozen ones by identity: pass the"
      " table object the model holds, e.g. `model.sublayers[0].table`."
    )
  return selection.set(new_table)


def _is_holder(node) -> bool:
  return isinstance(node, pz.Parameter | pz.ParameterValue | pz.ParameterSlot)


def _holders(table) -> list:
  """What a table of any kind holds: its variables and arrays, in order."""
  return jax.tree.leaves(table, is_leaf=_is_holder)


def _same_holder(mine, theirs) -> bool:
  if not _is_holder(mine):  # an array: the same array object
    return theirs is mine
  kind = table_arrays.holder_kind(mine)
  if kind == "parameter":
    return theirs is mine
  return table_arrays.holder_kind(theirs) == kind and theirs.label == getattr(
    mine, "label", None
  )


def _holds_same(table, candidate) -> bool:
  if candidate is table:
    return True
  if type(candidate) is not type(table):
    return False
  mine, theirs = _holders(table), _holders(candidate)
  return len(mine) == len(theirs) and all(
    _same_holder(a, b) for a, b in zip(mine, theirs)
  )


def _describe(table) -> str:
  name = type(table).__name__
  labels = [h.label for h in _holders(table) if _is_holder(h)]
  if not labels:
    axes = {table.vocabulary_axis: table.num_rows, **table.embedding_axes}
    return f"a frozen {name} {axes}"
  return f"a {name} holding {', '.join(map(repr, labels))}"
