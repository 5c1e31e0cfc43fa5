"""safetensors files: `save` / `load` of whole tables, `from_safetensors`.

A table file holds one tensor, ``"embeddings"``, laid out
``[vocabulary, *embedding axes]`` in the table's own dtype (float32,
bfloat16 and float16 round-trip bit for bit), and string metadata:

========================  ===================================================
``named_embed``           format version, ``"1"``
``vocabulary_axis``       name of the vocabulary axis
``embedding_axes``        JSON list of the embedding axis names, in order
``padding_index``         JSON int or ``null``
``vocabulary``            JSON ``{"tokens": [...], "roles": {"pad": ...}}``
                          (only when the table has a vocabulary)
``kind``                  ``array`` (frozen), ``parameter`` or
                          ``parameter_value``
``label``                 the parameter's label (not for ``array``)
========================  ===================================================

safetensors holds raw little-endian numbers and a JSON header, nothing
executable, so reading a file never runs code (unlike pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from named_embed import _table_arrays
from named_embed.formats import checkpoints, distributed_io, stored_tensors
from named_embed.formats._atomic import replacing
from named_embed.formats._common import (
  VocabularyLike,
  as_vocabulary,
  available,
  build_table,
  host_rows,
)
from named_embed.table import EmbeddingTable
from named_embed.vocabulary import SPECIAL_ROLES, Vocabulary

if TYPE_CHECKING:
  from jax.sharding import Mesh

FORMAT_VERSION = "1"
TENSOR_KEY = "embeddings"
_KINDS = ("array", "parameter", "parameter_value")


def save(table: EmbeddingTable, path: str | os.PathLike[str]) -> None:
  """Writes ``table`` to one safetensors file, atomically.

  Kept: the values bit for bit (any floating dtype), the axis names and
  their order, the padding index, the vocabulary with its roles, and
  whether the table was frozen or trainable (with the parameter's label).
  A `QuantizedTable`, `LoraTable` or `TrainableRowsTable` is written with
  all its parts (codes and scales, the base and its adapters), bit for
  bit, and `load` returns the same kind (``docs/compression.md``).
  Not kept: `pz.Parameter` metadata. The file is written next to ``path``
  under a temporary name and renamed over it when complete, so an
  interrupted save leaves the previous file (or none), never half a file.

  A ``path`` without a suffix (``"out"``) is a checkpoint directory in
  the Hugging Face sharded layout instead: under `jax.distributed` every
  process calls `save` and writes the rows it holds, then process 0 the
  index (`named_embed.formats.distributed_io`; ``docs/sharding.md``).

  Args:
    table: A table whose embeddings are bound (not a `pz.ParameterSlot`).
    path: Destination: a file (``table.safetensors``), or a directory
      (a path without a suffix, or an existing directory).

  Raises:
    TypeError: if ``table`` is not an `EmbeddingTable`.
    ValueError: if the table's embeddings are unbound, or span processes
      and ``path`` names one file.

  Example:

  >>> import os, tempfile, numpy as np, named_embed as ne
  >>> from named_embed import formats
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.arange(6, dtype=np.float32).reshape(3, 2)
  ... ).with_vocabulary(ne.Vocabulary(["<pad>", "a", "b"], pad="<pad>"))
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "table.safetensors")
  ...   formats.save(table, path)
  ...   loaded = formats.load(path)
  >>> loaded.padding_index, loaded.vocabulary.tokens, loaded.embedding_axes
  (0, ('<pad>', 'a', 'b'), {'embedding': 2})
  """
  from safetensors.numpy import save_file

  if not isinstance(table, EmbeddingTable):
    from named_embed.formats import _compressed

    if _compressed.handles(table):  # quantised, LoRA, trainable rows
      if distributed_io.is_directory_path(path):
        raise NotImplementedError(
          f"ne.save({os.fspath(path)!r}): a {type(table).__name__} is saved"
          " as one file, not as a directory of per-process shards; give a"
          " path with a suffix, e.g. 'table.safetensors' (on one process)."
        )
      _compressed.save(table, path)
      return
    raise TypeError(
      f"save() writes an EmbeddingTable; got {type(table).__name__}."
    )
  if distributed_io.is_directory_path(path):  # every process its own rows
    distributed_io.save_directory(
      table.rows_array(),
      path,
      TENSOR_KEY,
      _table_metadata(table),
      what=f"ne.save({os.fspath(path)!r})",
    )
    return
  distributed_io.check_one_file(table.rows_array(), path)
  rows = host_rows(table)
  metadata = _table_metadata(table)
  with replacing(path) as temp:
    save_file({TENSOR_KEY: rows}, temp, metadata=metadata)


def load(
  path: str | os.PathLike[str],
  *,
  freeze: bool | None = None,
  mesh: Mesh | None = None,
  rules: Mapping[str, Any] | None = None,
) -> EmbeddingTable:
  """Reads a table written by `save`.

  Args:
    path: The file, or the checkpoint directory (or its index).
    freeze: None restores the table as saved (frozen, or trainable with
      its parameter label); True gives a frozen table; False a trainable
      one (a `pz.Parameter` with the saved label, or
      ``"embeddings.embeddings"`` if the table was saved frozen).
    mesh: If given, the table is placed on it by ``rules`` (as
      `named_embed.shard` would), each process reading only its own
      devices' rows; every process makes the call, and an error on one is
      raised on all. A quantised or adapted table is read whole, then
      placed with `named_embed.shard`.
    rules: Axis name -> mesh axis, with ``mesh``.

  Returns:
    The table, with its vocabulary if it had one.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: for a corrupt or truncated file, a safetensors file that
      `save` did not write (use `from_safetensors` for those), or metadata
      that does not match the tensor.

  Example:

  >>> import os, tempfile, numpy as np, named_embed as ne
  >>> from named_embed import formats
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((4, 2), np.float16),
  ...                                           freeze=False, name="tok")
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   formats.save(table, os.path.join(tmp, "t.safetensors"))
  ...   loaded = formats.load(os.path.join(tmp, "t.safetensors"))
  >>> loaded.dtype, loaded.frozen, loaded.embeddings.label
  (dtype('float16'), False, 'tok.embeddings')
  """
  from named_embed.formats import _compressed

  path = os.fspath(path)
  compressed = _compressed.load_if_compressed(path, freeze)
  if compressed is not None:  # a quantised or adapted table
    if mesh is None:
      return compressed
    from named_embed.sharding import shard  # read whole, then placed

    return shard(compressed, mesh, rules or {})
  return distributed_io.load(
    lambda: distributed_io.open_saved(path, TENSOR_KEY, check=_check_marker),
    lambda stored, rows: _table_from(rows, stored.metadata, path, freeze),
    mesh=mesh,
    rules=rules,
    what=f"ne.load({path!r})",
  )


def _table_from(
  rows: Any, metadata: dict[str, Any], path: str, freeze: bool | None
) -> EmbeddingTable:
  """The table of a file's rows and metadata (see `load`)."""
  spec = parse_metadata(metadata, path)
  padded = spec["true_vocab_size"] is not None
  table = build_table(
    rows,
    source=path,
    vocabulary=None if padded else spec["vocabulary"],
    vocabulary_axis=spec["vocabulary_axis"],
    embedding_axes=spec["embedding_axes"],
    padding_index=None if padded else spec["padding_index"],
  )
  if padded:  # alignment rows at the end: the vocabulary covers the rest
    try:
      table = dataclasses.replace(
        table,
        true_vocab_size=spec["true_vocab_size"],
        padding_index=spec["padding_index"],
      ).with_vocabulary(spec["vocabulary"])
    except ValueError as error:
      raise ValueError(f"{path}: {error}") from None
  kind = spec["kind"]
  if freeze is not None:
    kind = "array" if freeze else "parameter"
  if kind == "array":
    return table
  label = spec["label"] or "embeddings.embeddings"
  return dataclasses.replace(
    table, embeddings=_table_arrays.hold(kind, table.value, label)
  )


def from_safetensors(
  path: str | os.PathLike[str],
  key: str,
  *,
  vocabulary: VocabularyLike = None,
  vocabulary_axis: str = "vocabulary",
  embedding_axes: Sequence[str] | str | None = None,
  padding_index: int | None = None,
  freeze: bool = True,
  name: str = "embeddings",
  true_vocab_size: int | None = None,
  mesh: Mesh | None = None,
  rules: Mapping[str, Any] | None = None,
) -> EmbeddingTable:
  """Reads one tensor of a model checkpoint as an `EmbeddingTable`.

  Only the header and the tensor ``key`` are read, so taking the word
  embeddings of a large checkpoint costs the size of that tensor. Its
  first axis is the vocabulary. A sharded checkpoint (several files and a
  ``*.safetensors.index.json``) is read through its index: only the file
  holding ``key`` is opened (`named_embed.formats.checkpoints`).

  Args:
    path: A ``.safetensors`` file (e.g. a Hugging Face ``model.safetensors``),
      a checkpoint directory, or a ``*.safetensors.index.json`` index.
    key: The tensor, e.g. ``"embeddings.word_embeddings.weight"`` (BERT) or
      ``"model.embed_tokens.weight"`` (Llama).
    vocabulary: A `Vocabulary`, or a path to a ``vocab.txt`` /
      ``tokenizer.json`` (read with `Vocabulary.load`, which guesses the
      pad/unk/bos/eos roles; a pad role sets ``padding_index``), or None.
    vocabulary_axis: Name of the vocabulary axis.
    embedding_axes: Names of the other axes (default ``("embedding",)``
      for a 2-D tensor; required for more dimensions).
    padding_index: Padding row; negative values count from the end.
    freeze: Frozen (default) or trainable, as in
      `EmbeddingTable.from_pretrained`.
    name: Parameter label prefix when ``freeze=False``.
    true_vocab_size: The number of tokens when the tensor has alignment
      rows after them (Gemma 3: 262,145 tokens in 262,208 rows); the
      vocabulary then covers the tokens only. Default: every row a token.
    mesh: Place the table on this mesh, each process reading only its own
      devices' rows of the tensor (see `load`).
    rules: Axis name -> mesh axis, with ``mesh``.

  Returns:
    The table, with the vocabulary attached if one was given.

  Raises:
    FileNotFoundError: if ``path`` (or the vocabulary file, or the file an
      index names) is missing.
    ValueError: for a corrupt file or index, a ``key`` the checkpoint does
      not hold (the message names the files looked in and lists the
      tensors), or a vocabulary whose length is not the number of tokens.
    TypeError: for a non-floating tensor.

  Example:

  >>> import os, tempfile, numpy as np
  >>> from safetensors.numpy import save_file
  >>> from named_embed import formats
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "model.safetensors")
  ...   save_file({"embed.weight": np.ones((3, 4), np.float32),
  ...              "head.bias": np.zeros(3, np.float32)}, path)
  ...   with open(os.path.join(tmp, "vocab.txt"), "w") as f:
  ...     _ = f.write("[PAD]\\nhello\\nworld\\n")
  ...   table = formats.from_safetensors(
  ...       path, key="embed.weight", vocabulary=os.path.join(tmp, "vocab.txt"))
  >>> table.vocab_size, table.padding_index, table.vocabulary.token(1)
  (3, 0, 'hello')
  """
  vocabulary = as_vocabulary(vocabulary)

  def build(stored: stored_tensors.StoredTensor, rows: Any) -> EmbeddingTable:
    source = stored.describe()
    aligned = true_vocab_size is not None
    try:
      table = build_table(
        rows,
        source=source,
        vocabulary=None if aligned else vocabulary,
        vocabulary_axis=vocabulary_axis,
        embedding_axes=embedding_axes,
        padding_index=None if aligned else padding_index,
        freeze=freeze,
        name=name,
      )
    except ValueError as error:
      raise checkpoints.explained(error, vocabulary, len(rows)) from None
    if aligned:
      table = checkpoints.with_alignment_rows(
        table, true_vocab_size, vocabulary, padding_index, source
      )
    return table

  return distributed_io.load(
    lambda: stored_tensors.open_tensor(path, key),
    build,
    mesh=mesh,
    rules=rules,
    what=f"ne.from_safetensors({os.fspath(path)!r}, {key!r})",
  )


# ------------------------------------------------------------------ reading


def _check_marker(path: str, metadata: dict[str, str], keys: list[str]):
  version = metadata.get("named_embed")
  if version is None:
    raise ValueError(
      f"{path} is a safetensors file without named_embed metadata (it holds"
      f" the tensors {available(keys)}), so `save` did not write it. To read"
      " one tensor of a model checkpoint as a table, use"
      " `from_safetensors(path, key=..., vocabulary=...)`."
    )
  if version != FORMAT_VERSION:
    raise ValueError(
      f"{path} uses named_embed file format version {version!r}; this"
      f" version of named_embed reads version {FORMAT_VERSION!r}. Upgrade"
      " named_embed to read it."
    )


# ----------------------------------------------------------------- metadata


def _table_metadata(table: EmbeddingTable) -> dict[str, str]:
  embeddings = table.embeddings
  kind = _table_arrays.holder_kind(embeddings)
  metadata = {
    "named_embed": FORMAT_VERSION,
    "vocabulary_axis": table.vocabulary_axis,
    "embedding_axes": json.dumps(list(table.embedding_axes)),
    "padding_index": json.dumps(table.padding_index),
    "true_vocab_size": json.dumps(table.true_vocab_size),
    "kind": kind,
  }
  if kind != "array":
    metadata["label"] = embeddings.label
  if table.vocabulary is not None:
    metadata["vocabulary"] = json.dumps(
      {
        "tokens": list(table.vocabulary.tokens),
        "roles": table.vocabulary.roles,
      }
    )
  return metadata


def parse_metadata(metadata: dict[str, str], path: str) -> dict[str, Any]:
  """The checked table fields of a file's metadata (axes, pad row,
  alignment rows, vocabulary, holder kind and label); also read by the
  files of compressed and adapted tables (`named_embed.formats._compressed`).

  Raises:
    ValueError: naming the corrupt field and the file.
  """

  def bad(field: str, why: str) -> ValueError:
    shown = metadata.get(field)
    shown = shown if shown is None or len(shown) < 80 else shown[:80] + "..."
    return ValueError(
      f"{path}: corrupt named_embed metadata: {field!r} {why}; got {shown!r}."
    )

  def field_json(field: str, default: Any = None) -> Any:
    if field not in metadata:
      return default
    try:
      return json.loads(metadata[field])
    except json.JSONDecodeError:
      raise bad(field, "is not valid JSON") from None

  spec = {
    "vocabulary_axis": metadata.get("vocabulary_axis"),
    "embedding_axes": field_json("embedding_axes"),
    "padding_index": field_json("padding_index"),
    "true_vocab_size": field_json("true_vocab_size"),
    "kind": metadata.get("kind", "array"),
    "label": metadata.get("label"),
  }
  if not isinstance(spec["vocabulary_axis"], str):
    raise bad("vocabulary_axis", "must be an axis name")
  axes = spec["embedding_axes"]
  if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
    raise bad("embedding_axes", "must be a JSON list of axis names")
  padding = spec["padding_index"]
  if padding is not None and (type(padding) is not int):
    raise bad("padding_index", "must be a JSON integer or null")
  true_size = spec["true_vocab_size"]
  if true_size is not None and (type(true_size) is not int or true_size < 1):
    raise bad("true_vocab_size", "must be a positive JSON integer or null")
  if spec["kind"] not in _KINDS:
    raise bad("kind", f"must be one of {_KINDS}")
  spec["vocabulary"] = _parse_vocabulary(field_json("vocabulary"), bad)
  return spec


def _parse_vocabulary(spec: Any, bad) -> Vocabulary | None:
  if spec is None:
    return None
  tokens = spec.get("tokens") if isinstance(spec, dict) else None
  roles = spec.get("roles", {}) if isinstance(spec, dict) else None
  if not isinstance(tokens, list) or not isinstance(roles, dict):
    raise bad("vocabulary", 'must be {"tokens": [...], "roles": {...}}')
  unknown = sorted(set(roles) - set(SPECIAL_ROLES))
  if unknown:
    raise bad("vocabulary", f"has unknown roles {unknown}")
  try:
    return Vocabulary(tokens, **roles)
  except ValueError as error:
    raise bad("vocabulary", f"is not a valid vocabulary ({error})") from None
