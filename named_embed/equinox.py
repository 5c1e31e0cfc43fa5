"""equinox modules around named_embed tables: `Embedding`.

A named_embed table keeps its trainable arrays in penzai `pz.Parameter`s,
which equinox sees as non-array leaves: a table stored as is in an
`eqx.Module` runs, but `eqx.filter_grad` gives it a ``None`` gradient, and
a frozen table's float arrays are inexact leaves that an optimiser with
weight decay changes. `Embedding` holds any kind of table the equinox way::

  from named_embed import equinox as ne_eqx  # needs named_embed[equinox]
  emb = ne_eqx.Embedding(table)              # an eqx.Module
  vectors = emb(tokens, out_of_range="clip")   # ne.lookup
  logits = emb.attend(hidden)                  # ne.decode
  loss = emb.cross_entropy(hidden, targets)    # ne.decode_cross_entropy
  bags = emb.pooled(tokens, over="member")     # ne.pooled_lookup
  emb.table                                    # the table, as it is now

The table's trainable arrays (a plain table's rows, LoRA's ``A`` and ``B``,
the trained rows of a `TrainableRowsTable`) are float array leaves
(``emb.params``); its frozen arrays (a frozen table's rows, a quantised
table's codes and scales, an adapter's base) are kept as unsigned integers
of the same bits (``emb.frozen``), so `eqx.is_inexact_array` skips them:
`eqx.filter_grad` gives them no gradient and an optimiser (``adamw``'s
weight decay included) never touches them. `table` reads them back as they
were (a free bitcast under `eqx.filter_jit`; eagerly, a copy of each
frozen float array per call). Arrays keep their placement. The recipe
(see docs/integrations.md)::

  optimizer = optax.adamw(1e-3)
  state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, state, batch):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    updates, state = optimizer.update(
        grads, state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, loss
"""

from __future__ import annotations

from typing import Any

try:
  import equinox as eqx
except ImportError as error:  # equinox is an optional dependency
  raise ImportError(
    "named_embed.equinox needs equinox, which is not installed: pip install"
    " named_embed[equinox]"
  ) from error

import jax
import jax.numpy as jnp
import numpy as np

from named_embed._src.ops import decode, lookup, loss
from named_embed._src.ops.pooled import lookup as pooled
from named_embed._src.tables import contract
from named_embed._src.tools import foreign_modules

__all__ = ["Embedding", "check_tables"]

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
"""The unsigned integer of each float width a frozen array is kept as."""


def _hidden(array: jax.Array) -> jax.Array:
  """A frozen float array as unsigned integers of the same bits."""
  if not jnp.issubdtype(array.dtype, jnp.inexact):
    return array
  return jax.lax.bitcast_convert_type(array, _BITS[array.dtype.itemsize])


def _shown(array: jax.Array, dtype: np.dtype) -> jax.Array:
  """The frozen array `_hidden` kept, as it was, without gradient."""
  if array.dtype == dtype:
    return array
  return jax.lax.stop_gradient(jax.lax.bitcast_convert_type(array, dtype))


class Embedding(eqx.Module):
  """An equinox module around a named_embed table of any kind.

  The table's trainable arrays are float leaves (``params``, in the order
  of their penzai ``labels``); its frozen arrays are kept as unsigned
  integers of the same bits (``frozen``), so `eqx.is_inexact_array`
  skips them; `table` rebuilds the table. One `Embedding` used for lookups
  and `attend` is a tied model: one array, whose gradient is the sum of
  both uses.

  Args:
    table: A named_embed table (`EmbeddingTable`, `QuantizedTable`,
      `LoraTable`, `TrainableRowsTable`, ...), bound (not a
      `pz.ParameterSlot`), on one device or placed with
      `named_embed.shard`.

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: if the table is unbound.

  Example:

  >>> import equinox as eqx, jax, named_embed as ne
  >>> from named_embed import equinox as ne_eqx
  >>> emb = ne_eqx.Embedding(ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=5,
  ...     embedding_axes={"embedding": 3}))
  >>> emb.labels, len(emb.frozen)
  (('embed.embeddings',), 0)
  >>> def loss(emb):
  ...   return emb(jax.numpy.array([1, 2])).data_array.sum()
  >>> grads = eqx.filter_grad(loss)(emb)
  >>> grads.params[0][1:3].tolist()
  [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """

  params: tuple[jax.Array, ...]
  frozen: tuple[jax.Array, ...]
  skeleton: foreign_modules.Skeleton = eqx.field(static=True)
  frozen_dtypes: tuple[np.dtype, ...] = eqx.field(static=True)

  def __init__(self, table: contract.AbstractTable):
    skeleton, trainable, frozen = foreign_modules.split_table(
      table, "ne_eqx.Embedding"
    )
    self.params = trainable
    self.frozen = tuple(_hidden(array) for array in frozen)
    self.frozen_dtypes = tuple(np.dtype(array.dtype) for array in frozen)
    self.skeleton = skeleton

  @property
  def labels(self) -> tuple:
    """The penzai labels of ``params``, in order.

    >>> import jax, numpy as np, named_embed as ne
    >>> from named_embed import equinox as ne_eqx
    >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
    >>> ne_eqx.Embedding(table.with_lora(
    ...     rank=1, name="lora", init_base_rng=jax.random.key(0))).labels
    ('lora.lora_a', 'lora.lora_b')
    """
    return self.skeleton.labels

  @property
  def table(self) -> contract.AbstractTable:
    """The table, rebuilt from the current arrays: a trainable array held
    as in the table given (a `pz.Parameter` with its label), frozen ones
    as they were (without gradient).

    >>> import numpy as np, named_embed as ne
    >>> from named_embed import equinox as ne_eqx
    >>> emb = ne_eqx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.ones((4, 2), np.float32)))
    >>> emb.frozen[0].dtype, emb.table.rows_array().dtype
    (dtype('uint32'), dtype('float32'))
    """
    frozen = [
      _shown(array, dtype)
      for array, dtype in zip(self.frozen, self.frozen_dtypes)
    ]
    return self.skeleton.rebuild(self.params, frozen)

  def __call__(self, tokens: Any, **options: Any) -> Any:
    """`named_embed.lookup` of ``tokens`` in the table, with its options
    (``out_of_range=``, ``max_norm=``, ``dtype=``, ...).

    >>> import numpy as np, named_embed as ne
    >>> from named_embed import equinox as ne_eqx
    >>> emb = ne_eqx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.arange(6, dtype=np.float32).reshape(3, 2)))
    >>> emb(np.array([2, 7]), out_of_range="clip").data_array.tolist()
    [[4.0, 5.0], [4.0, 5.0]]
    """
    return lookup.lookup(self.table, tokens, **options)

  def attend(self, hidden: Any, **options: Any) -> Any:
    """`named_embed.decode` of ``hidden`` (flax's name): a logit per
    token, with its options (``soft_cap=``, ``dtype=``).

    >>> import numpy as np, named_embed as ne
    >>> from penzai import pz
    >>> from named_embed import equinox as ne_eqx
    >>> emb = ne_eqx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.eye(3, dtype=np.float32)))
    >>> hidden = pz.nx.wrap(np.array([0.0, 2.0, 1.0], np.float32)
    ...                     ).tag("embedding")
    >>> emb.attend(hidden).unwrap("vocabulary").tolist()
    [0.0, 2.0, 1.0]
    """
    return decode.decode(self.table, hidden, **options)

  def cross_entropy(self, hidden: Any, targets: Any, **options: Any) -> Any:
    """`named_embed.decode_cross_entropy` of ``hidden`` against ``targets``
    (the fused loss: never builds the logits), with its options.

    >>> import numpy as np, named_embed as ne
    >>> from penzai import pz
    >>> from named_embed import equinox as ne_eqx
    >>> emb = ne_eqx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.zeros((4, 2), np.float32)))
    >>> hidden = pz.nx.wrap(np.ones((2, 2), np.float32)).tag("seq",
    ...                                                      "embedding")
    >>> targets = pz.nx.wrap(np.array([0, 3])).tag("seq")
    >>> round(float(emb.cross_entropy(hidden, targets)), 4)
    1.3863
    """
    return loss.decode_cross_entropy(self.table, hidden, targets, **options)

  def pooled(self, tokens: Any, **options: Any) -> Any:
    """`named_embed.pooled_lookup` of ``tokens`` (bags ``over=`` an axis or
    by ``offsets=``), with its options (``mode=``, ``weights=``, ...).

    >>> import numpy as np, named_embed as ne
    >>> from penzai import pz
    >>> from named_embed import equinox as ne_eqx
    >>> emb = ne_eqx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.arange(6, dtype=np.float32).reshape(3, 2)))
    >>> bags = pz.nx.wrap(np.array([[0, 2]])).tag("bag", "member")
    >>> emb.pooled(bags, over="member", mode="mean").data_array.tolist()
    [[2.0, 3.0]]
    """
    return pooled.pooled_lookup(self.table, tokens, **options)


def check_tables(model: Any) -> None:
  """Raises if ``model`` (an equinox module, or any pytree) holds a
  named_embed table outside an `Embedding`.

  Such a table silently misbehaves under equinox's filters: its
  `pz.Parameter`s are non-array leaves (``eqx.filter_grad`` gives them
  ``None``, the optimiser never updates them, `eqx.filter_jit` holds them
  static), and its frozen float arrays are inexact leaves (zero gradients,
  but an optimiser's weight decay changes them).

  Raises:
    TypeError: naming every such table by its path in ``model``, and the
      fix (wrap it in `Embedding`).

  Example:

  >>> import equinox as eqx, numpy as np, named_embed as ne
  >>> from named_embed import equinox as ne_eqx
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> class Model(eqx.Module):
  ...   table: ne.EmbeddingTable
  >>> ne_eqx.check_tables(Model(table))
  Traceback (most recent call last):
  ...
  TypeError: ne_eqx.check_tables: the model holds 1 named_embed table outside an ne_eqx.Embedding: `model.table`: a frozen EmbeddingTable (its float arrays are inexact leaves: an optimiser's weight decay would change them). Hold each in an `ne_eqx.Embedding(table)` (from named_embed import equinox as ne_eqx) and call it: emb(tokens), emb.attend(hidden), emb.cross_entropy(hidden, targets).
  >>> ne_eqx.check_tables([ne_eqx.Embedding(table)])  # fine
  """
  found = foreign_modules.tables_in(model, stop=Embedding)
  if not found:
    return
  parts = []
  for path, table in found:
    if foreign_modules.trainable_holders(table):
      why = (
        "its pz.Parameters are not arrays to equinox: no gradient, never"
        " updated"
      )
    else:
      why = (
        "its float arrays are inexact leaves: an optimiser's weight decay"
        " would change them"
      )
    parts.append(f"`model{path}`: {foreign_modules.describe(table)} ({why})")
  count = len(found)
  raise TypeError(
    f"ne_eqx.check_tables: the model holds {count} named_embed"
    f" table{'s' if count > 1 else ''} outside an ne_eqx.Embedding:"
    f" {'; '.join(parts)}. Hold each in an `ne_eqx.Embedding(table)` (from"
    " named_embed import equinox as ne_eqx) and call it: emb(tokens),"
    " emb.attend(hidden), emb.cross_entropy(hidden, targets)."
  )
