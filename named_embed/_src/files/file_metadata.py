"""What every kind of table file says about its table, and how it is read.

A named_embed file (one ``.safetensors`` file, or the index of a
checkpoint directory) holds a table as named tensors (`Tensor`: each with
the names of its axes, in the stored order) and string metadata. This
module is the vocabulary that the writers and readers of every kind share
(`safetensors_io` for plain tables, `kind_layouts` for every other
kind, `distributed_io` for placing tensors on a mesh):

========================  ===================================================
``named_embed``           format version, ``"1"`` (`check_marker`)
``vocabulary_axis``       name of the vocabulary axis
``embedding_axes``        JSON list of the embedding axis names, in order
``padding_index``         JSON int or ``null``
``true_vocab_size``       JSON int (rows past it are alignment rows) or
                          ``null``
``vocabulary``            JSON ``{"tokens": [...], "roles": {"pad": ...}}``
                          (only when the table has a vocabulary)
``kind``                  ``array`` (frozen), ``parameter`` or
                          ``parameter_value``
``label``                 the parameter's label (not for ``array``)
``table``                 the kind of a quantised or adapted table
                          (`KIND_KEY`; absent for a plain table)
========================  ===================================================
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from named_embed._src.base.vocabulary import SPECIAL_ROLES, Vocabulary
from named_embed._src.files import common
from named_embed._src.rows import table_arrays

FORMAT_VERSION = "1"
"""The ``named_embed`` entry of the metadata this version writes and reads."""

TENSOR_KEY = "embeddings"
"""The tensor of a plain table's rows (also a plain base's, under an
adapter)."""

KIND_KEY = "table"
"""The metadata entry naming a quantised or adapted table's kind."""

HOLDER_KINDS = ("array", "parameter", "parameter_value")


class Tensor(NamedTuple):
  """One tensor of a table file: its axis names and its array, both in the
  stored order (the array's dimension ``i`` is axis ``axes[i]``).

  >>> import numpy as np
  >>> Tensor(("vocabulary", "embedding"), np.ones((3, 2))).array.shape
  (3, 2)
  """

  axes: tuple[str, ...]
  array: Any


def check_marker(path: str, metadata: dict[str, Any], keys: list[str]) -> None:
  """Raises unless ``metadata`` is that of a file `ne.save` wrote, in the
  format version this module reads.

  >>> check_marker("t.safetensors", {"named_embed": "1"}, ["embeddings"])
  >>> check_marker("m.safetensors", {}, ["wte.weight"])
  Traceback (most recent call last):
  ...
  ValueError: m.safetensors is a safetensors file without named_embed metadata (it holds the tensors ['wte.weight']), so `save` did not write it. To read one tensor of a model checkpoint as a table, use `from_safetensors(path, key=..., vocabulary=...)`.
  """
  version = metadata.get("named_embed")
  if version is None:
    raise ValueError(
      f"{path} is a safetensors file without named_embed metadata (it holds"
      f" the tensors {common.available(keys)}), so `save` did not write it. To read"
      " one tensor of a model checkpoint as a table, use"
      " `from_safetensors(path, key=..., vocabulary=...)`."
    )
  if version != FORMAT_VERSION:
    raise ValueError(
      f"{path} uses named_embed file format version {version!r}; this"
      f" version of named_embed reads version {FORMAT_VERSION!r}. Upgrade"
      " named_embed to read it."
    )


def table_metadata(table: Any) -> dict[str, str]:
  """The entries every kind of table writes: the format version, axes, pad
  token row, alignment rows and vocabulary, and ``kind: array``.

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> table_metadata(table)["embedding_axes"]
  '["embedding"]'
  """
  metadata = {
    "named_embed": FORMAT_VERSION,
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


def check_writable(metadata: dict[str, str], what: str) -> None:
  """Raises a ValueError, before anything is written, for an entry that a
  safetensors header cannot hold: it must be UTF-8, and a string with a
  lone surrogate (``"\\ud800"``, e.g. from a file name decoded with
  ``surrogateescape``) has no UTF-8 form.

  >>> check_writable({"label": "tok.embeddings"}, "ne.save")
  >>> check_writable({"label": "tok\\ud800.embeddings"}, "ne.save")
  Traceback (most recent call last):
  ...
  ValueError: ne.save: the table's label 'tok\\ud800.embeddings' holds a lone surrogate ('\\ud800' at 3), which has no UTF-8 form, so no safetensors file can store it. Rename it.
  """
  for key, value in metadata.items():
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as error:
      raise ValueError(
        f"{what}: the table's {key.replace('_', ' ')} {value!r} holds a lone"
        f" surrogate ({value[error.start]!r} at {error.start}), which has no"
        " UTF-8 form, so no safetensors file can store it. Rename it."
      ) from None


def holder_metadata(holder: Any, prefix: str = "") -> dict[str, str]:
  """How an array is held (`table_arrays.holder_kind`) and its label, as
  entries ``<prefix>kind`` and ``<prefix>label``.

  Raises:
    ValueError: for an unbound `pz.ParameterSlot` (nothing to save).

  >>> import numpy as np
  >>> from penzai import pz
  >>> holder_metadata(pz.Parameter(value=pz.nx.wrap(np.ones(2)), label="a.b"),
  ...                 "lora_a_")
  {'lora_a_kind': 'parameter', 'lora_a_label': 'a.b'}
  """
  kind = table_arrays.holder_kind(holder)
  if kind == "slot":
    what = f"`{prefix[:-1]}`" if prefix else "The table's embeddings"
    raise ValueError(
      f"save(): {what} is an unbound slot (label {holder.label!r}); bind a"
      " value first, e.g. `pz.bind_variables(model, params)`."
    )
  metadata = {f"{prefix}kind": kind}
  if kind != "array":
    metadata[f"{prefix}label"] = holder.label
  return metadata


def held_as_saved(
  value: Any,
  metadata: dict[str, Any],
  prefix: str,
  freeze: bool | None,
  default_label: str,
) -> Any:
  """``value`` held as the entries ``<prefix>kind`` / ``<prefix>label``
  say (see `holder_metadata`), or frozen (``freeze=True``), or trainable
  (``freeze=False``, with the saved label or ``default_label``).

  >>> import numpy as np
  >>> from penzai import pz
  >>> held = held_as_saved(pz.nx.wrap(np.ones(2)), {}, "", False, "e.e")
  >>> type(held).__name__, held.label
  ('Parameter', 'e.e')
  """
  kind = metadata.get(f"{prefix}kind", "array")
  if freeze is not None:
    kind = "array" if freeze else "parameter"
  if kind == "array":
    return value
  label = metadata.get(f"{prefix}label") or default_label
  return table_arrays.hold(kind, value, label)


def parse_metadata(
  metadata: dict[str, Any], path: str, rows: int | None = None
) -> dict[str, Any]:
  """The checked table fields of a file's metadata (axes, pad row,
  alignment rows, vocabulary, holder kind and label).

  ``rows``, the number of rows the file's tensors hold, bounds the
  vocabulary: its length is checked before a `Vocabulary` is built, and
  a vocabulary entry longer than `MAX_TOKEN_BYTES` a row is refused before
  it is parsed, so a huge entry beside a small table costs nothing.

  Raises:
    ValueError: naming the corrupt field and the file.

  >>> parse_metadata({"vocabulary_axis": "vocabulary",
  ...                 "embedding_axes": '["embedding"]'}, "t")["embedding_axes"]
  ['embedding']
  >>> parse_metadata({"vocabulary_axis": "v", "embedding_axes": "[1]"}, "t")
  Traceback (most recent call last):
  ...
  ValueError: t: corrupt named_embed metadata: 'embedding_axes' must be a JSON list of axis names; got '[1]'.
  """

  def bad(field: str, why: str) -> ValueError:
    shown = metadata.get(field)
    if isinstance(shown, str) and len(shown) >= 80:
      shown = shown[:80] + "..."
    return ValueError(
      f"{path}: corrupt named_embed metadata: {field!r} {why}; got {shown!r}."
    )

  def field_json(field: str, default: Any = None) -> Any:
    if field not in metadata:
      return default
    try:
      return json.loads(metadata[field])
    except (json.JSONDecodeError, TypeError):
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
  if spec["kind"] not in HOLDER_KINDS:
    raise bad("kind", f"must be one of {HOLDER_KINDS}")
  if rows is not None:
    want = rows if true_size is None else true_size
    text = metadata.get("vocabulary")
    if isinstance(text, str) and len(text) > 64 + want * MAX_TOKEN_BYTES:
      raise bad(
        "vocabulary",
        f"holds {len(text)} characters for {want} tokens (more than"
        f" {MAX_TOKEN_BYTES} a token)",
      )
  else:
    want = None
  spec["vocabulary"] = _parse_vocabulary(field_json("vocabulary"), bad, want)
  return spec


MAX_TOKEN_BYTES = 4096
"""The longest stored token (in JSON characters) a file's vocabulary may
hold on average: far beyond any real token."""


def _parse_vocabulary(spec: Any, bad, want: int | None) -> Vocabulary | None:
  if spec is None:
    return None
  tokens = spec.get("tokens") if isinstance(spec, dict) else None
  roles = spec.get("roles", {}) if isinstance(spec, dict) else None
  if not isinstance(tokens, list) or not isinstance(roles, dict):
    raise bad("vocabulary", 'must be {"tokens": [...], "roles": {...}}')
  if want is not None and len(tokens) != want:
    raise bad(
      "vocabulary", f"has {len(tokens)} tokens for the {want} token rows"
    )
  unknown = sorted(set(roles) - set(SPECIAL_ROLES))
  if unknown:
    raise bad("vocabulary", f"has unknown roles {unknown}")
  if not all(isinstance(token, str) for token in roles.values()):
    raise bad("vocabulary", "has roles that are not token strings")
  try:
    return Vocabulary(tokens, **roles)
  except ValueError as error:
    raise bad("vocabulary", f"is not a valid vocabulary ({error})") from None
