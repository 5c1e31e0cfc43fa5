"""The arrays of a whole model, by name: what a checkpoint of it holds.

A model (a penzai model, or any pytree holding tables) is its variables
(`pz.Parameter` / `pz.StateVariable`, found by `pz.unbind_variables`) and
every other array it holds (a frozen table's rows, a quantised table's
codes and scales, a frozen LoRA base): all of it is the model. The
*state* of a model is those arrays as two flat dicts of raw arrays::

  {"variables": {label: array, ...}, "arrays": {path: array, ...}}

a variable's value under its label (``label/<path>`` when the value holds
several arrays), every other array under its path in the model
(``sublayers/0/table/embeddings``). One array held in two places (a tied
frozen table) is one entry under its first path, and a tied trainable table
is one parameter: both come back as one array used twice. Axis names,
vocabularies, labels and the rest of the structure are not arrays: they
come from the model the state is put back into (`with_state`, public as
`named_embed.orbax.with_checkpoint_state`).

An abstract model (`named_embed._src.tools.abstract_models`) holds a
`jax.ShapeDtypeStruct` for each array; its state is the target a
checkpointer restores onto, and its variables are `ShapeParameter` /
`ShapeStateVariable`, which may hold shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from penzai import pz

VARIABLES = "variables"
ARRAYS = "arrays"
GROUPS = (VARIABLES, ARRAYS)
"""The two groups of a model's state."""

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def is_array(leaf: Any) -> bool:
  """Whether a pytree leaf is an array of the state (a jax or numpy array,
  or the `jax.ShapeDtypeStruct` standing for one); Python numbers and other
  leaves stay with the model's structure."""
  return isinstance(leaf, _ARRAY_TYPES) or isinstance(leaf, jax.core.Tracer)


def path_name(path: tuple) -> str:
  """A pytree key path as a name: ``sublayers/0/table/embeddings`` (the
  ``data_array`` of a `NamedArray` is the array itself)."""
  keys = jax.tree_util
  parts = []
  for key in path:
    if isinstance(key, keys.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, keys.DictKey | keys.FlattenedIndexKey):
      parts.append(str(key.key))
    elif isinstance(key, keys.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  if parts and parts[-1] == "data_array":
    parts.pop()
  return "/".join(parts) or "."


# ------------------------------------------------------------ the slots


class Slots:
  """A model split into its structure and named array slots: the model
  with its variables unbound (frozen values, `pz.unbind_variables`), the
  flat leaves of both, and for each array leaf the name of its entry."""

  def __init__(self, model: Any, what: str):
    self.model_def, self.values = pz.unbind_variables(model, freeze=True)
    self.leaves, self.treedef = jax.tree.flatten((self.model_def, self.values))
    self.names: list[tuple[str, str] | None] = [None] * len(self.leaves)
    self.entries: dict[tuple[str, str], int] = {}  # name -> first leaf
    paths = jax.tree_util.tree_flatten_with_path(self.model_def)[0]
    seen: dict[int, tuple[str, str]] = {}
    for i, (path, leaf) in enumerate(paths):
      if is_array(leaf):
        name = seen.get(id(leaf))  # one array held twice: one entry
        if name is None:
          name = seen[id(leaf)] = self._unique(ARRAYS, path_name(path))
        self.names[i] = name
    offset = len(paths)
    for value in self.values:
      label = _label(value, what)
      value_paths = jax.tree_util.tree_flatten_with_path(value.value)[0]
      several = sum(is_array(leaf) for _, leaf in value_paths) > 1
      for path, leaf in value_paths:
        if is_array(leaf):
          name = f"{label}/{path_name(path)}" if several else label
          self.names[offset] = self._unique(VARIABLES, name)
        offset += 1

  def _unique(self, group: str, name: str) -> tuple[str, str]:
    """``(group, name)``, numbered ``name#2``, ... if two paths read alike
    (a dict key holding a ``/``)."""
    candidate, n = name, 1
    while (group, candidate) in self.entries:
      n += 1
      candidate = f"{name}#{n}"
    self.entries[(group, candidate)] = len(self.entries)
    return group, candidate

  def state(self) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for leaf, name in zip(self.leaves, self.names):
      if name is not None and name[1] not in state[name[0]]:
        state[name[0]][name[1]] = saved(leaf)
    return state

  def rebuilt(self, new_leaf: Callable[[tuple[str, str], Any], Any]) -> Any:
    """The model with each array leaf replaced by ``new_leaf(name, leaf)``
    (called once a name) and new variables (the model's own are left
    alone): a tied parameter stays one parameter."""
    made: dict[tuple[str, str], Any] = {}
    leaves = []
    for leaf, name in zip(self.leaves, self.names):
      if name is not None:
        if name not in made:
          made[name] = new_leaf(name, leaf)
        leaf = made[name]
      leaves.append(leaf)
    model_def, values = jax.tree.unflatten(self.treedef, leaves)
    return pz.bind_variables(model_def, [_unfrozen(v) for v in values])


class ShapeParameter(pz.Parameter):
  """A `pz.Parameter` of an abstract model (`abstract_model`): its value
  holds `jax.ShapeDtypeStruct` s, which `pz.Parameter` would refuse (it
  converts every value with `jnp.asarray`). It is a template only:
  restored values go into new `pz.Parameter` s
  (`named_embed.orbax.with_checkpoint_state`).

  >>> import jax, jax.numpy as jnp
  >>> ShapeParameter(value=jax.ShapeDtypeStruct((2,), jnp.float32),
  ...                label="p").freeze().value.shape
  (2,)
  """

  @property
  def value(self):
    return self._raw_value  # penzai's storage of a variable's value

  @value.setter
  def value(self, new_value):
    self._raw_value = new_value


class ShapeStateVariable(pz.StateVariable):
  """A `pz.StateVariable` of an abstract model, as `ShapeParameter`.

  >>> import jax, jax.numpy as jnp
  >>> ShapeStateVariable(jax.ShapeDtypeStruct((2,), jnp.int32),
  ...                    label="s").freeze().value.dtype
  dtype('int32')
  """

  value = ShapeParameter.value


_SHAPE_VARIABLES = {
  pz.ParameterValue: ShapeParameter,
  pz.StateVariableValue: ShapeStateVariable,
}


def _unfrozen(value: Any) -> Any:
  """A new mutable variable holding the frozen ``value``'s value: a
  `ShapeParameter` / `ShapeStateVariable` when it holds shapes."""
  leaves = jax.tree.leaves(value.value)
  if not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
    return value.unfreeze_as_copy()
  kind = _SHAPE_VARIABLES.get(type(value))
  if kind is None:
    raise TypeError(
      f"abstract_model: a {type(value).__name__} ({value.label!r}) cannot"
      " hold shapes; only pz.Parameter and pz.StateVariable can."
    )
  if kind is ShapeParameter:
    return kind(value=value.value, label=value.label, metadata=value.metadata)
  return kind(value.value, label=value.label, metadata=value.metadata)


def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def saved(leaf: Any) -> Any:
  """``leaf`` as a checkpoint holds it: a typed PRNG key array as its raw
  key data (`jax.random.key_data`; checkpointers save no key dtype), any
  other array as it is.

  >>> import jax
  >>> saved(jax.random.key(0)).dtype
  dtype('uint32')
  """
  if not _is_key(leaf):
    return leaf
  if isinstance(leaf, jax.ShapeDtypeStruct):
    data = jax.eval_shape(jax.random.key_data, leaf)
    where = leaf.sharding
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=where)
  return jax.random.key_data(leaf)


def restored(array: Any, like: Any) -> Any:
  """``array`` read back where the model held ``like``: key data becomes a
  key array of ``like``'s implementation again (the inverse of `saved`)."""
  if not _is_key(like):
    return array
  if isinstance(like, jax.ShapeDtypeStruct):
    found = {}
    jax.eval_shape(
      lambda key: found.update(impl=jax.random.key_impl(key)), like
    )
    impl = found["impl"]
  else:
    impl = jax.random.key_impl(like)
  return jax.random.wrap_key_data(array, impl=impl)


def _label(value: Any, what: str) -> str:
  if not isinstance(value.label, str):
    raise ValueError(
      f"{what}: a {type(value).__name__} has the automatic label"
      f" {value.label!r}, which differs from one run to the next, so a"
      " checkpoint cannot name it. Give the variable a label"
      " (`pz.StateVariable(value, label='...')`)."
    )
  return value.label


# ------------------------------------------------------------ the state


def state(model: Any) -> dict[str, dict[str, Any]]:
  """The arrays of ``model`` by name, as a checkpointer saves them.

  ``{"variables": {label: array}, "arrays": {path: array}}``: the values of
  the model's `pz.Parameter` and `pz.StateVariable` by label, and every
  other array it holds (frozen rows, quantised codes and scales, a frozen
  LoRA base) by its path in the model. Raw arrays, not `NamedArray`: the
  axis names stay with the model. An array held twice (a tied frozen
  table) is one entry; so is a tied parameter.

  Args:
    model: A penzai model, a table, or any pytree holding them; its arrays
      may be concrete or `jax.ShapeDtypeStruct` (`abstract_model`).

  Returns:
    The two dicts (either may be empty).

  Raises:
    ValueError: for a `pz.StateVariable` with an automatic label.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed.orbax import checkpoint_state
  >>> from penzai import pz
  >>> frozen = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=4,
  ...     embedding_axes={"embedding": 2})
  >>> model = pz.nn.Sequential([ne.EmbeddingLookup(frozen),
  ...     ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)])
  >>> jax.tree.map(lambda x: x.shape, checkpoint_state(model))
  {'arrays': {'sublayers/0/table/embeddings': (4, 2)},
   'variables': {'embed.embeddings': (4, 2)}}
  """
  return Slots(model, "checkpoint_state").state()


def with_state(model: Any, state: Mapping[str, Mapping[str, Any]]) -> Any:
  """``model`` holding the arrays of ``state`` instead of its own.

  ``model`` gives the structure (layers, tables, axis names, vocabularies,
  labels, rows shardings); usually the `abstract_model` whose
  `checkpoint_state` was the restore target. Each array of ``state`` goes
  where the model held the array of the same name: a tied table gets one
  array (one new `pz.Parameter` for a trainable one, shared by every
  layer), as it was saved. ``model``'s own variables are left untouched.
  Arrays are used as they are (not moved).

  Args:
    model: A model of the same structure as the one saved, with concrete
      or abstract arrays.
    state: ``{"variables": {...}, "arrays": {...}}`` with exactly the
      names ``checkpoint_state(model)`` has (a missing empty group is
      fine), each of the same shape and dtype.

  Returns:
    The model with the state's arrays.

  Raises:
    ValueError: if a name is missing or extra (the message lists them), or
      an array's shape or dtype differs from the model's.
    TypeError: if ``state`` is not a mapping of the two groups.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed.orbax import checkpoint_state, with_checkpoint_state
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> state = {"variables": {}, "arrays": {"embeddings": np.zeros((4, 2),
  ...     np.float32)}}
  >>> with_checkpoint_state(table, state).rows_array().sum().item()
  0.0
  """
  slots = Slots(model, "with_checkpoint_state")
  wanted = slots.state()
  _check_groups(state)
  found = differences(state, wanted, "the state")
  if found:
    raise ValueError(
      "with_checkpoint_state: the state does not hold this model's arrays"
      " (restore into a model built as the saved one was):\n" + found
    )

  return slots.rebuilt(
    lambda name, like: restored(state[name[0]][name[1]], like)
  )


def differences(
  have: Mapping[str, Mapping[str, Any]],
  want: Mapping[str, Mapping[str, Any]],
  where: str,
) -> str:
  """The names and forms (dtype, shape) of ``have`` that differ from
  ``want``'s, one kind of difference a line (``""`` if none): the names
  only one of them holds, then the arrays whose dtype or shape differ.

  >>> import numpy as np
  >>> print(differences({"arrays": {"a": np.zeros(2), "b": np.zeros(1)}},
  ...                   {"arrays": {"a": np.zeros(3, np.int8)}}, "the file"))
    only in the file: arrays/b
    different: arrays/a is float64[2] in the file, int8[3] in the model
  """
  only_have, only_want, different = [], [], []
  for group in GROUPS:
    ours, theirs = have.get(group) or {}, want.get(group) or {}
    only_have += [f"{group}/{n}" for n in sorted(set(ours) - set(theirs))]
    only_want += [f"{group}/{n}" for n in sorted(set(theirs) - set(ours))]
    for name in sorted(set(ours) & set(theirs)):
      a, b = _form(ours[name]), _form(theirs[name])
      if a != b:
        different.append(f"{group}/{name} is {a} in {where}, {b} in the model")
  lines = [
    (f"only in {where}", only_have),
    ("only in the model", only_want),
    ("different", different),
  ]
  return "\n".join(
    f"  {label}: {', '.join(names)}" for label, names in lines if names
  )


def _form(array: Any) -> str:
  dtype = getattr(array, "dtype", None)
  shape = list(getattr(array, "shape", ()))
  return f"{np.dtype(dtype) if dtype is not None else '?'}{shape}"


def _check_groups(state: Any) -> None:
  groups = list(state) if isinstance(state, Mapping) else None
  if groups is None or set(groups) - set(GROUPS):
    raise TypeError(
      "with_checkpoint_state: `state` must be a dict with the groups"
      f" {list(GROUPS)} (what checkpoint_state returns); got"
      f" {groups if groups is not None else type(state).__name__}."
    )
  for group in groups:
    if not isinstance(state[group], Mapping):
      raise TypeError(
        f"with_checkpoint_state: `state[{group!r}]` must map names to"
        f" arrays; got {type(state[group]).__name__}."
      )
