"""flax nnx modules around named_embed tables: `Embedding`.

A named_embed table keeps its trainable arrays in penzai `pz.Parameter`s,
which flax nnx does not know: a table stored as is on an `nnx.Module` runs,
but `nnx.grad` gives it no gradient and `nnx.Optimizer` never updates it.
`Embedding` holds any kind of table the nnx way::

  from named_embed import nnx as ne_nnx     # needs flax: named_embed[flax]
  emb = ne_nnx.Embedding(table)              # an nnx.Module
  vectors = emb(tokens, out_of_range="clip")   # ne.lookup
  logits = emb.attend(hidden)                  # ne.decode
  loss = emb.cross_entropy(hidden, targets)    # ne.decode_cross_entropy
  bags = emb.pooled(tokens, over="member")     # ne.pooled_lookup
  emb.table                                    # the table, as it is now

Each trainable array of the table (a plain table's rows, LoRA's ``A`` and
``B``, the trained rows of a `TrainableRowsTable`) is an `nnx.Param`
carrying its penzai ``label``; every frozen array (a frozen table's rows, a
quantised table's codes and scales, an adapter's base) is a
`FrozenTableArray`, an `nnx.Variable` that is not a `Param`: ``nnx.grad``
and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` leave it alone. Arrays keep
their placement (a table placed with `named_embed.shard` stays sharded).
See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

try:
  from flax import nnx
except ImportError as error:  # flax is an optional dependency
  raise ImportError(
    "named_embed.nnx needs flax, which is not installed: pip install"
    " named_embed[flax]"
  ) from error

from named_embed._src.ops import decode, lookup, loss
from named_embed._src.ops.pooled import lookup as pooled
from named_embed._src.tables import contract
from named_embed._src.tools import foreign_modules

__all__ = ["Embedding", "FrozenTableArray", "check_tables"]


class FrozenTableArray(nnx.Variable):
  """A frozen array of a named_embed table, in an `Embedding`: not an
  `nnx.Param`, so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
  never change it.

  >>> import numpy as np, named_embed as ne
  >>> from flax import nnx
  >>> from named_embed import nnx as ne_nnx
  >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(
  ...     np.ones((4, 2), np.float32)))
  >>> frozen = emb.frozen[0]
  >>> isinstance(frozen, ne_nnx.FrozenTableArray), isinstance(frozen,
  ...                                                         nnx.Param)
  (True, False)
  """


class Embedding(nnx.Module):
  """An nnx module around a named_embed table of any kind.

  The table's trainable arrays become `nnx.Param`s (``emb.params``, each
  with the penzai ``label``), its frozen arrays `FrozenTableArray`s
  (``emb.frozen``); `table` rebuilds the table from their current values,
  so every call sees what the optimiser made of them. One `Embedding` used
  for lookups and `attend` is a tied model: one parameter, whose gradient
  is the sum of both uses.

  Args:
    table: A named_embed table (`EmbeddingTable`, `QuantizedTable`,
      `LoraTable`, `TrainableRowsTable`, ...), bound (not a
      `pz.ParameterSlot`), on one device or placed with
      `named_embed.shard`.

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: if the table is unbound.

  Example:

  >>> import jax, optax, named_embed as ne
  >>> from flax import nnx
  >>> from named_embed import nnx as ne_nnx
  >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=5,
  ...     embedding_axes={"embedding": 3}))
  >>> [p.label for p in emb.params], len(emb.frozen)
  (['embed.embeddings'], 0)
  >>> def loss(emb):
  ...   return emb(jax.numpy.array([1, 2])).data_array.sum()
  >>> grads = nnx.grad(loss)(emb)
  >>> grads["params"][0][...][1:3].tolist()
  [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """

  def __init__(self, table: contract.AbstractTable):
    skeleton, trainable, frozen = foreign_modules.split_table(
      table, "ne_nnx.Embedding"
    )
    self.params = nnx.List(
      [
        nnx.Param(array, label=info.label)
        for info, array in zip(skeleton.trainable, trainable)
      ]
    )
    self.frozen = nnx.List([FrozenTableArray(array) for array in frozen])
    self.skeleton = skeleton

  @property
  def table(self) -> contract.AbstractTable:
    """The table, rebuilt from the current values of the variables: a
    trainable array held as in the table given (a `pz.Parameter` with its
    label), frozen ones as they were. A snapshot: setting a value on it
    changes nothing here.

    >>> import numpy as np, named_embed as ne
    >>> from named_embed import nnx as ne_nnx
    >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.ones((4, 2), np.float32)).quantized("int8"))
    >>> type(emb.table).__name__, emb.table.vocab_size
    ('QuantizedTable', 4)
    """
    return self.skeleton.rebuild(
      [p.get_value() for p in self.params],
      [f.get_value() for f in self.frozen],
    )

  def __call__(self, tokens: Any, **options: Any) -> Any:
    """`named_embed.lookup` of ``tokens`` in the table, with its options
    (``out_of_range=``, ``max_norm=``, ``dtype=``, ...).

    >>> import numpy as np, named_embed as ne
    >>> from named_embed import nnx as ne_nnx
    >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(
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
    >>> from named_embed import nnx as ne_nnx
    >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(
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
    >>> from named_embed import nnx as ne_nnx
    >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(
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
    >>> from named_embed import nnx as ne_nnx
    >>> emb = ne_nnx.Embedding(ne.EmbeddingTable.from_pretrained(
    ...     np.arange(6, dtype=np.float32).reshape(3, 2)))
    >>> bags = pz.nx.wrap(np.array([[0, 2]])).tag("bag", "member")
    >>> emb.pooled(bags, over="member", mode="mean").data_array.tolist()
    [[2.0, 3.0]]
    """
    return pooled.pooled_lookup(self.table, tokens, **options)


def check_tables(model: Any) -> None:
  """Raises if ``model`` (an nnx module, or any nnx graph) holds a
  named_embed table with trainable arrays outside an `Embedding`.

  Such a table is a static attribute to nnx (or, wrapped in ``nnx.data``,
  a pytree whose `pz.Parameter`s are opaque leaves): every call works, but
  ``nnx.grad`` gives it no gradient and ``nnx.Optimizer`` never updates
  it. A frozen table needs no gradient: nnx keeps one wrapped in
  ``nnx.data`` as plain arrays, which ``wrt=nnx.Param`` leaves alone.

  Raises:
    TypeError: naming every such table by its path in ``model`` and its
      parameters' labels, and the fix (wrap it in `Embedding`).

  Example:

  >>> import jax, named_embed as ne
  >>> from flax import nnx
  >>> from named_embed import nnx as ne_nnx
  >>> table = ne.EmbeddingTable.from_config(
  ...     name="embed", init_base_rng=jax.random.key(0), vocab_size=5,
  ...     embedding_axes={"embedding": 3})
  >>> class Model(nnx.Module):
  ...   def __init__(self, table):
  ...     self.table = table
  >>> ne_nnx.check_tables(Model(table))
  Traceback (most recent call last):
  ...
  TypeError: ne_nnx.check_tables: the model holds 1 named_embed table that nnx will never train (its pz.Parameters are not nnx variables: nnx.grad gives them no gradient, nnx.Optimizer never updates them): `model.table`: an EmbeddingTable holding the pz.Parameter 'embed.embeddings'. Hold each in an `ne_nnx.Embedding(table)` (from named_embed import nnx as ne_nnx) and call it: emb(tokens), emb.attend(hidden), emb.cross_entropy(hidden, targets).
  >>> ne_nnx.check_tables(nnx.List([ne_nnx.Embedding(table)]))  # fine
  """
  found = {}  # path text -> table (a static value may be seen twice)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, contract.AbstractTable):
      found[_path_text(path)] = node
    elif not isinstance(node, nnx.Pytree | nnx.Variable):
      for inner, table in foreign_modules.tables_in(node):  # static values
        found[_path_text((*path, inner))] = table
  trainable = [
    (path, table)
    for path, table in sorted(found.items())
    if foreign_modules.trainable_holders(table)
    and not any(path.startswith((f"{p}.", f"{p}[")) for p in found)
  ]
  if not trainable:
    return
  where = "; ".join(
    f"`{path}`: {foreign_modules.describe(table)}" for path, table in trainable
  )
  count = len(trainable)
  raise TypeError(
    f"ne_nnx.check_tables: the model holds {count} named_embed"
    f" table{'s' if count > 1 else ''} that nnx will never train (its"
    " pz.Parameters are not nnx variables: nnx.grad gives them no"
    f" gradient, nnx.Optimizer never updates them): {where}. Hold each in"
    " an `ne_nnx.Embedding(table)` (from named_embed import nnx as"
    " ne_nnx) and call it: emb(tokens), emb.attend(hidden),"
    " emb.cross_entropy(hidden, targets)."
  )


def _path_text(path: tuple) -> str:
  """``model.a.b[0]`` for an nnx graph path (a pytree key path is text)."""
  text = "model"
  for part in path:
    if isinstance(part, int):
      text += f"[{part}]"
    elif isinstance(part, str) and part.startswith(("[", ".")):
      text += part
    else:
      text += f".{part}"
  return text
