"""Hugging Face checkpoints: find the file that holds a tensor; write one.

A large checkpoint is split over several safetensors files
(``model-00001-of-00004.safetensors``, ...) with an index,
``model.safetensors.index.json``::

  {"metadata": {"total_size": ...}, "weight_map": {tensor name: file name}}

`tensor_file` follows the index to the one file that holds a tensor, so
`named_embed.from_safetensors` opens that file only, and reads its
header and that tensor's bytes: never the rest of the
checkpoint. `find_index`, `read_index`, `file_in_index` and `write_index`
are the index's other readers and its writer (`stored_tensors` follows a
tensor stored in blocks over several files; `distributed_io` writes such
checkpoints). `to_safetensors` writes a table's rows as a plain tensor
that any safetensors reader (transformers, torch, numpy) loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import posixpath
from typing import Any

from named_embed._src.base import regular_files, validation
from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.files import common, tensor_files
from named_embed._src.files.atomic import replacing
from named_embed._src.tables.contract import AbstractTable, check_table
from named_embed._src.tables.table import EmbeddingTable

INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20
"""The largest checkpoint index read (a model of 10,000 tensors has one of
about 1 MB)."""


def tensor_file(path: str | os.PathLike[str], key: str) -> str:
  """The safetensors file of a checkpoint that holds tensor ``key``.

  Args:
    path: A ``.safetensors`` file (returned as it is), a
      ``*.safetensors.index.json`` index, or a checkpoint directory: its
      index if it has one, its only ``.safetensors`` file, or else the one
      of its files whose header lists ``key`` (headers only are read).
    key: The tensor name, e.g. ``"model.embed_tokens.weight"``.

  Returns:
    The path of the file to read.

  Raises:
    FileNotFoundError: if ``path``, or the file the index names, is
      missing, or a directory holds no safetensors file.
    ValueError: if the index is malformed, maps no tensor ``key`` (the
      message names the index and the files it lists), or names a file
      outside its directory; if no file of an index-less directory holds
      ``key`` (the message names the files looked in); if a directory holds
      several indexes; if the index is not a regular file (a FIFO, a
      device) or is larger than `MAX_INDEX_BYTES` (see `read_index`).

  Example:

  >>> import json, os, tempfile, numpy as np
  >>> from safetensors.numpy import save_file
  >>> from named_embed._src.files import checkpoints
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   save_file({"a": np.ones(2, np.float32)}, os.path.join(tmp, "1.safetensors"))
  ...   save_file({"b": np.ones(2, np.float32)}, os.path.join(tmp, "2.safetensors"))
  ...   with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
  ...     json.dump({"weight_map": {"a": "1.safetensors", "b": "2.safetensors"}}, f)
  ...   os.path.basename(checkpoints.tensor_file(tmp, "b"))
  '2.safetensors'
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return _in_directory(path, key)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint file or directory at {path}.")
  if path.endswith(".json"):
    return _from_index(path, key)
  return path


def to_safetensors(
  table: AbstractTable,
  path: str | os.PathLike[str],
  key: str,
  *,
  alignment_rows: bool = False,
) -> None:
  """Writes the table's rows as one plain tensor ``key``, atomically.

  The tensor is ``[vocab_size, *embedding axes]`` in the table's dtype (a
  ``[V, D]`` matrix for a table with one embedding axis), and the file's
  metadata is ``{"format": "pt"}``, which transformers checks, so the file
  loads in any safetensors reader, or into a checkpoint directory beside
  its other tensors (add ``key`` to the index's ``weight_map``). Nothing
  named_embed-specific is kept: use `named_embed.save` for a lossless
  table file, and pass the vocabulary again to `from_safetensors`.

  Any kind of table is written as lookups read it (a quantised table's
  rows dequantised, an adapted table's merged: the float rows a model
  expects), from any layout: the rows are copied to the host one chunk at
  a time (`named_embed._src.files.common.float_rows`).

  Args:
    table: A table whose embeddings are bound.
    path: Destination, conventionally ending in ``.safetensors``.
    key: The tensor name, e.g. ``"model.embed_tokens.weight"``.
    alignment_rows: Also write the rows past ``true_vocab_size``, for a
      model whose configured vocabulary size counts them (Gemma 3: 262,208
      rows for 262,145 tokens). Default: the token rows only.

  Raises:
    TypeError: if ``table`` is not a named_embed table, or ``key`` is not
      a string.
    ValueError: if ``key`` is empty or the table is unbound.

  Example:

  >>> import os, tempfile, numpy as np, named_embed as ne
  >>> from safetensors.numpy import load_file
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.ones((5, 3), np.float32)).padded_to_multiple(4)
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "embed.safetensors")
  ...   ne.to_safetensors(table, path, key="model.embed_tokens.weight")
  ...   load_file(path)["model.embed_tokens.weight"].shape
  (5, 3)

  A quantised table gives its dequantised rows:

  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "embed.safetensors")
  ...   ne.to_safetensors(table.quantized("int8"), path, key="w")
  ...   load_file(path)["w"].dtype, load_file(path)["w"].shape
  (dtype('float32'), (5, 3))
  """
  from safetensors.numpy import save_file

  check_table(table, "ne.to_safetensors")
  if not isinstance(key, str):
    raise TypeError(f"`key` must be a tensor name (a str), got {key!r}.")
  if not key:
    raise ValueError("`key` must be a non-empty tensor name.")
  rows = common.float_rows(table, alignment_rows=alignment_rows)
  with replacing(path) as temp:
    save_file({key: rows}, temp, metadata={"format": "pt"})


def with_alignment_rows(
  table: EmbeddingTable,
  true_vocab_size: int,
  vocabulary: Vocabulary | None,
  padding_index: int | None,
  source: str,
) -> EmbeddingTable:
  """``table`` read from ``source`` with its rows past ``true_vocab_size``
  marked as alignment rows, then its vocabulary and padding row attached
  (`from_safetensors(..., true_vocab_size=...)`).

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float32))
  >>> with_alignment_rows(table, 3, ne.Vocabulary(["a", "b", "c"]), None,
  ...                     "x").vocab_size
  3
  """
  try:
    validation.check_positive_int("true_vocab_size", true_vocab_size)
    table = dataclasses.replace(
      table,
      true_vocab_size=true_vocab_size,
      padding_index=padding_index,
    )
    if vocabulary is not None:
      table = table.with_vocabulary(vocabulary)
  except (TypeError, ValueError) as error:
    raise type(error)(f"{source}: {error}") from None
  return table


def explained(
  error: ValueError, vocabulary: Vocabulary | None, num_rows: int
) -> ValueError:
  """``error``, with a hint when the vocabulary is shorter than the tensor
  (its last rows may be alignment rows, as in Gemma 3).

  >>> import named_embed as ne
  >>> print(explained(ValueError("Mismatch."), ne.Vocabulary(["a"]), 4))
  Mismatch. If rows 1 to 3 are alignment rows (kept so that the row count is a multiple, as in Gemma 3), pass `true_vocab_size=1`.
  """
  if vocabulary is None or len(vocabulary) >= num_rows:
    return error
  size = len(vocabulary)
  return ValueError(
    f"{error} If rows {size} to {num_rows - 1} are alignment rows (kept so"
    " that the row count is a multiple, as in Gemma 3), pass"
    f" `true_vocab_size={size}`."
  )


# ------------------------------------------------------------------ helpers


def _in_directory(directory: str, key: str) -> str:
  index = find_index(directory)
  if index is not None:
    return _from_index(index, key)
  names = sorted(os.listdir(directory))
  files = [n for n in names if n.endswith(".safetensors")]
  if not files:
    raise FileNotFoundError(
      f"{directory} holds no .safetensors file and no *{INDEX_SUFFIX} index."
    )
  if len(files) == 1:
    return os.path.join(directory, files[0])
  for name in files:  # no index: read the headers, not the tensors
    if key in _tensor_names(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise ValueError(
    f"No safetensors file in {directory} has a tensor {key!r}; looked in"
    f" {common.available(files)} (the directory has no *{INDEX_SUFFIX} index)."
  )


def _tensor_names(path: str) -> list[str]:
  f = tensor_files.open_file(path)  # the header only
  f.close()
  return f.names


def _from_index(index: str, key: str) -> str:
  weight_map = _read_weight_map(index)
  name = weight_map.get(key)
  if name is None:
    close = difflib.get_close_matches(key, list(weight_map), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    files = sorted(set(weight_map.values()))
    raise ValueError(
      f"{index} maps no tensor {key!r}, so none of its files"
      f" {common.available(files)} holds it.{hint} It maps {len(weight_map)}"
      f" tensors: {common.available(list(weight_map))}."
    )
  return file_in_index(index, key, name)


def file_in_index(index: str, key: str, name: str) -> str:
  """The path of file ``name``, to which ``index`` maps tensor ``key``.

  Raises:
    ValueError: if ``name`` points outside the index's directory.
    FileNotFoundError: if the file does not exist.

  >>> file_in_index("ckpt/model.safetensors.index.json", "w", "../x")
  Traceback (most recent call last):
  ...
  ValueError: ckpt/model.safetensors.index.json maps tensor 'w' to '../x', outside the index's directory; refusing to read it.
  """
  parts = posixpath.normpath(name.replace("\\", "/")).split("/")
  if os.path.isabs(name) or ".." in parts:
    raise ValueError(
      f"{index} maps tensor {key!r} to {name!r}, outside the index's"
      " directory; refusing to read it."
    )
  path = os.path.join(os.path.dirname(index), *parts)
  if not os.path.exists(path):  # one that is not a file: refused on opening
    raise FileNotFoundError(
      f"{index} maps tensor {key!r} to {name!r}, but {path} does not exist"
      " (an incomplete download?)."
    )
  return path


def _read_weight_map(index: str) -> dict[str, str]:
  return read_index(index)[1]


def find_index(path: str | os.PathLike[str]) -> str | None:
  """The checkpoint index that ``path`` names, or None.

  ``path`` is an index itself (``*.safetensors.index.json``), or a
  directory holding one; a file, or a directory without an index, gives
  None.

  Raises:
    ValueError: if a directory holds several indexes.

  >>> import os, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   print(find_index(tmp))
  ...   open(os.path.join(tmp, "model" + INDEX_SUFFIX), "w").close()
  ...   print(os.path.basename(find_index(tmp)))
  None
  model.safetensors.index.json
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    return path if path.endswith(".json") and os.path.isfile(path) else None
  indexes = [n for n in sorted(os.listdir(path)) if n.endswith(INDEX_SUFFIX)]
  if len(indexes) > 1:
    raise ValueError(
      f"{path} holds several checkpoint indexes {indexes}; pass the"
      f" one to read, e.g. {os.path.join(path, indexes[0])!r}."
    )
  return os.path.join(path, indexes[0]) if indexes else None


def read_index(index: str) -> tuple[dict[str, Any], dict[str, str]]:
  """The ``metadata`` and ``weight_map`` of a checkpoint index.

  The index is read once, after checking that it is a regular file of at
  most `MAX_INDEX_BYTES`.

  Raises:
    ValueError: for a path that is not a regular file (a FIFO, a device),
      an index larger than `MAX_INDEX_BYTES`, invalid JSON, or an index
      without a ``weight_map`` object ``{tensor name: file name}``.
    FileNotFoundError: if it is missing.

  >>> import json, os, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   index = os.path.join(tmp, "model" + INDEX_SUFFIX)
  ...   write_index(index, {"w": "model-00001-of-00001.safetensors"}, {"a": 1})
  ...   read_index(index)
  ({'a': 1}, {'w': 'model-00001-of-00001.safetensors'})
  """
  what = "checkpoint index"
  data = regular_files.read_regular(index, f"a {what}", MAX_INDEX_BYTES)
  spec = tensor_files.parse_json(index, data, what)
  weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
  if not isinstance(weight_map, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
  ):
    raise ValueError(
      f"{index} is not a safetensors checkpoint index: it needs a"
      ' "weight_map" object {tensor name: file name}.'
    )
  metadata = spec.get("metadata")
  return (metadata if isinstance(metadata, dict) else {}), weight_map


def write_index(
  index: str | os.PathLike[str],
  weight_map: dict[str, str],
  metadata: dict[str, Any],
) -> None:
  """Writes ``{"metadata": ..., "weight_map": ...}`` to ``index``,
  atomically.

  >>> import os, pathlib, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   write_index(os.path.join(tmp, "i.json"), {"w": "a.safetensors"}, {})
  ...   print(pathlib.Path(tmp, "i.json").read_text().split())
  ['{', '"metadata":', '{},', '"weight_map":', '{', '"w":', '"a.safetensors"', '}', '}']
  """
  text = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2)
  with replacing(index) as temp:
    with open(temp, "w", encoding="utf-8") as f:
      f.write(text + "\n")
