"""Tables held by other libraries' modules (flax nnx, equinox).

A table of any kind is a penzai `Struct` whose trainable arrays sit in
`pz.Parameter`s (or `pz.ParameterValue`s). To flax nnx a `Parameter` is an
opaque object, not a variable; to equinox it is a non-array leaf: neither
library would ever differentiate or update it. `split_table` takes a table
apart into

- its *trainable* arrays (the raw arrays inside its parameters, one per
  penzai label, in the table's order),
- its *frozen* arrays (every other array: a frozen table's rows, a
  quantised table's codes and scales, an adapter's base), and
- a static, hashable `Skeleton` (everything else: the table's kind, axis
  names, vocabulary, labels, recorded sharding),

and `Skeleton.rebuild` puts the same table back together from arrays of
the same shapes (concrete or traced). `named_embed.nnx` and
`named_embed.equinox` hold the arrays as their libraries' state and
rebuild the table on every call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from penzai import pz

from named_embed._src.base import static
from named_embed._src.rows import table_arrays
from named_embed._src.tables import contract

_HOLDERS = (
  pz.AbstractVariable | pz.AbstractVariableValue | pz.AbstractVariableSlot
)
_TRAINABLE = pz.Parameter | pz.ParameterValue


@dataclasses.dataclass(frozen=True, eq=False)
class TrainableArray(static.Static):
  """How one trainable array is held in its table: the penzai ``label``,
  the ``holder`` (``"parameter"`` or ``"parameter_value"``, see
  `named_embed._src.rows.table_arrays.holder_kind`), the penzai
  ``metadata`` (as sorted items) and the structure of the `NamedArray`
  around the raw array.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import foreign_modules
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.ones((3, 2), np.float32), freeze=False, name="embed")
  >>> skeleton, _, _ = foreign_modules.split_table(table, "example")
  >>> skeleton.trainable[0].label, skeleton.trainable[0].holder
  ('embed.embeddings', 'parameter')
  """

  label: Any
  holder: str
  metadata: tuple
  value_tree: Any

  def hold(self, array: jax.Array) -> Any:
    """``array`` held as it was in the table (a new holder)."""
    value = jax.tree_util.tree_unflatten(self.value_tree, [array])
    return table_arrays.hold(
      self.holder, value, self.label, dict(self.metadata)
    )


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Skeleton(static.Static):
  """A table without its arrays: static and hashable (a jit cache key, an
  nnx static attribute, an equinox static field).

  Attributes:
    treedef: The table's structure, each holder and each array a leaf.
    slots: Per leaf of ``treedef``: ``("trainable", i)``, ``("frozen",
      i)`` or ``("constant", value)``.
    trainable: A `TrainableArray` per trainable array.
    frozen_count: The number of frozen arrays.
    kind: The table's class name (for messages).

  Example:

  >>> import jax, named_embed as ne
  >>> from named_embed._src.tools import foreign_modules
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=4,
  ...     embedding_axes={"embedding": 2}).quantized("int8").with_lora(
  ...     rank=1, name="lora", init_base_rng=jax.random.key(1))
  >>> skeleton, trainable, frozen = foreign_modules.split_table(table, "ex")
  >>> skeleton.labels, [a.dtype.name for a in frozen]
  (('lora.lora_a', 'lora.lora_b'), ['int8', 'float32'])
  >>> again = skeleton.rebuild(trainable, frozen)
  >>> type(again).__name__, again.lora_a.label
  ('LoraTable', 'lora.lora_a')
  >>> skeleton
  Skeleton(LoraTable, trainable ['lora.lora_a', 'lora.lora_b'], 2 frozen)
  """

  treedef: Any
  slots: tuple[tuple[str, Any], ...]
  trainable: tuple[TrainableArray, ...]
  frozen_count: int
  kind: str

  @property
  def labels(self) -> tuple:
    """The penzai labels of the trainable arrays, in order."""
    return tuple(info.label for info in self.trainable)

  def __repr__(self) -> str:
    return (
      f"Skeleton({self.kind}, trainable {list(self.labels)},"
      f" {self.frozen_count} frozen)"
    )

  def rebuild(self, trainable, frozen) -> contract.AbstractTable:
    """The table of these arrays (shapes and dtypes as split): every
    trainable array held as it was (a new `pz.Parameter` or
    `pz.ParameterValue` with its label), every frozen one as it was."""
    trainable, frozen = tuple(trainable), tuple(frozen)
    if len(trainable) != len(self.trainable) or len(frozen) != (
      self.frozen_count
    ):
      raise ValueError(
        f"A {self.kind} split into {len(self.trainable)} trainable and"
        f" {self.frozen_count} frozen arrays was given {len(trainable)}"
        f" and {len(frozen)}."
      )
    holders = [info.hold(a) for info, a in zip(self.trainable, trainable)]
    leaves = []
    for kind, entry in self.slots:
      if kind == "trainable":
        leaves.append(holders[entry])
      elif kind == "frozen":
        leaves.append(frozen[entry])
      else:
        leaves.append(entry)
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _is_holder(node: Any) -> bool:
  return isinstance(node, _HOLDERS)


def _trainable(holder: Any, caller: str) -> tuple[TrainableArray, jax.Array]:
  """The static half of a trainable holder and its raw array."""
  label = getattr(holder, "label", None)
  if not isinstance(holder, _TRAINABLE):
    if isinstance(holder, pz.ParameterSlot):
      raise ValueError(
        f"{caller}: the table's parameter {label!r} is unbound (a"
        " pz.ParameterSlot): bind its value first"
        " (`pz.bind_variables(table, [parameter])`), or build the table"
        " with an `init_base_rng`."
      )
    raise TypeError(
      f"{caller}: a table holds parameters and arrays only; got a"
      f" {type(holder).__name__} (label {label!r})."
    )
  leaves, value_tree = jax.tree_util.tree_flatten(holder.value)
  if len(leaves) != 1 or not isinstance(leaves[0], jax.Array | np.ndarray):
    raise TypeError(
      f"{caller}: the parameter {label!r} must hold one NamedArray; got"
      f" {type(holder.value).__name__} with {len(leaves)} leaves."
    )
  array = leaves[0]
  if isinstance(array, np.ndarray):
    array = jax.numpy.asarray(array)
  metadata = tuple(sorted(holder.metadata.items(), key=lambda kv: str(kv[0])))
  kind = table_arrays.holder_kind(holder)
  return TrainableArray(label, kind, metadata, value_tree), array


def split_table(
  table: Any, caller: str
) -> tuple[Skeleton, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """``(skeleton, trainable arrays, frozen arrays)`` of a table of any
  kind; ``caller`` names the function in errors.

  A parameter or an array the table holds in two places (a tie inside the
  table) is one array. Raises a `TypeError` for what is not a table and a
  `ValueError` for an unbound table (a `pz.ParameterSlot`).

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import foreign_modules
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> skeleton, trainable, frozen = foreign_modules.split_table(table, "ex")
  >>> trainable, [a.shape for a in frozen], skeleton.kind
  ((), [(3, 2)], 'EmbeddingTable')
  """
  contract.check_table(table, caller)
  leaves, treedef = jax.tree_util.tree_flatten(table, is_leaf=_is_holder)
  slots, infos, trainable, frozen = [], [], [], []
  seen: dict[int, tuple[str, int]] = {}
  for leaf in leaves:
    slot = seen.get(id(leaf))
    if slot is None:
      if _is_holder(leaf):
        info, array = _trainable(leaf, caller)
        slot = ("trainable", len(infos))
        infos.append(info)
        trainable.append(array)
      elif isinstance(leaf, jax.Array | np.ndarray):
        slot = ("frozen", len(frozen))
        frozen.append(jax.numpy.asarray(leaf))
      else:
        slot = ("constant", leaf)
      seen[id(leaf)] = slot
    slots.append(slot)
  skeleton = Skeleton(
    treedef, tuple(slots), tuple(infos), len(frozen), type(table).__name__
  )
  try:
    hash(skeleton)
  except TypeError as error:
    raise TypeError(
      f"{caller}: the static parts of the {skeleton.kind} (its fields that"
      " are not arrays, and its parameters' labels and metadata) must be"
      " hashable: nnx and equinox compare them to reuse compiled code;"
      f" {error}."
    ) from error
  return skeleton, tuple(trainable), tuple(frozen)


def tables_in(tree: Any, stop: Any = ()) -> list[tuple[str, Any]]:
  """``(path, table)`` of every table in the pytree ``tree``, not looking
  inside instances of the classes ``stop``.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import foreign_modules
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> [path for path, _ in foreign_modules.tables_in({"embed": [table]})]
  ["['embed'][0]"]
  """

  def is_leaf(node):
    return isinstance(node, contract.AbstractTable) or (
      bool(stop) and isinstance(node, stop)
    )

  found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [
    (jax.tree_util.keystr(path), leaf)
    for path, leaf in found
    if isinstance(leaf, contract.AbstractTable)
  ]


def trainable_holders(table: Any) -> list:
  """The `pz.Parameter`s and `pz.ParameterValue`s a table holds, in order.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import foreign_modules
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> foreign_modules.trainable_holders(table)
  []
  """
  leaves = jax.tree_util.tree_leaves(table, is_leaf=_is_holder)
  return [leaf for leaf in leaves if isinstance(leaf, _TRAINABLE)]


def describe(table: Any) -> str:
  """How a table is named in a message: its kind and what trains.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import foreign_modules
  >>> foreign_modules.describe(ne.EmbeddingTable.from_pretrained(
  ...     np.ones((3, 2), np.float32), freeze=False, name="embed"))
  "an EmbeddingTable holding the pz.Parameter 'embed.embeddings'"
  """
  name = type(table).__name__
  article = "an" if name[0] in "AEIOU" else "a"
  holders = trainable_holders(table)
  if not holders:
    return f"a frozen {name}"
  parts = ", ".join(f"the pz.{type(h).__name__} {h.label!r}" for h in holders)
  return f"{article} {name} holding {parts}"
