"""Quantised and adapted tables as named tensors plus metadata, and back.

`named_embed._src.files.safetensors_io` writes and reads every kind of table
through the same steps (one file, or a checkpoint directory whose every
process writes its own blocks; loads placed on a mesh, each process
reading its own share of each tensor). This module says what a
`QuantizedTable`, `LoraTable` or `TrainableRowsTable` is made of: its
tensors, each with its axis names (`tensors`), and its metadata
(`metadata`): the entries every table writes
(`file_metadata.table_metadata`) plus ``table`` naming the kind and:

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

``embeddings``, ``codes``, ``scales`` and ``lora_a`` lead with the
vocabulary axis, so a vocabulary rule splits them over the mesh (each
process reads only its rows of them); ``lora_b`` ``{rank, *embedding}``
and ``trainable_rows`` ``{rows, *embedding}`` are small and follow the
rules of their own axes (replicated under a vocabulary-only rule).
`keys` names the tensors a file's metadata promises, and `build` makes
the table of them.
"""

from __future__ import annotations

import json
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed._src.files import file_metadata
from named_embed._src.files.file_metadata import TENSOR_KEY, Tensor
from named_embed._src.tables.lora import RANK_AXIS, LoraTable
from named_embed._src.tables.quantized import QuantizedTable
from named_embed._src.tables.table import EmbeddingTable
from named_embed._src.tables.trainable_rows import ROWS_AXIS, TrainableRowsTable

KINDS = ("quantized", "lora", "trainable_rows")
"""The values of the ``table`` metadata entry this module reads."""

_ADAPTER_TENSORS = {
  "quantized": (),
  "lora": ("lora_a", "lora_b"),
  "trainable_rows": ("trainable_rows",),
}


def handles(table: Any) -> bool:
  """Whether ``table`` is a kind this module lays out.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
  >>> handles(table), handles(table.quantized("int8"))
  (False, True)
  """
  return isinstance(table, QuantizedTable | LoraTable | TrainableRowsTable)


def tensors(table: Any) -> dict[str, Tensor]:
  """The tensors ``table`` is stored as, by name, each with its axis names
  (the arrays as the table holds them: no copy when stored in that order).

  Raises:
    ValueError: if an adapter is an unbound `pz.ParameterSlot`.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
  >>> {k: t.axes for k, t in tensors(table.quantized("int4", 2)).items()}
  {'codes': ('vocabulary', 'embedding'), 'scales': ('vocabulary', 'embedding')}
  """
  if isinstance(table, QuantizedTable):
    return _base_tensors(table)
  found = _base_tensors(table.base)
  vocabulary, axes = table.vocabulary_axis, tuple(table.embedding_axes)
  if isinstance(table, LoraTable):
    found["lora_a"] = _tensor(table.lora_a, "lora_a", (vocabulary, RANK_AXIS))
    found["lora_b"] = _tensor(table.lora_b, "lora_b", (RANK_AXIS, *axes))
  else:
    found["trainable_rows"] = _tensor(table.rows, "rows", (ROWS_AXIS, *axes))
  return found


def metadata(table: Any) -> dict[str, str]:
  """The string metadata of ``table``'s file (see the module docstring).

  Raises:
    ValueError: if an adapter is an unbound `pz.ParameterSlot`.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 4), np.float32))
  >>> found = metadata(table.quantized("int8"))
  >>> found["table"], found["scheme"], found["group_size"]
  ('quantized', 'int8', 'null')
  """
  found = file_metadata.table_metadata(table)
  if isinstance(table, QuantizedTable):
    return {**found, **_base_metadata(table), "table": "quantized"}
  found.update(_base_metadata(table.base))
  if isinstance(table, LoraTable):
    found.update(table="lora", alpha=json.dumps(table.alpha))
    found.update(file_metadata.holder_metadata(table.lora_a, "lora_a_"))
    found.update(file_metadata.holder_metadata(table.lora_b, "lora_b_"))
  else:
    found.update(table="trainable_rows", row_ids=json.dumps(table.row_ids))
    found.update(file_metadata.holder_metadata(table.rows, "rows_"))
  return found


def keys(metadata: dict[str, Any], path: str) -> tuple[str, ...]:
  """The tensors a file of a compressed or adapted table holds, by its
  metadata.

  Raises:
    ValueError: for metadata that names no known base or kind.

  >>> keys({"table": "lora", "base": "quantized"}, "t.safetensors")
  ('codes', 'scales', 'lora_a', 'lora_b')
  """
  kind, base = metadata.get(file_metadata.KIND_KEY), metadata.get("base")
  if kind not in KINDS or base not in ("embedding", "quantized"):
    raise ValueError(
      f"{path}: corrupt named_embed file of a {kind} table: its metadata"
      f" names the kind {kind!r} (known: {KINDS}) and the base {base!r}"
      " (known: 'embedding', 'quantized')."
    )
  parts = ("codes", "scales") if base == "quantized" else (TENSOR_KEY,)
  return (*parts, *_ADAPTER_TENSORS[kind])


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
  try:
    return _build(arrays, metadata, path, freeze)
  except (KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
    if str(error).startswith(f"{path}:"):
      raise
    raise ValueError(
      f"{path}: corrupt named_embed file of a {kind} table:"
      f" {type(error).__name__}: {error}"
    ) from None


# ------------------------------------------------------------------ writing


def _in_order(named: Any, axes: tuple[str, ...]) -> Any:
  """The data of a `NamedArray` with axes ``axes``, in that order (no
  transpose, hence no copy, when it is stored so)."""
  if type(named) is pz.nx.NamedArray and tuple(named.named_axes) == axes:
    return named.data_array
  return named.unwrap(*axes)


def _tensor(holder: Any, field: str, axes: tuple[str, ...]) -> Tensor:
  file_metadata.holder_metadata(holder, f"{field}_")  # refuses a slot
  value = holder if isinstance(holder, pz.nx.NamedArrayBase) else holder.value
  return Tensor(axes, _in_order(value, axes))


def _base_tensors(base: Any) -> dict[str, Tensor]:
  """The tensors of a frozen base (plain or quantised)."""
  codes_axes = (base.vocabulary_axis, *base.embedding_axes)
  if isinstance(base, QuantizedTable):
    scales_axes = codes_axes if base.group_size else codes_axes[:1]
    return {
      "codes": Tensor(codes_axes, _in_order(base.codes, codes_axes)),
      "scales": Tensor(scales_axes, _in_order(base.scales, scales_axes)),
    }
  return {TENSOR_KEY: Tensor(codes_axes, base.rows_array())}


def _base_metadata(base: Any) -> dict[str, str]:
  if isinstance(base, QuantizedTable):
    return {
      "base": "quantized",
      "scheme": base.scheme,
      "group_size": json.dumps(base.group_size),
      "embedding_sizes": json.dumps(list(base.embedding_axes.values())),
      "dtype": np.dtype(base.dtype).name,
    }
  return {"base": "embedding"}


# ------------------------------------------------------------------ reading


def _build(arrays, metadata, path, freeze) -> Any:
  spec = file_metadata.parse_metadata(metadata, path)
  base = _build_base(spec, arrays, metadata)
  kind = metadata[file_metadata.KIND_KEY]
  axes = spec["embedding_axes"]
  if kind == "quantized":
    return base
  if kind == "lora":
    a = pz.nx.wrap(
      jnp.asarray(arrays["lora_a"]), spec["vocabulary_axis"], RANK_AXIS
    )
    b = pz.nx.wrap(jnp.asarray(arrays["lora_b"]), RANK_AXIS, *axes)
    return LoraTable(
      base=base,
      lora_a=_held(a, metadata, "lora_a", freeze),
      lora_b=_held(b, metadata, "lora_b", freeze),
      alpha=float(json.loads(metadata["alpha"])),
    )
  rows = pz.nx.wrap(jnp.asarray(arrays["trainable_rows"]), ROWS_AXIS, *axes)
  row_ids = tuple(int(i) for i in json.loads(metadata["row_ids"]))
  return TrainableRowsTable(
    base=base, rows=_held(rows, metadata, "rows", freeze), row_ids=row_ids
  )


def _held(value, metadata, field, freeze) -> Any:
  return file_metadata.held_as_saved(
    value, metadata, f"{field}_", freeze, f"embeddings.{field}"
  )


def _build_base(spec, arrays, metadata) -> Any:
  axes = spec["embedding_axes"]
  vocabulary_axis = spec["vocabulary_axis"]
  statics = dict(
    padding_index=spec["padding_index"],
    vocabulary=spec["vocabulary"],
    true_vocab_size=spec["true_vocab_size"],
  )
  if metadata["base"] == "embedding":
    value = pz.nx.wrap(jnp.asarray(arrays[TENSOR_KEY]), vocabulary_axis, *axes)
    return EmbeddingTable(value, vocabulary_axis, **statics)
  sizes = json.loads(metadata["embedding_sizes"])
  group_size = json.loads(metadata["group_size"])
  codes = jnp.asarray(arrays["codes"])
  scales = jnp.asarray(arrays["scales"])
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
