"""Tests for `named_embed._src.files.distributed_io` on one process: checkpoint
directories (`ne.save` without a suffix), loads placed on a mesh, and the
errors. Several processes: tests/multihost_test.py."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from penzai import pz
from safetensors import safe_open
from safetensors.numpy import save_file

import named_embed as ne
from named_embed._src.base import processes
from named_embed._src.files import directory_saves, distributed_io
from named_embed._src.files.file_metadata import Tensor

INDEX = "model.safetensors.index.json"
ROWS = (np.arange(8 * 4, dtype=np.float32).reshape(8, 4) / 3).astype(
  ml_dtypes.bfloat16
)
ROWS[7] = 0  # the alignment row of the table below


@pytest.fixture
def table():
  vocab = ne.Vocabulary([f"w{i}" for i in range(7)], pad="w0")
  return (
    ne.EmbeddingTable.from_pretrained(ROWS[:7], freeze=False, name="tok")
    .padded_to_multiple(4)
    .with_vocabulary(vocab)
  )


def test_a_path_without_a_suffix_is_a_directory(tmp_path):
  assert distributed_io.is_directory_path(tmp_path / "out")
  assert distributed_io.is_directory_path(f"{tmp_path}/out.d/")
  assert distributed_io.is_directory_path(tmp_path)  # exists
  assert not distributed_io.is_directory_path(tmp_path / "t.safetensors")
  assert not distributed_io.is_directory_path(tmp_path / "t.bin")


def test_directory_round_trip_keeps_everything(tmp_path, table):
  out = tmp_path / "out"
  ne.save(table, out)
  assert sorted(os.listdir(out)) == ["model-00001-of-00001.safetensors", INDEX]
  spec = json.loads((out / INDEX).read_text())
  assert spec["weight_map"] == {
    "embeddings": "model-00001-of-00001.safetensors"
  }
  metadata = spec["metadata"]
  assert metadata["named_embed"] == "1" and metadata["total_size"] == 8 * 4 * 2
  with safe_open(out / "model-00001-of-00001.safetensors", "np") as f:
    assert f.metadata()["named_embed_save"] == metadata["named_embed_save"]
  for loaded in (ne.load(out), ne.load(out / INDEX)):
    assert loaded.rows_array().tobytes() == ROWS.tobytes()
    assert (loaded.vocab_size, loaded.num_rows) == (7, 8)
    assert loaded.vocabulary == table.vocabulary
    assert (loaded.padding_index, loaded.embeddings.label) == (
      0,
      "tok.embeddings",
    )
  plain = ne.from_safetensors(out, "embeddings", true_vocab_size=7)
  assert np.asarray(plain.rows_array()).tobytes() == ROWS.tobytes()


def test_loads_placed_on_a_mesh(tmp_path, table):
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  rules = {"vocabulary": "model", "batch": "data"}
  ne.save(table, tmp_path / "t.safetensors")
  ne.save(table, tmp_path / "out")
  for path in (tmp_path / "t.safetensors", tmp_path / "out"):
    placed = ne.load(path, mesh=mesh, rules=rules)
    assert placed.rows_sharding.spec == jax.sharding.PartitionSpec(
      "model", None
    )
    assert placed.rows_array().sharding.spec[0] == "model"
    assert np.asarray(placed.rows_array()).tobytes() == ROWS.tobytes()
    assert placed.vocabulary == table.vocabulary
  hf = tmp_path / "hf.safetensors"
  save_file({"embed.weight": np.ones((8, 4), np.float32)}, hf)
  found = ne.from_safetensors(hf, "embed.weight", mesh=mesh, rules=rules)
  assert found.rows_sharding.spec[0] == "model" and found.frozen


def test_mesh_and_rules_are_checked(tmp_path, table):
  path = tmp_path / "t.safetensors"
  ne.save(table, path)
  mesh = jax.make_mesh((1,), ("model",))
  with pytest.raises(TypeError, match=r"`rules` must map axis names"):
    ne.load(path, mesh=mesh)
  with pytest.raises(TypeError, match=r"pass `mesh=` too"):
    ne.load(path, rules={"vocabulary": "model"})
  with pytest.raises(TypeError, match=r"must be a jax.sharding.Mesh"):
    ne.load(path, mesh="model", rules={})
  with pytest.raises(ValueError, match=r"not one of the mesh's axes"):
    ne.load(path, mesh=mesh, rules={"vocabulary": "tensor"})


def test_a_second_save_replaces_the_first_and_its_files(tmp_path, table):
  out = tmp_path / "out"
  out.mkdir()
  stale = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
  ]
  for name in stale:
    (out / name).write_bytes(b"old")
  (out / "notes.txt").write_text("kept")
  old_index = {"metadata": {"named_embed": "1"}, "weight_map": {"x": stale[1]}}
  (out / INDEX).write_text(json.dumps(old_index))
  ne.save(table, out)
  assert sorted(os.listdir(out)) == [
    "model-00001-of-00001.safetensors",
    "model-00001-of-00002.safetensors",  # the old index did not list it
    INDEX,
    "notes.txt",
  ]
  assert ne.load(out).rows_array().tobytes() == ROWS.tobytes()


def test_a_foreign_checkpoint_is_never_overwritten(tmp_path, table):
  save_file({"w": np.ones((2, 2), np.float32)}, tmp_path / "m.safetensors")
  index = {"metadata": {}, "weight_map": {"w": "m.safetensors"}}
  (tmp_path / INDEX).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"that named_embed did not write"):
    ne.save(table, tmp_path)
  assert json.loads((tmp_path / INDEX).read_text()) == index
  file = tmp_path / "table"
  file.write_text("a file")
  with pytest.raises(FileExistsError, match=r"is a file. A path without"):
    ne.save(table, file)


def test_a_failed_save_leaves_the_previous_version(
  tmp_path, table, monkeypatch
):
  out = tmp_path / "out"
  ne.save(table, out)
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}

  def disk_full(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(directory_saves, "write_tensor_file", disk_full)
  with pytest.raises(OSError, match="No space left"):
    ne.save(table.quantized("int8"), out)
  after = {name: (out / name).read_bytes() for name in os.listdir(out)}
  assert after == before  # the old index and files, nothing of the new
  assert ne.load(out).rows_array().tobytes() == ROWS.tobytes()
  os.remove(out / INDEX)  # as a save of an earlier version left it
  with pytest.raises(ValueError, match=r"without its index .* interrupted"):
    ne.load(out)


def test_a_mesh_that_does_not_divide_the_rows_is_named(tmp_path):
  path = tmp_path / "t.safetensors"
  ne.save(ne.EmbeddingTable.from_pretrained(np.ones((5, 2), np.float32)), path)
  mesh = jax.make_mesh((1,), ("model",))
  fake = jax.sharding.AbstractMesh((4,), ("model",))
  with pytest.raises(ValueError, match=r"of shape \{'vocabulary': 5, 'emb"):
    distributed_io._placements(
      ne._src.files.stored_tensors.open_tensors(path, ["embeddings"]),
      lambda stored, arrays: ne.EmbeddingTable.from_pretrained(
        arrays["embeddings"]
      ),
      lambda table: {
        "embeddings": Tensor(("vocabulary", "embedding"), table.rows_array())
      },
      fake,
      {"vocabulary": "model"},
    )
  assert ne.load(path, mesh=mesh, rules={"vocabulary": "model"}).num_rows == 5


def test_one_process_agrees_with_itself(monkeypatch):
  assert processes.share("step", "v") == ["v"]
  with pytest.raises(KeyError):
    with processes.together("step"):
      raise KeyError("x")
  monkeypatch.setenv(processes.TIMEOUT_VARIABLE, "2.5")
  assert processes.timeout_seconds() == 2.5
  monkeypatch.setenv(processes.TIMEOUT_VARIABLE, "soon")
  with pytest.raises(ValueError, match=r"positive number of seconds"):
    processes.timeout_seconds()


# ------------------------------------------------- compressed and adapted


def compressed_tables():
  """Every kind, over float32 and bfloat16 rows, with alignment rows (7
  tokens in 8 rows) and without; adapters hold distinct values."""
  rng = np.random.default_rng(3)
  rows = rng.normal(size=(8, 4)).astype(np.float32)
  vocab = ne.Vocabulary([f"w{i}" for i in range(7)], pad="w0")
  aligned = (
    ne.EmbeddingTable.from_pretrained(rows[:7])
    .with_vocabulary(vocab)
    .padded_to_multiple(4)
  )
  bf16 = ne.EmbeddingTable.from_pretrained(
    rows.astype(ml_dtypes.bfloat16), padding_index=2
  )

  def filled(table):
    for param in pz.unbind_params(table)[1]:
      value = param.value
      data = rng.normal(size=tuple(value.named_shape.values()))
      param.value = pz.nx.wrap(data.astype(value.dtype), *value.named_shape)
    return table

  key = jax.random.key(0)
  tables = {}
  for name, base in (("aligned", aligned), ("bf16", bf16)):
    tables[f"int8_{name}"] = base.quantized("int8")
    tables[f"int4_{name}"] = base.quantized("int4")
    tables[f"int4_g2_{name}"] = base.quantized("int4", group_size=2)
    tables[f"lora_{name}"] = filled(
      base.with_lora(2, alpha=3.0, name="l", init_base_rng=key)
    )
    tables[f"lora_int8_{name}"] = filled(
      base.quantized("int8").with_lora(2, name="l", init_base_rng=key)
    )
    tables[f"rows_{name}"] = filled(base.with_trainable_rows([1, 5], name="r"))
  return tables


TABLES = compressed_tables()


def leaves(table):
  return [np.asarray(x) for x in jax.tree.leaves(pz.freeze_params(table))]


def assert_same_table(got, want):
  assert type(got) is type(want)
  for x, y in zip(leaves(got), leaves(want), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()
  for field in ("vocabulary", "padding_index", "true_vocab_size", "num_rows"):
    assert getattr(got, field) == getattr(want, field), field
  labels = [p.label for p in pz.unbind_params(got)[1]]
  assert labels == [p.label for p in pz.unbind_params(want)[1]]
  for field in ("scheme", "group_size", "alpha", "row_ids"):
    owner = want if hasattr(want, field) else getattr(want, "base", None)
    if hasattr(owner, field):
      other = got if owner is want else got.base
      assert getattr(other, field) == getattr(owner, field), field


@pytest.mark.parametrize("name", list(TABLES))
def test_compressed_tables_round_trip_files_and_directories(tmp_path, name):
  want = TABLES[name]
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  rules = {"vocabulary": "model", "batch": "data"}
  for path in (tmp_path / "t.safetensors", tmp_path / "out"):
    ne.save(want, path)
    assert_same_table(ne.load(path), want)
    placed = ne.load(path, mesh=mesh, rules=rules)
    assert_same_table(placed, want)
    expected = jax.tree.leaves(pz.freeze_params(ne.shard(want, mesh, rules)))
    for got, like in zip(jax.tree.leaves(pz.freeze_params(placed)), expected):
      assert got.sharding == like.sharding
    assert placed.rows_sharding == ne.shard(want, mesh, rules).rows_sharding
    if not want.frozen:
      assert ne.load(path, freeze=True).frozen
  spec = json.loads((tmp_path / "out" / INDEX).read_text())
  assert spec["metadata"]["table"] == {"i": "quantized", "l": "lora"}.get(
    name[0], "trainable_rows"
  )
  for key in spec["weight_map"]:  # one device: every tensor whole
    assert "[" not in key


def test_the_write_plan_covers_every_tensor():
  plan = distributed_io.assign_writes(
    {
      "codes": jax.numpy.ones((8, 4), np.int8),
      "scales": jax.numpy.ones(8, np.float32),
    }
  )
  file = "model-00001-of-00001.safetensors"
  assert plan.weight_map == {"codes": file, "scales": file}
  assert plan.tensors == {"codes": "codes", "scales": "scales"}
  assert plan.regions["codes"] == ((0, 0), (8, 4))
  assert plan.total_size == 8 * 4 + 8 * 4
  assert plan.files_of(0) == {file: ["codes", "scales"]}


def test_unbound_adapters_are_not_saved(tmp_path):
  lora = TABLES["lora_aligned"]
  unbound, _ = pz.unbind_params(lora)
  with pytest.raises(ValueError, match=r"unbound"):
    ne.save(unbound, tmp_path / "t.safetensors")
  with pytest.raises(ValueError, match=r"unbound"):
    ne.save(unbound, tmp_path / "out")
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
