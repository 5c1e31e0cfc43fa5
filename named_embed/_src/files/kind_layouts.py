"""Every kind of table but the plain one, as its file layout says.

`named_embed._src.files.safetensors_io` writes and reads every kind of
table through the same steps (one file, or a checkpoint directory whose
every process writes its own blocks; loads placed on a mesh, each process
reading its own share of each tensor). What a kind is made of in a file is
the kind's own part of the table contract
(`named_embed._src.tables.file_layout`): this module turns that layout into
named tensors (`tensors`) and string metadata (`metadata`: the entries
every table writes, `file_metadata.table_metadata`, ``table`` naming the
kind, how each trainable array is held, and the kind's entries), and back
(`keys`, `build`). The kinds of this version write:

====================  =====================================================
``table``             tensors and extra metadata
====================  =====================================================
``quantized``         ``codes`` (int8, or uint8 two values a byte),
                      ``scales`` (float32); ``scheme``, ``group_size``,
                      ``embedding_sizes``, ``dtype`` (the float dtype),
                      ``base: quantized``
``lora``              the base's tensors (``embeddings``, or ``codes`` and
                      ``scales``) and entries, ``base`` naming its kind,
                      ``lora_a``, ``lora_b``; ``alpha``, how each adapter
                      is held and its label
``trainable_rows``    the base's tensors and entries, ``base``, and
                      ``trainable_rows``; ``row_ids``, how the rows are
                      held and their label
====================  =====================================================

``embeddings``, ``codes``, ``scales`` and ``lora_a`` lead with the
vocabulary axis, so a vocabulary rule splits them over the mesh (each
process reads only its rows of them); ``lora_b`` ``{rank, *embedding}``
and ``trainable_rows`` ``{rows, *embedding}`` are small and follow the
rules of their own axes (replicated under a vocabulary-only rule).
"""

from __future__ import annotations

import json
from typing import Any

from penzai import pz

from named_embed._src.files import file_metadata
from named_embed._src.files.file_metadata import Tensor
from named_embed._src.rows import row_source
from named_embed._src.tables import contract, file_layout


def kinds() -> tuple[str, ...]:
  """The values of the ``table`` metadata entry this version reads.

  >>> kinds()
  ('lora', 'quantized', 'trainable_rows')
  """
  found = file_layout.stored_kinds(contract.AbstractTable)
  return tuple(sorted(name for name in found if name != "embedding"))


def tensors(table: Any) -> dict[str, Tensor]:
  """The tensors ``table`` is stored as, by name, each with its axis names
  (the arrays as the table holds them: no copy when stored in that order).

  Raises:
    TypeError: for a kind of table without a file layout.
    ValueError: if an adapter is an unbound `pz.ParameterSlot`.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
  >>> {k: t.axes for k, t in tensors(table.quantized("int4", 2)).items()}
  {'codes': ('vocabulary', 'embedding'), 'scales': ('vocabulary', 'embedding')}
  """
  found = {}
  for name, stored in _layout(table).arrays.items():
    if stored.holder_prefix is not None:  # refuses an unbound slot
      file_metadata.holder_metadata(stored.value, stored.holder_prefix)
    found[name] = Tensor(stored.axes, _in_order(stored.value, stored.axes))
  return found


def metadata(table: Any) -> dict[str, str]:
  """The string metadata of ``table``'s file (see the module docstring).

  Raises:
    TypeError: for a kind of table without a file layout.
    ValueError: if an adapter is an unbound `pz.ParameterSlot`.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
  >>> found = metadata(table.quantized("int8"))
  >>> found["table"], found["scheme"], found["group_size"]
  ('quantized', 'int8', 'null')
  """
  layout = _layout(table)
  found = file_metadata.table_metadata(table)
  found[file_metadata.KIND_KEY] = table.FILE_KIND
  for stored in layout.arrays.values():
    if stored.holder_prefix is not None:
      prefix = stored.holder_prefix
      found.update(file_metadata.holder_metadata(stored.value, prefix))
  found.update(layout.entries)
  return found


def keys(metadata: dict[str, Any], path: str) -> tuple[str, ...]:
  """The tensors a file of a quantised or adapted table holds, by its
  metadata.

  Raises:
    ValueError: for metadata that names no known kind or base.

  >>> keys({"table": "lora", "base": "quantized"}, "t.safetensors")
  ('codes', 'scales', 'lora_a', 'lora_b')
  """
  return _kind(metadata, path).file_tensors(metadata, path)


def build(
  arrays: dict[str, Any],
  metadata: dict[str, Any],
  path: str,
  freeze: bool | None,
) -> Any:
  """The table of ``arrays`` (by tensor name, see `keys`) and its file's
  ``metadata``; ``freeze`` as in `named_embed.load`. The arrays may be
  numpy, placed jax arrays, or abstract ones (`jax.eval_shape`).

  Raises:
    ValueError: naming ``path``, if the tensors or metadata do not make a
      table of the recorded kind.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
  >>> q = table.quantized("int8")
  >>> again = build({k: t.array for k, t in tensors(q).items()},
  ...               metadata(q), "q.safetensors", None)
  >>> type(again).__name__, again.codes.named_shape
  ('QuantizedTable', {'vocabulary': 2, 'embedding': 4})
  """
  kind = metadata.get(file_metadata.KIND_KEY)

  def hold(value: Any, prefix: str, default_label: str) -> Any:
    return file_metadata.held_as_saved(
      value, metadata, prefix, freeze, default_label
    )

  try:
    # every kind's first tensor leads with the vocabulary (`file_tensors`)
    rows = next(iter(arrays.values())).shape[0]
    fields = file_metadata.parse_metadata(metadata, path, rows)
    return _kind(metadata, path).from_file(arrays, metadata, fields, hold, path)
  except (KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
    if str(error).startswith(f"{path}:"):
      raise
    raise file_layout.corrupt(
      path, kind, f"{type(error).__name__}: {error}"
    ) from None


def _layout(table: Any) -> file_layout.FileLayout:
  """``table``'s file layout, or the TypeError of a kind without one."""
  if type(table).FILE_KIND is None:
    contract.AbstractTable.file_layout(table)  # raises the TypeError
  return table.file_layout()


def _kind(metadata: dict[str, Any], path: str) -> type:
  """The kind of table a file's metadata name, or a ValueError."""
  name = metadata.get(file_metadata.KIND_KEY)
  kind = contract.stored_kind(name) if name != "embedding" else None
  if kind is None:
    raise ValueError(
      f"{path} holds a kind of table, {name!r}, that this version of"
      f" named_embed does not read (it reads plain tables and"
      f" {kinds()}). Upgrade named_embed to read it."
    )
  return kind


def _in_order(value: Any, axes: tuple[str, ...]) -> Any:
  """The data of a stored value with axes ``axes``, in that order (no
  transpose, hence no copy, when it is stored so)."""
  if isinstance(value, pz.nx.NamedArrayBase):
    named = value
  elif isinstance(getattr(value, "value", None), pz.nx.NamedArrayBase):
    named = value.value  # a penzai variable holding the array
  else:
    return value  # a raw array, already in the stored order
  return row_source.raw_in_order(named, axes)
