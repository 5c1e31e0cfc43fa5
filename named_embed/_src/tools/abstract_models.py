"""Abstract models: a `jax.ShapeDtypeStruct` for every array, placed.

`abstract_model` replaces every array of a model by a `jax.ShapeDtypeStruct`
carrying where the array goes (its own sharding, or where `ne.shard` would
place it on a new mesh) and records each table's rows sharding there;
`eval_shape_model` makes one from a build function without running it.
The state of an abstract model (`model_arrays.state`) is the target a
checkpointer restores onto.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

from named_embed._src.tables import contract
from named_embed._src.tools import model_arrays, sharding


def abstract_model(
  model: Any,
  mesh: Mesh | None = None,
  rules: sharding.Rules | None = None,
) -> Any:
  """``model`` with every array replaced by a `jax.ShapeDtypeStruct` that
  says where it goes: its `checkpoint_state` is the restore target.

  Without ``mesh``, each array keeps its sharding (restoring onto the
  devices it is on; an array with none, a numpy array or an
  `eval_shape_model` shape, goes to the first local device). With
  ``mesh`` and ``rules``, every array goes where `ne.shard` would place it
  on that mesh (a `NamedArray` by its axis names, any other array
  replicated), and every table records its rows sharding on that mesh. The
  model's own variables are left untouched (the abstract one has new
  ones, tied as they were).

  Args:
    model: A penzai model, a table, or any pytree holding them (concrete
      or abstract arrays).
    mesh: The mesh to restore onto, or None.
    rules: Axis name -> mesh axis (as for `ne.shard`); required with
      ``mesh`` (``{}`` replicates everything), and only with it.

  Returns:
    The abstract model.

  Raises:
    ValueError: for rules as `ne.shard` refuses them (a mesh axis the mesh
      lacks, one that does not divide its axis, a misspelt axis name), or
      ``mesh`` without ``rules`` (or the reverse).

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed.orbax import abstract_model, checkpoint_state
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> abstract = abstract_model(table, mesh, {"vocabulary": "model"})
  >>> target = checkpoint_state(abstract)["arrays"]["embeddings"]
  >>> target.shape, target.sharding.spec, abstract.rows_sharding.spec
  ((4, 2), P('model', None), P('model', None))
  """
  if (mesh is None) != (rules is None):
    raise ValueError(
      "abstract_model: pass `mesh` and `rules` together (rules={}"
      " replicates every array on the mesh), or neither to keep each"
      f" array's sharding; got mesh={mesh!r}, rules={rules!r}."
    )
  if mesh is not None:
    sharding.check_rule_names(
      rules, sharding.axis_names(model), "abstract_model"
    )
  specs = _partition_specs(model, mesh, rules)
  slots = model_arrays.Slots(model, "abstract_model")

  def new_leaf(name, leaf):
    if mesh is None:
      where = getattr(
        leaf, "sharding", None
      ) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
      where = NamedSharding(mesh, specs.get(id(leaf), PartitionSpec()))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

  abstract = slots.rebuilt(new_leaf)
  if mesh is None:
    return abstract
  return _with_rows_shardings(abstract, mesh, rules)


_NAMED = pz.nx.NamedArrayBase


def _partition_specs(model: Any, mesh, rules) -> dict[int, PartitionSpec]:
  """The `PartitionSpec` of the data of every `NamedArray` of ``model``
  (inside variables too), by the id of its data."""
  if mesh is None:
    return {}
  specs = {}
  frozen = pz.freeze_variables(model)  # variables' values as pytrees
  for node in jax.tree.leaves(frozen, is_leaf=lambda n: isinstance(n, _NAMED)):
    if isinstance(node, _NAMED) and model_arrays.is_array(node.data_array):
      spec = sharding.partition_spec(node, mesh, rules)
      specs[id(node.data_array)] = spec
  return specs


def _with_rows_shardings(model: Any, mesh: Mesh, rules) -> Any:
  """Every table of ``model`` with its rows sharding on ``mesh`` recorded
  (`AbstractTable.with_rows_sharding`, as `ne.shard` records it)."""

  def visit(node):
    if not isinstance(node, contract.AbstractTable) or _holds_slots(node):
      return node  # not a table, or unbound: no rows to record
    axes = {node.vocabulary_axis: node.num_rows, **node.embedding_axes}
    rows = pz.nx.NamedArray(
      named_axes=collections.OrderedDict(axes),
      data_array=jax.ShapeDtypeStruct(tuple(axes.values()), jnp.float32),
    )
    spec = sharding.partition_spec(rows, mesh, rules)
    return node.with_rows_sharding(NamedSharding(mesh, spec))

  return jax.tree.map(
    visit, model, is_leaf=lambda n: isinstance(n, contract.AbstractTable)
  )


def _holds_slots(table: Any) -> bool:
  leaves = jax.tree.leaves(
    table, is_leaf=lambda n: isinstance(n, pz.AbstractVariableSlot)
  )
  return any(isinstance(leaf, pz.AbstractVariableSlot) for leaf in leaves)


def eval_shape_model(build: Callable[..., Any], /, *args, **kwargs) -> Any:
  """The model ``build(*args, **kwargs)`` returns, with a
  `jax.ShapeDtypeStruct` for every array, computed without running it
  (`jax.eval_shape`): the template to restore a large model onto, whose
  initial values would be overwritten anyway.

  ``build`` must be traceable by JAX (tables from `from_config`, their
  `quantized` or `with_lora` forms, penzai layers). Arrays held twice stay
  one shape; parameters stay tied.

  Args:
    build: A function returning the model.
    *args: Its positional arguments.
    **kwargs: Its keyword arguments.

  Returns:
    The abstract model (pass it to `abstract_model` to place it).

  Example:

  >>> import jax, named_embed as ne
  >>> from named_embed.orbax import eval_shape_model
  >>> table = eval_shape_model(ne.EmbeddingTable.from_config, name="e",
  ...     init_base_rng=jax.random.key(0), vocab_size=8,
  ...     embedding_axes={"embedding": 4})
  >>> table.embeddings.value.data_array
  ShapeDtypeStruct(shape=(8, 4), dtype=float32)
  """
  captured = {}

  def trace():
    slots = model_arrays.Slots(build(*args, **kwargs), "eval_shape_model")
    captured["slots"] = slots  # its structure; its traced arrays stay inside

  jax.eval_shape(trace)
  return captured["slots"].rebuilt(
    lambda name, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  )
