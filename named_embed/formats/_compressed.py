"""Files of quantised and adapted tables (`save` / `load` call this module).

One safetensors file a table, like a plain table's, with the same string
metadata for the axes, pad row, alignment rows and vocabulary
(`safetensors_io.parse_metadata` reads them), plus ``table`` naming the
kind and the tensors of its parts, written bit for bit:

====================  =====================================================
``table``             tensors and extra metadata
====================  =====================================================
``quantized``         ``codes`` (int8, or uint8 two values a byte),
                      ``scales`` (float32); ``scheme``, ``group_size``,
                      ``embedding_sizes``, ``dtype`` (the float dtype)
``lora``              the base's tensors (``embeddings``, or ``codes`` and
                      ``scales``), ``lora_a``, ``lora_b``; ``alpha``, the
                      base's fields, how each adapter is held and its label
``trainable_rows``    the base's tensors and ``trainable_rows``;
                      ``row_ids``, how the rows are held and their label
====================  =====================================================
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed import _table_arrays
from named_embed.formats import safetensors_io
from named_embed.formats._atomic import replacing
from named_embed.lora import RANK_AXIS, LoraTable
from named_embed.quantized import QuantizedTable
from named_embed.table import EmbeddingTable
from named_embed.trainable_rows import ROWS_AXIS, TrainableRowsTable

KINDS = ("quantized", "lora", "trainable_rows")


def handles(table: Any) -> bool:
  """Whether ``table`` is a kind this module writes."""
  return isinstance(table, QuantizedTable | LoraTable | TrainableRowsTable)


def _host(array: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(array))


def _common(table: Any) -> dict[str, str]:
  metadata = {
    "named_embed": safetensors_io.FORMAT_VERSION,
    "vocabulary_axis": table.vocabulary_axis,
    "embedding_axes": json.dumps(list(table.embedding_axes)),
    "padding_index": json.dumps(table.padding_index),
    "true_vocab_size": json.dumps(table.true_vocab_size),
    "kind": "array",
  }
  if table.vocabulary is not None:
    metadata["vocabulary"] = json.dumps(
      {"tokens": list(table.vocabulary.tokens), "roles": table.vocabulary.roles}
    )
  return metadata


def _base_parts(base: Any) -> tuple[dict, dict]:
  """Tensors and metadata of a frozen base (plain or quantised)."""
  if isinstance(base, QuantizedTable):
    source, (codes, scales) = base.row_parts()
    tensors = {"codes": _host(codes), "scales": _host(scales)}
    metadata = {
      "base": "quantized",
      "scheme": base.scheme,
      "group_size": json.dumps(base.group_size),
      "embedding_sizes": json.dumps(list(base.embedding_axes.values())),
      "dtype": np.dtype(base.dtype).name,
    }
    return tensors, metadata
  return {"embeddings": _host(base.rows_array())}, {"base": "embedding"}


def _held(holder: Any, field: str) -> dict[str, str]:
  """How a parameter is held (kind and label), as metadata."""
  kind = _table_arrays.holder_kind(holder)
  if kind == "slot":
    raise ValueError(
      f"save(): `{field}` is an unbound slot (label {holder.label!r}); bind"
      " a value first."
    )
  metadata = {f"{field}_kind": kind}
  if kind != "array":
    metadata[f"{field}_label"] = holder.label
  return metadata


def save(table: Any, path: str | os.PathLike[str]) -> None:
  """Writes a `QuantizedTable`, `LoraTable` or `TrainableRowsTable`."""
  from safetensors.numpy import save_file

  metadata = _common(table)
  if isinstance(table, QuantizedTable):
    tensors, extra = _base_parts(table)
    metadata.update(extra, table="quantized")
  else:
    source, arrays = table.row_parts()
    tensors, extra = _base_parts(table.base)
    metadata.update(extra)
    if isinstance(table, LoraTable):
      tensors["lora_a"], tensors["lora_b"] = (
        _host(arrays[-2]),
        _host(arrays[-1]),
      )
      metadata.update(table="lora", alpha=json.dumps(table.alpha))
      metadata.update(_held(table.lora_a, "lora_a"))
      metadata.update(_held(table.lora_b, "lora_b"))
    else:
      tensors["trainable_rows"] = _host(arrays[-1])
      metadata.update(table="trainable_rows", row_ids=json.dumps(table.row_ids))
      metadata.update(_held(table.rows, "rows"))
  with replacing(path) as temp:
    save_file(tensors, temp, metadata=metadata)


def load_if_compressed(path: str, freeze: bool | None) -> Any:
  """The table in ``path`` if `save` wrote a compressed or adapted table
  there, else None (the plain reader then reads, or explains, the file)."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      if metadata.get("table") not in KINDS:
        return None
      tensors = {key: f.get_tensor(key) for key in f.keys()}
  except (SafetensorError, OSError):
    return None
  if metadata.get("named_embed") != safetensors_io.FORMAT_VERSION:
    return None  # the plain reader explains the version
  try:
    return _build(path, tensors, metadata, freeze)
  except (KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
    raise ValueError(
      f"{path}: corrupt named_embed file of a {metadata['table']} table:"
      f" {type(error).__name__}: {error}"
    ) from None


def _build(path, tensors, metadata, freeze) -> Any:
  spec = safetensors_io.parse_metadata(metadata, path)
  base = _build_base(spec, tensors, metadata)
  kind = metadata["table"]
  if kind == "quantized":
    return base
  if kind == "lora":
    axes = spec["embedding_axes"]
    a = pz.nx.wrap(
      jnp.asarray(tensors["lora_a"]), spec["vocabulary_axis"], RANK_AXIS
    )
    b = pz.nx.wrap(jnp.asarray(tensors["lora_b"]), RANK_AXIS, *axes)
    return LoraTable(
      base=base,
      lora_a=_hold(a, metadata, "lora_a", freeze),
      lora_b=_hold(b, metadata, "lora_b", freeze),
      alpha=float(json.loads(metadata["alpha"])),
    )
  rows = pz.nx.wrap(
    jnp.asarray(tensors["trainable_rows"]), ROWS_AXIS, *spec["embedding_axes"]
  )
  row_ids = tuple(int(i) for i in json.loads(metadata["row_ids"]))
  return TrainableRowsTable(
    base=base, rows=_hold(rows, metadata, "rows", freeze), row_ids=row_ids
  )


def _build_base(spec, tensors, metadata) -> Any:
  axes = spec["embedding_axes"]
  vocabulary_axis = spec["vocabulary_axis"]
  statics = dict(
    padding_index=spec["padding_index"],
    vocabulary=spec["vocabulary"],
    true_vocab_size=spec["true_vocab_size"],
  )
  if metadata["base"] == "embedding":
    value = pz.nx.wrap(
      jnp.asarray(tensors["embeddings"]), vocabulary_axis, *axes
    )
    return EmbeddingTable(value, vocabulary_axis, **statics)
  sizes = json.loads(metadata["embedding_sizes"])
  group_size = json.loads(metadata["group_size"])
  codes = jnp.asarray(tensors["codes"])
  scales = jnp.asarray(tensors["scales"])
  table = QuantizedTable(
    codes=pz.nx.wrap(codes, vocabulary_axis, *axes),
    scales=pz.nx.wrap(
      scales,
      *((vocabulary_axis,) if group_size is None else (vocabulary_axis, *axes)),
    ),
    scheme=metadata["scheme"],
    group_size=group_size,
    embedding_shape=tuple(zip(axes, sizes)),
    dtype=np.dtype(metadata["dtype"]),
    vocabulary_axis=vocabulary_axis,
    **statics,
  )
  _check_quantized(table, codes, scales)
  return table


def _check_quantized(table: QuantizedTable, codes, scales) -> None:
  """Raises ValueError if codes and scales do not fit the recorded layout."""
  sizes = list(table.embedding_axes.values())
  rows = codes.shape[0]
  packed = [*sizes[:-1], sizes[-1] // (2 if table.bits == 4 else 1)]
  want_codes = (rows, *packed)
  if table.group_size is None:
    want_scales = (rows,)
  else:
    want_scales = (rows, *sizes[:-1], sizes[-1] // table.group_size)
  dtype = np.uint8 if table.bits == 4 else np.int8
  if codes.shape != want_codes or codes.dtype != dtype:
    raise ValueError(
      f"codes {codes.dtype}{list(codes.shape)} do not fit"
      f" {table.scheme} rows of sizes {sizes} (expected {np.dtype(dtype)}"
      f"{list(want_codes)})."
    )
  if scales.shape != want_scales or scales.dtype != np.float32:
    raise ValueError(
      f"scales {scales.dtype}{list(scales.shape)} do not fit (expected"
      f" float32{list(want_scales)})."
    )


def _hold(value, metadata, field, freeze) -> Any:
  kind = metadata[f"{field}_kind"]
  if freeze is not None:
    kind = "array" if freeze else "parameter"
  if kind == "array":
    return value
  label = metadata.get(f"{field}_label") or f"embeddings.{field}"
  return _table_arrays.hold(kind, value, label)
