"""safetensors files: `save` / `load` of whole tables, `from_safetensors`.

A plain table's file holds one tensor, ``"embeddings"``, laid out
``[vocabulary, *embedding axes]`` in the table's own dtype (float32,
bfloat16 and float16 round-trip bit for bit), and string metadata
(`named_embed._src.files.file_metadata` lists the entries). A quantised or
adapted table's file holds the tensors of its parts
(`named_embed._src.files.kind_layouts`). Every kind is written and read
through the same steps: its tensors (each with its axis names) and
metadata go to one file, or to a checkpoint directory where every process
writes its own blocks of each tensor (`named_embed._src.files.distributed_io`),
and a load with a mesh reads each process's share of each tensor.

safetensors holds raw little-endian numbers and a JSON header, nothing
executable, so reading a file never runs code (unlike pickle).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from named_embed._src.files import (
  checkpoints,
  common,
  directory_saves,
  distributed_io,
  file_metadata,
  kind_layouts,
  stored_tensors,
)
from named_embed._src.files.atomic import replacing
from named_embed._src.files.file_metadata import TENSOR_KEY, Tensor
from named_embed._src.tables import contract
from named_embed._src.tables.table import EmbeddingTable

if TYPE_CHECKING:
  from jax.sharding import Mesh

FORMAT_VERSION = file_metadata.FORMAT_VERSION


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
  the Hugging Face sharded layout instead, for every kind of table: under
  `jax.distributed` every process calls `save` and writes its blocks of
  each tensor (rows; codes and scales; a base and its adapters), then
  process 0 the index (`named_embed._src.files.distributed_io`;
  ``docs/sharding.md``).

  Args:
    table: A table whose embeddings are bound (not a `pz.ParameterSlot`).
    path: Destination: a file (``table.safetensors``), or a directory
      (a path without a suffix, or an existing directory).

  Raises:
    TypeError: if ``table`` is not an `EmbeddingTable`, `QuantizedTable`,
      `LoraTable` or `TrainableRowsTable`.
    ValueError: if the table's embeddings (or adapters) are unbound, or
      span processes and ``path`` names one file.

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
  tensors, metadata = _tensors(table), _metadata(table)
  file_metadata.check_writable(metadata, f"ne.save({os.fspath(path)!r})")
  arrays = {key: tensor.array for key, tensor in tensors.items()}
  if distributed_io.is_directory_path(path):  # every process its own rows
    distributed_io.save_directory(
      arrays, path, metadata, what=f"ne.save({os.fspath(path)!r})"
    )
    return
  distributed_io.check_one_file(arrays, path)
  # C order: safetensors writes the raw buffer of what it is given
  host = {key: np.ascontiguousarray(array) for key, array in arrays.items()}
  with replacing(path) as temp:
    directory_saves.write_tensor_file(host, temp, metadata)


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
      devices' share of each tensor (the rows, or the codes and scales of a
      quantised table, a base and LoRA's ``A``; small tensors that the
      rules replicate, such as ``B`` and trained rows, whole); every
      process makes the call, and an error on one is raised on all.
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
  path = os.fspath(path)
  return distributed_io.load(
    lambda: distributed_io.open_saved(
      path, lambda metadata: _keys(metadata, path), _check_saved
    ),
    lambda stored, arrays: _table_of(stored, arrays, path, freeze),
    _tensors,
    mesh=mesh,
    rules=rules,
    what=f"ne.load({path!r})",
  )


# ----------------------------------------------------------- every kind


def _tensors(table: Any) -> dict[str, Tensor]:
  """The tensors ``table`` is stored as (see `kind_layouts.tensors`)."""
  if isinstance(table, EmbeddingTable):
    axes = (table.vocabulary_axis, *table.embedding_axes)
    return {TENSOR_KEY: Tensor(axes, table.rows_array())}
  contract.check_table(table, "ne.save")
  return kind_layouts.tensors(table)  # quantised, adapted, later kinds


def _metadata(table: Any) -> dict[str, str]:
  if isinstance(table, EmbeddingTable):
    return {
      **file_metadata.table_metadata(table),
      **file_metadata.holder_metadata(table.embeddings),
    }
  return kind_layouts.metadata(table)


def _keys(metadata: dict[str, Any], path: str) -> tuple[str, ...]:
  """The tensors of a file, by the kind of table its metadata names."""
  if metadata.get(file_metadata.KIND_KEY) is None:
    return (TENSOR_KEY,)
  return kind_layouts.keys(metadata, path)


def _check_saved(path: str, metadata: dict[str, Any], names: list[str]):
  """Raises unless ``ne.save`` wrote the file (or index) and it holds the
  tensors of the kind its metadata names, no others: a file whose ``table``
  entry is lost must not load as a plain table without its adapters."""
  file_metadata.check_marker(path, metadata, names)
  expected = _keys(metadata, path)
  stored = {stored_tensors.parse_block_name(name)[0] for name in names}
  extra = sorted(stored - set(expected))
  if extra:
    kind = metadata.get(file_metadata.KIND_KEY)
    said = (
      f"names a {kind!r} table" if kind else "names no kind (a plain table)"
    )
    raise ValueError(
      f"{path}: its metadata {said}, made of the tensors {list(expected)},"
      f" but it also holds {common.available(extra)}: damaged metadata, or a"
      " file named_embed did not write. Refusing to load part of it."
    )


def _table_of(stored, arrays, path: str, freeze: bool | None) -> Any:
  metadata = next(iter(stored.values())).metadata
  if metadata.get(file_metadata.KIND_KEY) is None:
    return _table_from(arrays[TENSOR_KEY], metadata, path, freeze)
  return kind_layouts.build(arrays, metadata, path, freeze)


def _table_from(
  rows: Any, metadata: dict[str, Any], path: str, freeze: bool | None
) -> EmbeddingTable:
  """The table of a file's rows and metadata (see `load`)."""
  spec = file_metadata.parse_metadata(metadata, path, rows.shape[0])
  padded = spec["true_vocab_size"] is not None
  table = common.build_table(
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
  embeddings = file_metadata.held_as_saved(
    table.value, metadata, "", freeze, "embeddings.embeddings"
  )
  return dataclasses.replace(table, embeddings=embeddings)


def from_safetensors(
  path: str | os.PathLike[str],
  key: str,
  *,
  vocabulary: common.VocabularyLike = None,
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
  holding ``key`` is opened (`named_embed._src.files.checkpoints`).

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
  vocabulary = common.as_vocabulary(vocabulary)

  def build(stored, arrays) -> EmbeddingTable:
    source, rows = stored[key].describe(), arrays[key]
    aligned = true_vocab_size is not None
    try:
      table = common.build_table(
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

  def tensors_of(table: EmbeddingTable) -> dict[str, Tensor]:
    axes = (table.vocabulary_axis, *table.embedding_axes)
    return {key: Tensor(axes, table.rows_array())}

  return distributed_io.load(
    lambda: stored_tensors.open_tensors(path, (key,)),
    build,
    tensors_of,
    mesh=mesh,
    rules=rules,
    what=f"ne.from_safetensors({os.fspath(path)!r}, {key!r})",
  )
