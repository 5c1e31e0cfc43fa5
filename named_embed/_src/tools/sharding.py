"""Sharding by axis name: map NamedArray axis names to mesh axes.

One mapping, supplied from outside, says where each named axis lives::

  rules = {"vocabulary": "model", "batch": "data"}   # name -> mesh axis
  sharded = ne.shard(tree, mesh, rules)

Layers stay sharding-agnostic: they emit plain JAX, and JAX's own machinery
(`NamedSharding`, GSPMD, `jax.shard_map`) partitions it. A lookup on a
vocabulary-sharded table becomes a masked local gather plus one all-reduce
of the ``[tokens, embedding]`` rows; a decode computes local logits; the
fused loss combines per-shard statistics with one small all-reduce and
chunks within each shard (`named_embed._src.rows.vocab_parallel`).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from penzai import pz

from named_embed._src.base.mesh_layout import mesh_axes
from named_embed._src.rows import table_arrays
from named_embed._src.tables import contract
from named_embed._src.tables.table import EmbeddingTable

Rules = Mapping[str, "str | tuple[str, ...] | None"]
"""Where each named axis lives: axis name -> a mesh axis, a tuple of mesh
axes, or None (replicated), e.g. ``{"vocabulary": "model", "batch": "data"}``.
"""


def _check_rules(mesh: Mesh, rules: Rules) -> None:
  if not isinstance(rules, Mapping):
    raise TypeError(
      "`rules` must map axis names to mesh axes, e.g."
      f" {{'vocabulary': 'model'}}; got {type(rules).__name__}."
    )
  for name, entry in rules.items():
    for axis in mesh_axes(entry):
      if axis not in mesh.shape:
        raise ValueError(
          f"`rules` maps axis {name!r} to mesh axis {axis!r}, which is not"
          f" one of the mesh's axes {tuple(mesh.axis_names)}."
        )


_VARIABLES = pz.Parameter | pz.StateVariable
_TABLES = contract.AbstractTable
_NAMED_LEAVES = pz.nx.NamedArrayBase | _VARIABLES


def axis_names(tree: Any) -> set[str]:
  """Every axis name of the NamedArrays in ``tree`` (inside tables and
  penzai variables too), and the vocabulary axis of every table (known
  even while the table is unbound).

  >>> import numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> sorted(ne.sharding.axis_names(
  ...     [table, pz.nx.wrap(np.zeros(3)).tag("batch")]))
  ['batch', 'embedding', 'vocabulary']
  """
  names: set[str] = set()
  leaves = jax.tree.leaves(
    tree, is_leaf=lambda n: isinstance(n, _TABLES | _NAMED_LEAVES)
  )
  for leaf in leaves:
    if isinstance(leaf, _TABLES):  # its arrays, then its vocabulary axis
      inner = jax.tree.leaves(
        leaf, is_leaf=lambda n: isinstance(n, _NAMED_LEAVES)
      )
      names |= axis_names(inner) | {leaf.vocabulary_axis}
    elif isinstance(leaf, _VARIABLES):
      if isinstance(leaf.value, pz.nx.NamedArrayBase):
        names.update(leaf.value.named_shape)
    elif isinstance(leaf, pz.nx.NamedArrayBase):
      names.update(leaf.named_shape)
  return names


def _resembles(rule: str, axis: str) -> bool:
  """Whether the rule name ``rule`` looks like a misspelling of ``axis``
  (same up to case, one a prefix of the other, or nearly the same)."""
  a, b = rule.casefold(), axis.casefold()
  if min(len(a), len(b)) >= 3 and (a.startswith(b) or b.startswith(a)):
    return True
  return a == b or difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def check_rule_names(rules: Rules, names: set[str], what: str) -> None:
  """Raises ValueError for rules whose names no axis of the tree has and
  that resemble an axis name it has: a typo, which would silently leave
  that axis replicated.

  One mapping may serve a whole program (``{"vocabulary": "model",
  "batch": "data"}`` for the table and for the tokens alike, or
  ``{"batch": "data"}`` to keep a table replicated), so a rule naming no
  axis of this tree is otherwise accepted: it is meant for other arrays.

  >>> check_rule_names({"vocab": "model"}, {"vocabulary", "embedding"},
  ...                  "ne.shard")
  Traceback (most recent call last):
    ...
  ValueError: ne.shard: `rules` name ['vocab'], which no NamedArray axis of the tree has (its axis names are ['embedding', 'vocabulary']): 'vocab' looks like 'vocabulary'. Such a rule would shard nothing and leave the axis replicated. Fix the rule names (rules for axes of other arrays are fine).
  >>> check_rule_names({"vocabulary": "model", "batch": "data"},
  ...                  {"vocabulary", "embedding"}, "ne.shard")  # fine
  """
  unknown = [name for name in rules if name not in names]
  alike = {
    rule: [axis for axis in sorted(names) if _resembles(rule, axis)]
    for rule in unknown
  }
  alike = {rule: axes for rule, axes in alike.items() if axes}
  if not alike:
    return  # rules for the axes of other arrays
  hints = "; ".join(
    f"{rule!r} looks like {' or '.join(map(repr, axes))}"
    for rule, axes in alike.items()
  )
  raise ValueError(
    f"{what}: `rules` name {list(alike)}, which no NamedArray axis of the"
    f" tree has (its axis names are {sorted(names)}): {hints}. Such a rule"
    " would shard nothing and leave the axis replicated. Fix the rule"
    " names (rules for axes of other arrays are fine)."
  )


def partition_spec(
  array: pz.nx.NamedArrayBase, mesh: Mesh, rules: Rules
) -> PartitionSpec:
  """The `PartitionSpec` of ``array``'s data: positional axes unsharded,
  named axes by ``rules`` (names without a rule are replicated).

  Raises:
    ValueError: if a mesh axis would be used twice, or does not divide the
      size of the axis mapped to it (pad the table with
      `EmbeddingTable.padded_to_multiple`).

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from penzai import pz
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> x = pz.nx.wrap(np.zeros((2, 4, 3))).tag_prefix("vocabulary")
  >>> x.positional_shape  # axis 0 is named, two positional axes remain
  (4, 3)
  >>> ne.sharding.partition_spec(x, mesh, {"vocabulary": "model"})
  P('model', None, None)
  """
  _check_rules(mesh, rules)
  view = array.as_namedarrayview()
  entries: list[Any] = [None] * view.data_array.ndim
  used: dict[str, str] = {}
  for name, dim in view.data_axis_for_name.items():
    axes = mesh_axes(rules.get(name))
    for axis in axes:
      if axis in used:
        raise ValueError(
          f"Mesh axis {axis!r} is mapped to both {used[axis]!r} and"
          f" {name!r} in {dict(view.named_shape)}."
        )
      used[axis] = name
    shards = math.prod(mesh.shape[a] for a in axes)
    if view.data_array.shape[dim] % shards:
      raise ValueError(
        f"Axis {name!r} of size {view.data_array.shape[dim]} cannot be split"
        f" over mesh axes {axes} ({shards} devices). Add alignment rows up"
        " to a multiple, e.g. `table.padded_to_multiple("
        f"{shards})` or `from_config(..., pad_to_multiple={shards})`."
      )
    if axes:
      entries[dim] = axes[0] if len(axes) == 1 else axes
  return PartitionSpec(*entries)


def _place(data: jax.Array, sharding: NamedSharding) -> jax.Array:
  if isinstance(data, jax.core.Tracer):
    if AxisType.Explicit in sharding.mesh.axis_types:
      return jax.sharding.reshard(data, sharding)
    return jax.lax.with_sharding_constraint(data, sharding)
  return jax.device_put(data, sharding)


def _shard_named(array, mesh: Mesh, rules: Rules):
  sharding = NamedSharding(mesh, partition_spec(array, mesh, rules))
  return dataclasses.replace(
    array, data_array=_place(array.data_array, sharding)
  )


def _rows_sharding(table, mesh: Mesh, rules: Rules) -> NamedSharding:
  """The `NamedSharding` of a table's ``[vocabulary, *embedding]`` rows
  under ``rules`` (what `shard` records on the table)."""
  axes = {table.vocabulary_axis: table.num_rows, **table.embedding_axes}
  rows = pz.nx.NamedArray(
    named_axes=collections.OrderedDict(axes),
    data_array=jax.ShapeDtypeStruct(tuple(axes.values()), jnp.float32),
  )
  return NamedSharding(mesh, partition_spec(rows, mesh, rules))


def _shard_table(table, mesh: Mesh, rules: Rules):
  """A table of any kind: every array it holds placed by its axis names
  (rows, codes and scales, LoRA's ``A``: all lead with the vocabulary axis,
  so a vocabulary rule splits them alike), and its rows' sharding recorded
  (`AbstractTable.with_rows_sharding`)."""
  placed = jax.tree.map(
    lambda node: _shard_leaf(node, mesh, rules),
    table,
    is_leaf=lambda n: isinstance(n, _NAMED_LEAVES),
  )
  if not _is_bound(table):  # unbound slots: no rows to record
    return placed
  return placed.with_rows_sharding(_rows_sharding(table, mesh, rules))


def _is_bound(table) -> bool:
  slots = jax.tree.leaves(
    table, is_leaf=lambda n: isinstance(n, pz.ParameterSlot)
  )
  return not any(isinstance(leaf, pz.ParameterSlot) for leaf in slots)


def _shard_leaf(node, mesh: Mesh, rules: Rules):
  if isinstance(node, pz.nx.NamedArrayBase):
    return _shard_named(node, mesh, rules)
  if isinstance(node, _VARIABLES) and isinstance(
    node.value, pz.nx.NamedArrayBase
  ):
    node.value = _shard_named(node.value, mesh, rules)
  return node


def shard(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Places every NamedArray of ``tree`` on ``mesh`` by its axis names.

  Works on any pytree: a table, a penzai model, NamedArray activations.
  Outside `jax.jit` it moves data with `jax.device_put`; inside, it adds a
  sharding constraint (`jax.sharding.reshard` for Explicit mesh axes,
  `with_sharding_constraint` for Auto ones), so the same call pins
  activations and gradients by name. Tables of every kind have all their
  arrays placed by axis name (rows, int8/int4 codes and scales, LoRA's
  ``A``: all lead with the vocabulary axis, so a vocabulary rule splits
  them alike; LoRA's ``B`` and trained rows stay replicated) and record
  the sharding of their rows (`EmbeddingTable.rows_sharding`; an adapted
  table records it on its base). `pz.Parameter` values are
  updated in place (they are penzai's mutable variables), which keeps tied
  parameters tied; everything else is returned new, a node held twice (a
  frozen table shared by two layers) as one new node, so it stays tied.

  Args:
    tree: Any pytree holding NamedArrays, tables or penzai variables.
    mesh: The device mesh.
    rules: Axis name -> mesh axis name (or a tuple of them, or None). One
      mapping may serve a whole program: rules for axes that only other
      arrays have are ignored here (so ``{"batch": "data"}`` keeps a table
      replicated), unless the name resembles an axis of ``tree``.

  Returns:
    The tree with its arrays placed.

  Raises:
    ValueError: for a rule naming a mesh axis the mesh lacks, a mesh axis
      that does not divide its axis or is used twice in one array, and a
      rule naming no axis of the tree but resembling one of its axis names
      (a typo, ``"vocab"`` for ``"vocabulary"``, which would leave that
      axis replicated; the message names the unknown rules and the tree's
      axis names).
    TypeError: for ``rules`` that are not a mapping.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> table = ne.shard(table, mesh, {"vocabulary": "model"})
  >>> table.rows_array().sharding.spec
  P('model', None)
  """
  _check_rules(mesh, rules)
  check_rule_names(rules, axis_names(tree), "ne.shard")

  placed: dict[int, tuple[Any, Any]] = {}  # id -> (node, placed node)

  def visit(node):
    # A node held twice (a frozen table used by a lookup and a decode) is
    # placed once and stays one object: ties survive, memory is not doubled.
    seen = placed.get(id(node))
    if seen is not None and seen[0] is node:
      return seen[1]
    if isinstance(node, _TABLES):
      result = _shard_table(node, mesh, rules)
    else:
      result = _shard_leaf(node, mesh, rules)
    placed[id(node)] = (node, result)
    return result

  def is_leaf(node):
    return isinstance(node, _TABLES | _NAMED_LEAVES)

  return jax.tree.map(visit, tree, is_leaf=is_leaf)


def sharded_init(
  build: Callable[..., EmbeddingTable],
  mesh: Mesh,
  rules: Rules,
  /,
  **kwargs: Any,
) -> EmbeddingTable:
  """Builds a table directly in its sharded layout.

  The initialiser runs under `jax.jit` with output shardings derived from
  the axis names, so each device computes only its own rows: the full
  table never exists on one device.

  Args:
    build: A table builder, e.g. `EmbeddingTable.from_config`.
    mesh: The device mesh.
    rules: Axis name -> mesh axis.
    **kwargs: Arguments of ``build`` (the random key among them).

  Returns:
    The table, with the same kind of ``embeddings`` ``build`` returns.

  Raises:
    ValueError: for rules as in `shard` (a typo of the table's axis names
      is caught before the initialiser runs).

  Example:

  >>> import jax, named_embed as ne
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> table = ne.sharded_init(
  ...     ne.EmbeddingTable.from_config, mesh, {"vocabulary": "model"},
  ...     name="e", init_base_rng=jax.random.key(0), vocab_size=8,
  ...     embedding_axes={"embedding": 4})
  >>> table.rows_array().sharding.spec, table.embeddings.label
  (P('model', None), 'e.embeddings')
  """

  captured = {}

  def initial_value():
    table = build(**kwargs)
    captured["table"] = table  # its statics; its traced value stays inside
    return table.value

  abstract = jax.eval_shape(initial_value)
  _check_rules(mesh, rules)
  names = {captured["table"].vocabulary_axis, *abstract.named_shape}
  check_rule_names(rules, names, "ne.sharded_init")
  sharding = NamedSharding(mesh, partition_spec(abstract, mesh, rules))
  out_shardings = jax.tree.map(lambda _: sharding, abstract)
  value = jax.jit(initial_value, out_shardings=out_shardings)()
  template = captured["table"]
  embeddings = table_arrays.held_like(template.embeddings, value)
  table = dataclasses.replace(template, embeddings=embeddings)
  return shard(table, mesh, rules)
