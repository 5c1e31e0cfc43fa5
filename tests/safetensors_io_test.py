"""Tests for `named_embed._src.files.safetensors_io`: save, load, from_safetensors.

Files are written by the code under test, or directly with the
`safetensors` package (model checkpoints), and compared bit for bit.
"""

from __future__ import annotations

import collections
import json
import os
import time
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from conftest import raw
from penzai import pz
from safetensors.numpy import save_file

import named_embed as ne
from named_embed import formats

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
W = np.arange(12, dtype=np.float32).reshape(4, 3)


def bits(array) -> np.ndarray:
  array = np.asarray(array)
  return array.view(UINT[array.dtype.itemsize])


def special_rows(dtype, shape=(6, 4)) -> np.ndarray:
  """Random values plus the awkward ones: -0, inf, nan, subnormal, extremes."""
  rows = np.random.default_rng(0).normal(size=shape).astype(dtype)
  info = ml_dtypes.finfo(dtype)
  flat = rows.reshape(-1)
  flat[:6] = [-0.0, np.inf, -np.inf, np.nan, info.max, info.smallest_normal]
  flat[6] = np.asarray(info.smallest_subnormal, dtype)
  return rows


def write(tmp_path, table, name="table.safetensors"):
  path = tmp_path / name
  formats.save(table, path)
  return path


@pytest.mark.parametrize(
  "dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=str
)
def test_round_trip_is_bit_exact(tmp_path, dtype):
  rows = special_rows(dtype)
  table = ne.EmbeddingTable.from_pretrained(rows)
  loaded = formats.load(write(tmp_path, table))
  assert loaded.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(bits(loaded.rows_array()), bits(rows))
  assert loaded.frozen and loaded.vocabulary is None
  assert loaded.padding_index is None
  assert loaded.vocabulary_axis == "vocabulary"
  assert loaded.embedding_axes == {"embedding": 4}


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=str)
def test_multi_axis_round_trip_keeps_names_and_order(tmp_path, dtype):
  rows = special_rows(dtype, (5, 2, 3))
  table = ne.EmbeddingTable.from_pretrained(
    rows, vocabulary_axis="tokens", embedding_axes=("heads", "head_dim")
  )
  loaded = formats.load(write(tmp_path, table))
  assert loaded.vocabulary_axis == "tokens"
  assert list(loaded.value.named_axes) == ["tokens", "heads", "head_dim"]
  np.testing.assert_array_equal(bits(loaded.rows_array()), bits(rows))


def test_table_stored_in_another_axis_order_is_saved_vocabulary_first(
  tmp_path,
):
  data = np.arange(24, dtype=np.float32).reshape(2, 4, 3)  # heads, vocab, dim
  named = pz.nx.NamedArray(
    named_axes=collections.OrderedDict(heads=2, vocabulary=4, dim=3),
    data_array=jnp.asarray(data),
  )
  loaded = formats.load(write(tmp_path, ne.EmbeddingTable(named)))
  assert loaded.embedding_axes == {"heads": 2, "dim": 3}
  np.testing.assert_array_equal(
    np.asarray(loaded.rows_array()), data.transpose(1, 0, 2)
  )


def test_vocabulary_roles_and_padding_index_are_kept(tmp_path):
  vocab = ne.Vocabulary(
    ["<pad>", "<unk>", "naïve", "東京", "a b", ""], pad="<pad>", unk="<unk>"
  )
  table = ne.EmbeddingTable.from_pretrained(
    special_rows(np.float32)
  ).with_vocabulary(vocab)
  loaded = formats.load(write(tmp_path, table))
  assert loaded.vocabulary == vocab
  assert loaded.vocabulary.roles == {"pad": "<pad>", "unk": "<unk>"}
  assert loaded.padding_index == 0


def test_padding_index_without_vocabulary_is_kept(tmp_path):
  table = ne.EmbeddingTable.from_pretrained(
    special_rows(np.float16), padding_index=-2
  )
  loaded = formats.load(write(tmp_path, table))
  assert loaded.padding_index == 4 and loaded.vocabulary is None


def test_trainable_tables_keep_their_kind_and_label(tmp_path):
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=5,
    embedding_axes={"embedding": 3},
  )
  path = write(tmp_path, table)
  loaded = formats.load(path)
  assert isinstance(loaded.embeddings, pz.Parameter)
  assert loaded.embeddings.label == "embed.embeddings"
  assert formats.load(path, freeze=True).frozen
  frozen_path = write(tmp_path, pz.freeze_params(table), "frozen.safetensors")
  assert isinstance(formats.load(frozen_path).embeddings, pz.ParameterValue)
  plain = write(tmp_path, ne.EmbeddingTable.from_pretrained(W), "p.st")
  thawed = formats.load(plain, freeze=False)
  assert thawed.embeddings.label == "embeddings.embeddings"


def test_loaded_table_looks_up_like_the_original(tmp_path):
  table = ne.EmbeddingTable.from_pretrained(W, padding_index=0)
  loaded = formats.load(str(write(tmp_path, table)))  # str paths too
  ids = jnp.array([3, 0, 1])
  np.testing.assert_array_equal(
    raw(ne.lookup(loaded, ids), "embedding"), W[[3, 0, 1]]
  )


def test_metadata_is_json_with_a_format_marker(tmp_path):
  vocab = ne.Vocabulary(["a", "b", "c", "d"], eos="d")
  table = ne.EmbeddingTable.from_pretrained(W).with_vocabulary(vocab)
  path = write(tmp_path, table)
  with safetensors.safe_open(path, framework="numpy") as f:
    metadata = f.metadata()
    assert list(f.keys()) == ["embeddings"]
  assert metadata["named_embed"] == "1"
  assert json.loads(metadata["embedding_axes"]) == ["embedding"]
  assert json.loads(metadata["vocabulary"]) == {
    "tokens": ["a", "b", "c", "d"],
    "roles": {"eos": "d"},
  }


# ------------------------------------------------------------ atomic writes


def listing(tmp_path) -> list[str]:
  return sorted(os.listdir(tmp_path))


def test_save_replaces_an_existing_file(tmp_path):
  path = write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
  write(tmp_path, ne.EmbeddingTable.from_pretrained(W + 1))
  np.testing.assert_array_equal(
    np.asarray(formats.load(path).rows_array()), W + 1
  )
  assert listing(tmp_path) == ["table.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_gives_normal_permissions_and_keeps_existing_ones(tmp_path):
  umask = os.umask(0o022)
  try:
    path = write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    path.chmod(0o640)
    write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
    assert path.stat().st_mode & 0o777 == 0o640
  finally:
    os.umask(umask)


def failing_save_file(tensors, filename, metadata=None):
  with open(filename, "wb") as f:
    f.write(b"\x10\x00\x00\x00 half a file")
  raise OSError("disk full")


def test_failed_save_leaves_the_old_file_and_no_temporary(
  tmp_path, monkeypatch
):
  path = write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
  before = path.read_bytes()
  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
  with pytest.raises(OSError, match="disk full"):
    write(tmp_path, ne.EmbeddingTable.from_pretrained(W + 1))
  assert path.read_bytes() == before
  assert listing(tmp_path) == ["table.safetensors"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
  with pytest.raises(OSError):
    write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
  assert listing(tmp_path) == []


def test_save_into_a_missing_directory_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="directory .* does not exist"):
    formats.save(
      ne.EmbeddingTable.from_pretrained(W), tmp_path / "no" / "t.safetensors"
    )


def test_save_refuses_other_objects(tmp_path):
  for path in (tmp_path / "t.safetensors", tmp_path / "out"):
    with pytest.raises(
      TypeError,
      match=r"`table` must be a named_embed table .*got an array \(ndarray",
    ):
      formats.save(W, path)


# ----------------------------------------------------------- corrupt files


def test_truncated_file_is_a_clear_error(tmp_path):
  path = write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(ValueError, match="not a valid safetensors file.*trunc"):
    formats.load(path)


@pytest.mark.parametrize(
  "content", [b"", b"abc", b"garbage " * 40, b"\xff" * 64], ids=repr
)
def test_garbage_is_a_clear_error(tmp_path, content):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="bad.safetensors is not a valid"):
    formats.load(path)
  with pytest.raises(ValueError, match="not a valid safetensors file"):
    formats.from_safetensors(path, key="x")


def test_missing_file_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    formats.load(tmp_path / "nothing.safetensors")


def test_load_of_a_checkpoint_suggests_from_safetensors(tmp_path):
  path = tmp_path / "model.safetensors"
  save_file({"wte": W, "lm_head": W}, path)
  with pytest.raises(
    ValueError,
    match=r"without named_embed metadata \(it holds the tensors"
    r" \['lm_head', 'wte'\]\).*from_safetensors\(path, key=",
  ):
    formats.load(path)


def with_metadata(tmp_path, rows=W, **changes) -> str:
  path = write(tmp_path, ne.EmbeddingTable.from_pretrained(W))
  with safetensors.safe_open(path, framework="numpy") as f:
    metadata = f.metadata()
  metadata.update(changes)
  save_file({"embeddings": rows}, path, metadata=metadata)
  return path


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"named_embed": "9"}, "format version '9'.*reads version '1'"),
    ({"embedding_axes": "[embedding"}, "'embedding_axes' is not valid JSON"),
    ({"embedding_axes": '"embedding"'}, "must be a JSON list of axis names"),
    ({"padding_index": "1.5"}, "must be a JSON integer or null"),
    ({"kind": "pickle"}, "'kind' must be one of"),
    ({"vocabulary": '{"tokens": "abcd"}'}, '"tokens": \\[...\\]'),
    ({"vocabulary": '{"tokens": ["a","a","b","c"]}'}, "appears twice"),
    ({"vocabulary": '{"tokens": ["a"], "roles": {"x": "a"}}'}, "roles"),
  ],
)
def test_corrupt_metadata_is_a_clear_error(tmp_path, changes, message):
  path = with_metadata(tmp_path, **changes)
  with pytest.raises(ValueError, match=message):
    formats.load(path)


def test_vocabulary_length_must_match_the_rows(tmp_path):
  vocab = json.dumps({"tokens": ["a", "b", "c"], "roles": {}})
  path = with_metadata(tmp_path, vocabulary=vocab)
  with pytest.raises(
    ValueError, match="vocabulary. has 3 tokens for the 4 token rows"
  ):
    formats.load(path)


def test_axis_names_must_match_the_tensor(tmp_path):
  path = with_metadata(tmp_path, embedding_axes='["a", "b"]')
  with pytest.raises(ValueError, match="table.safetensors: `embedding_axes`"):
    formats.load(path)


# ------------------------------------------- files of earlier versions
#
# The tensors and metadata below are those that named_embed wrote before
# every kind of table was saved through one layout (commit 49085a1), spelled
# out: files written then must load now, as the same table.

VOCAB_JSON = json.dumps(
  {"tokens": [f"t{i}" for i in range(7)], "roles": {"pad": "t0"}}
)
COMMON = {  # 7 tokens and 1 alignment row, pad token t0
  "named_embed": "1",
  "vocabulary_axis": "vocabulary",
  "embedding_axes": '["embedding"]',
  "padding_index": "0",
  "true_vocab_size": "7",
  "kind": "array",
  "vocabulary": VOCAB_JSON,
}
NO_VOCABULARY = {  # 8 rows, pad row 1, no vocabulary
  **{k: v for k, v in COMMON.items() if k != "vocabulary"},
  "padding_index": "1",
  "true_vocab_size": "null",
}
INT8 = {
  "base": "quantized",
  "dtype": "float32",
  "embedding_sizes": "[4]",
  "group_size": "null",
  "scheme": "int8",
}
INT4_G2 = {**INT8, "group_size": "2", "scheme": "int4"}
ADAPTERS = {
  "lora_a_kind": "parameter",
  "lora_a_label": "e.lora_a",
  "lora_b_kind": "parameter",
  "lora_b_label": "e.lora_b",
}


def earlier_files():
  """``{name: (tensors, metadata)}`` of one file of each kind."""
  rng = np.random.default_rng(7)
  rows = rng.normal(size=(8, 4)).astype(np.float32)
  codes = rng.integers(-127, 128, size=(8, 4)).astype(np.int8)
  scales = rng.uniform(0.01, 0.1, size=8).astype(np.float32)
  nibbles = rng.integers(0, 256, size=(8, 2)).astype(np.uint8)
  group_scales = rng.uniform(0.01, 0.1, size=(8, 2)).astype(np.float32)
  a = rng.normal(size=(8, 2)).astype(np.float32)
  b = rng.normal(size=(2, 4)).astype(np.float32)
  trained = rng.normal(size=(2, 4)).astype(np.float32)
  plain = {
    **COMMON,
    "kind": "parameter",
    "label": "tok.embeddings",
  }
  return {
    "plain": ({"embeddings": rows}, plain),
    "int8": (
      {"codes": codes, "scales": scales},
      {**COMMON, **INT8, "table": "quantized"},
    ),
    "int4_g2": (
      {"codes": nibbles, "scales": group_scales},
      {**COMMON, **INT4_G2, "table": "quantized"},
    ),
    "lora_bf16": (
      {
        "embeddings": rows.astype(ml_dtypes.bfloat16),
        "lora_a": a,
        "lora_b": b,
      },
      {
        **NO_VOCABULARY,
        **ADAPTERS,
        "alpha": "2.0",
        "base": "embedding",
        "table": "lora",
      },
    ),
    "lora_int8": (
      {"codes": codes, "scales": scales, "lora_a": a, "lora_b": b},
      {**COMMON, **INT8, **ADAPTERS, "alpha": "4.0", "table": "lora"},
    ),
    "rows": (
      {"embeddings": rows, "trainable_rows": trained},
      {
        **COMMON,
        "base": "embedding",
        "row_ids": "[3, 5]",
        "rows_kind": "parameter",
        "rows_label": "e.trainable_rows",
        "table": "trainable_rows",
      },
    ),
  }


def base_rows(tensors) -> np.ndarray:
  """The float rows of a file's base, by the quantisation formulas."""
  if "embeddings" in tensors:
    return tensors["embeddings"].astype(np.float32)
  codes, scales = tensors["codes"], tensors["scales"]
  if codes.dtype == np.int8:
    return codes * scales[:, None]
  low = (codes & 0xF).astype(np.int8)  # byte j: values j and j + D/2
  high = (codes >> 4).astype(np.int8)
  values = np.concatenate([low, high], axis=1)
  values = np.where(values > 7, values - 16, values).astype(np.float32)
  return values * np.repeat(scales, 2, axis=1)


@pytest.mark.parametrize("name", list(earlier_files()))
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_files_of_earlier_versions_load_as_the_same_table(
  tmp_path, name, layout
):
  tensors, metadata = earlier_files()[name]
  if layout == "file":
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path, metadata=metadata)
  else:  # a directory of one file, as a save on one device wrote it
    path = tmp_path / name
    path.mkdir()
    token = {"named_embed_save": "0123456789abcdef"}
    file = "model-00001-of-00001.safetensors"
    save_file(tensors, path / file, metadata={"format": "pt", **token})
    index = {
      "metadata": {"total_size": 0, **metadata, **token},
      "weight_map": {key: file for key in tensors},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
  table = formats.load(path)
  kinds = {
    "plain": ne.EmbeddingTable,
    "int8": ne.QuantizedTable,
    "int4_g2": ne.QuantizedTable,
    "lora_bf16": ne.LoraTable,
    "lora_int8": ne.LoraTable,
    "rows": ne.TrainableRowsTable,
  }
  assert type(table) is kinds[name]
  stored = dict(tensors)
  if name in ("int8", "int4_g2", "lora_int8"):
    quantized = table if name != "lora_int8" else table.base
    assert quantized.scheme == metadata["scheme"]
    assert quantized.group_size == json.loads(metadata["group_size"])
    got = {"codes": quantized.codes, "scales": quantized.scales}
  else:
    base = table if name == "plain" else table.base
    got = {"embeddings": base.value}
  if name.startswith("lora"):
    assert table.alpha == float(metadata["alpha"])
    got["lora_a"], got["lora_b"] = table.lora_a.value, table.lora_b.value
  if name == "rows":
    assert table.row_ids == (3, 5)
    got["trainable_rows"] = table.rows.value
  for key, array in stored.items():
    value = np.asarray(got[key].data_array)
    assert value.dtype == array.dtype and value.tobytes() == array.tobytes()
  if name == "lora_bf16":
    assert (table.padding_index, table.vocabulary, table.num_rows) == (
      1,
      None,
      8,
    )
  else:
    assert (table.padding_index, table.vocab_size, table.num_rows) == (0, 7, 8)
    assert table.vocabulary.tokens == tuple(f"t{i}" for i in range(7))
  labels = [p.label for p in pz.unbind_params(table)[1]]
  assert labels == {
    "plain": ["tok.embeddings"],
    "lora_bf16": ["e.lora_a", "e.lora_b"],
    "lora_int8": ["e.lora_a", "e.lora_b"],
    "rows": ["e.trainable_rows"],
  }.get(name, [])
  # the rows it reads, against the formulas of each kind
  want = base_rows(tensors)
  if name.startswith("lora"):
    want = want + float(metadata["alpha"]) / 2 * (
      tensors["lora_a"] @ tensors["lora_b"]
    )
  if name == "rows":
    want[[3, 5]] = tensors["trainable_rows"]
  ids = jnp.arange(7)
  rows = raw(ne.lookup(pz.freeze_params(table), ids), "embedding")
  tolerance = 2**-8 if name == "lora_bf16" else 1e-6  # rows read in bf16
  np.testing.assert_allclose(
    np.asarray(rows, np.float32), want[:7], rtol=tolerance, atol=1e-6
  )


def test_an_unknown_or_corrupt_kind_of_table_is_named(tmp_path):
  tensors, metadata = earlier_files()["int8"]
  path = tmp_path / "t.safetensors"
  save_file(tensors, path, metadata={**metadata, "table": "hashed"})
  with pytest.raises(ValueError, match=r"kind of table, 'hashed', that this"):
    formats.load(path)
  save_file(tensors, path, metadata={**metadata, "base": "pickle"})
  with pytest.raises(ValueError, match=r"corrupt .* base 'pickle'"):
    formats.load(path)
  save_file(tensors, path, metadata={**metadata, "scheme": "int3"})
  with pytest.raises(ValueError, match=r"corrupt named_embed file of a quan"):
    formats.load(path)
  del tensors["scales"]
  save_file(tensors, path, metadata=metadata)
  with pytest.raises(ValueError, match=r"has no tensor 'scales'"):
    formats.load(path)


@pytest.mark.parametrize("name", ["lora_bf16", "rows", "lora_int8"])
def test_a_lost_kind_entry_never_loads_part_of_a_table(tmp_path, name):
  """A LoRA or trainable-rows file without its `table` entry used to load
  as a plain table, silently dropping the adapters."""
  tensors, metadata = earlier_files()[name]
  path = tmp_path / "t.safetensors"
  del metadata["table"]
  save_file(tensors, path, metadata=metadata)
  with pytest.raises(ValueError) as raised:
    formats.load(path)
  message = str(raised.value)
  assert str(path) in message
  assert "names no kind (a plain table)" in message
  assert "Refusing to load part of it" in message


def test_extra_tensors_beside_a_kind_are_refused(tmp_path):
  tensors, metadata = earlier_files()["int8"]
  path = tmp_path / "t.safetensors"
  save_file(
    {**tensors, "lora_a": np.ones((8, 2), np.float32)}, path, metadata=metadata
  )
  with pytest.raises(ValueError, match=r"names a 'quantized' table.*'lora_a'"):
    formats.load(path)


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-1.0", "0", '"x"'])
def test_a_lora_alpha_the_api_refuses_is_refused_from_a_file(tmp_path, alpha):
  tensors, metadata = earlier_files()["lora_bf16"]
  path = tmp_path / "t.safetensors"
  save_file(tensors, path, metadata={**metadata, "alpha": alpha})
  with pytest.raises(ValueError, match=r"t.safetensors: corrupt .*lora"):
    formats.load(path)
  with pytest.raises((ValueError, TypeError), match=r"alpha"):
    ne.LoraTable(
      **{
        "base": ne.EmbeddingTable.from_pretrained(tensors["embeddings"]),
        "lora_a": pz.nx.wrap(tensors["lora_a"], "vocabulary", "lora_rank"),
        "lora_b": pz.nx.wrap(tensors["lora_b"], "lora_rank", "embedding"),
        "alpha": json.loads(alpha),
      }
    )


@pytest.mark.parametrize("name", ["plain", "int8"])
def test_a_huge_vocabulary_entry_is_refused_before_it_is_parsed(tmp_path, name):
  """The bomb of the issue: megabytes of tokens beside 7 token rows."""
  tensors, metadata = earlier_files()[name]
  tokens = [f"token{i}" for i in range(1_000_000)]
  metadata["vocabulary"] = json.dumps({"tokens": tokens, "roles": {}})
  path = tmp_path / "t.safetensors"
  save_file(tensors, path, metadata=metadata)
  tracemalloc.start()
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"characters for 7 tokens"):
    formats.load(path)
  elapsed = time.perf_counter() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert elapsed < 2.0
  assert peak < 3 * len(metadata["vocabulary"]) + (32 << 20)


def test_float8_tables_round_trip_bit_exact(tmp_path):
  for dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
    rows = special_rows(np.float32).astype(dtype)
    table = ne.EmbeddingTable.from_pretrained(rows)
    loaded = formats.load(write(tmp_path, table))
    assert loaded.dtype == dtype
    np.testing.assert_array_equal(bits(loaded.rows_array()), bits(rows))


@pytest.mark.parametrize("suffix", [".safetensors", ""])
def test_names_without_utf8_form_are_refused_before_writing(tmp_path, suffix):
  """A label or axis name with a lone surrogate used to be a bare
  UnicodeEncodeError from inside safetensors."""
  path = tmp_path / f"t{suffix}"
  formats.save(ne.EmbeddingTable.from_pretrained(W), path)
  label = ne.EmbeddingTable.from_pretrained(W, freeze=False, name="a\ud800")
  with pytest.raises(ValueError, match=r"label 'a\\ud800.embeddings' holds a"):
    formats.save(label, path)
  axis = ne.EmbeddingTable.from_pretrained(
    pz.nx.wrap(W, "v\ud800", "e"), vocabulary_axis="v\ud800"
  )
  with pytest.raises(ValueError, match=r"vocabulary axis 'v\\ud800' holds"):
    formats.save(axis, path)
  np.testing.assert_array_equal(formats.load(path).rows_array(), W)  # kept
  vocab = ne.Vocabulary(["\x00", "\ud800", "a\nb", " "])  # JSON escapes them
  table = ne.EmbeddingTable.from_pretrained(W).with_vocabulary(vocab)
  formats.save(table, path)
  assert formats.load(path).vocabulary == vocab
