"""Whole-model checkpoints with orbax-checkpoint (docs/checkpoints.md).

A model holding tables is saved as its *state*: the values of its
variables by label and every other array it holds (frozen rows, int8 /
int4 codes and scales, a frozen LoRA base) by its path, two flat dicts of
raw arrays that `ocp.StandardCheckpointer` and `ocp.CheckpointManager`
save as they save any pytree::

  import orbax.checkpoint as ocp
  from named_embed import orbax as ne_orbax

  checkpointer.save(path, ne_orbax.checkpoint_state(model))
  abstract = ne_orbax.abstract_model(model, mesh, rules)   # or mesh=None
  state = checkpointer.restore(path, ne_orbax.checkpoint_state(abstract))
  model = ne_orbax.with_checkpoint_state(abstract, state)

`save` and `restore` do the same in one call each. Tied tables come back
tied (one array, one parameter); a table restored onto another mesh
records its rows sharding there. `named_embed.save` stays the format of
one table and its vocabulary.

Only `save` and `restore` need orbax-checkpoint, imported when called
(``pip install named_embed[orbax]``); ``import named_embed`` never imports
it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from named_embed._src.tools import abstract_models, model_arrays
from named_embed._src.tools.abstract_models import (
  abstract_model as abstract_model,
)
from named_embed._src.tools.abstract_models import (
  eval_shape_model as eval_shape_model,
)
from named_embed._src.tools.model_arrays import state as checkpoint_state
from named_embed._src.tools.model_arrays import (
  with_state as with_checkpoint_state,
)
from named_embed._src.tools.sharding import Rules

__all__ = [
  "abstract_model",
  "checkpoint_state",
  "checkpoint_target",
  "eval_shape_model",
  "restore",
  "save",
  "with_checkpoint_state",
]


def checkpoint_target(
  model: Any, mesh: Mesh | None = None, rules: Rules | None = None
) -> dict[str, dict[str, Any]]:
  """The abstract target to restore ``model``'s checkpoint onto:
  ``checkpoint_state(abstract_model(model, mesh, rules))``, a
  `jax.ShapeDtypeStruct` with its sharding for each array.

  Put the restored state into the same abstract model
  (`with_checkpoint_state`); with a mesh, its tables record their rows
  sharding there.

  Example:

  >>> import jax, numpy as np, named_embed as ne
  >>> from named_embed.orbax import checkpoint_target
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> target = checkpoint_target(table, mesh, {"vocabulary": "model"})
  >>> target["arrays"]["embeddings"].sharding.spec
  P('model', None)
  """
  abstract = abstract_models.abstract_model(model, mesh, rules)
  return model_arrays.state(abstract)


def _orbax(what: str):
  try:  # deferred: orbax-checkpoint is an optional dependency, slow to import
    import orbax.checkpoint as ocp
  except ImportError as error:
    raise ImportError(
      f"named_embed.orbax.{what} needs orbax-checkpoint, which is not"
      " installed: pip install named_embed[orbax] (or pip install"
      f" orbax-checkpoint). ({error})"
    ) from error
  return ocp


def save(directory: str | os.PathLike, model: Any, *, force: bool = False):
  """Saves ``model``'s `checkpoint_state` to ``directory`` with
  `ocp.StandardCheckpointer`, and waits until it is written.

  Across processes (`jax.distributed`), every process calls it with the
  same directory on a shared file system; each writes its own shards.

  Args:
    directory: The checkpoint directory (made absolute; it must not exist
      unless ``force``).
    model: A penzai model, a table, or any pytree holding them.
    force: Replace an existing checkpoint.

  Raises:
    ImportError: without orbax-checkpoint.

  Example:

  >>> import os, tempfile, numpy as np, named_embed as ne
  >>> from named_embed import orbax as ne_orbax
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.arange(8, dtype=np.float32).reshape(4, 2))
  >>> path = os.path.join(tempfile.mkdtemp(), "step_1")
  >>> ne_orbax.save(path, table)
  >>> ne_orbax.restore(path, table).rows_array().tolist()[1]
  [2.0, 3.0]
  """
  ocp = _orbax("save")
  state = model_arrays.state(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(directory), state, force=force)


def restore(
  directory: str | os.PathLike,
  model: Any,
  *,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
) -> Any:
  """The model saved in ``directory`` (by `save`, or a checkpointer given
  `checkpoint_state`), restored into the structure of ``model``.

  ``model`` is a model built as the saved one was (its arrays, concrete
  or from `eval_shape_model`, are replaced). Each array is read straight
  onto its devices: without ``mesh`` where ``model``'s is, with ``mesh``
  and ``rules`` where `ne.shard` would place it on that mesh (each
  process reads its own shards).

  Args:
    directory: The checkpoint directory.
    model: The template model.
    mesh: The mesh to restore onto, or None.
    rules: Axis name -> mesh axis, with ``mesh``.

  Returns:
    The restored model: tied tables tied, tables recording their rows
    sharding on ``mesh``.

  Raises:
    ValueError: if the checkpoint's arrays are not the template's (names,
      shapes or dtypes; the message lists the differences), and for rules
      as `abstract_model` refuses them.
    FileNotFoundError: if ``directory`` holds no checkpoint.
    ImportError: without orbax-checkpoint.

  Example: see `save`.
  """
  ocp = _orbax("restore")
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"named_embed.orbax.restore: no checkpoint directory {directory!r}."
    )
  abstract = abstract_models.abstract_model(model, mesh, rules)
  target = model_arrays.state(abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    _check_stored(directory, checkpointer.metadata(directory), target)
    state = checkpointer.restore(directory, target)
  return model_arrays.with_state(abstract, state)


def _check_stored(directory: str, metadata: Any, target: dict) -> None:
  """Raises a ValueError naming every array of the checkpoint that the
  target lacks, lacks from the checkpoint, or reads with another shape or
  dtype."""
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, Mapping):
    tree = {}  # not a checkpoint of a state: every name differs
  stored = {group: dict(tree.get(group) or {}) for group in model_arrays.GROUPS}
  found = model_arrays.differences(stored, target, "the checkpoint")
  if found:
    raise ValueError(
      f"named_embed.orbax.restore: the checkpoint {directory!r} does not"
      " hold this model's arrays (restore into a model built as the saved"
      " one was):\n" + found
    )
