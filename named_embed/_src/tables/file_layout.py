"""What a kind of table is made of in a file: its part of the table contract.

`named_embed.save` and `named_embed.load` write and read every kind of table
through the same steps (`named_embed._src.files`); what differs between
kinds is only which named tensors a table is stored as and which string
metadata entries say how to rebuild it. A kind says so itself, in three
members (see `named_embed._src.tables.contract.AbstractTable`):

- ``FILE_KIND``: the value of the file's ``table`` entry naming the kind;
- ``file_layout()``: its `FileLayout` (tensors and kind entries);
- ``file_tensors(metadata, path)`` and ``from_file(arrays, metadata,
  fields, hold, path)``: the tensors a file of the kind holds, and the table
  of them.

`stored_kinds` finds the kinds by ``FILE_KIND``, so a new kind that
declares these is saved and loaded without teaching the file layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class StoredArray(NamedTuple):
  """One tensor of a table's file: its axis names in the stored order, the
  value (a `NamedArray`, a penzai variable holding one, or a raw array
  already in that order), and the prefix of the metadata entries recording
  how the value is held (``None`` for an array that is always frozen, as a
  base's arrays are).

  >>> import numpy as np
  >>> StoredArray(("vocabulary", "embedding"), np.ones((3, 2)), None).axes
  ('vocabulary', 'embedding')
  """

  axes: tuple[str, ...]
  value: Any
  holder_prefix: str | None


class FileLayout(NamedTuple):
  """A table as stored: its tensors by name and the string metadata entries
  of its kind (beyond what every table writes: axes, pad token row,
  alignment rows, vocabulary).

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> layout = table.quantized("int8").file_layout()
  >>> sorted(layout.arrays), layout.entries["scheme"]
  (['codes', 'scales'], 'int8')
  """

  arrays: dict[str, StoredArray]
  entries: dict[str, str]


Hold = Callable[[Any, str, str], Any]
"""``hold(value, holder_prefix, default_label)``: ``value`` held as the
file's entries under ``holder_prefix`` say (frozen, or a parameter with its
label), or as the caller of `named_embed.load` asked (``freeze=``)."""


def corrupt(path: str, kind: Any, detail: str) -> ValueError:
  """The error of a file whose metadata do not make a table of its kind.

  >>> corrupt("t.safetensors", "lora", "no alpha")
  ValueError('t.safetensors: corrupt named_embed file of a lora table: no alpha')
  """
  return ValueError(
    f"{path}: corrupt named_embed file of a {kind} table: {detail}"
  )


def stored_kinds(root: type) -> dict[str, type]:
  """The kinds of table under ``root`` (the table contract) by their
  ``FILE_KIND``: every subclass that declares one, in every module
  imported so far.

  >>> import named_embed as ne
  >>> from named_embed._src.tables.contract import AbstractTable
  >>> sorted(stored_kinds(AbstractTable))
  ['embedding', 'lora', 'quantized', 'trainable_rows']
  """
  found, todo = {}, [root]
  while todo:
    kind = todo.pop()
    todo.extend(kind.__subclasses__())
    name = kind.__dict__.get("FILE_KIND")
    if name is not None:
      found[name] = kind
  return found
