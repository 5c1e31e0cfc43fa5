"""Tests of named_embed._src.files.checkpoints: sharded Hugging Face checkpoints
read through their index, and `to_safetensors`."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
from penzai import pz
from safetensors.numpy import load_file, save_file

import named_embed as ne
from named_embed._src.files import checkpoints, stored_tensors, tensor_files

KEY = "model.embed_tokens.weight"
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def vectors(rows=6, dim=3, dtype=np.float32):
  w = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
  return w.astype(dtype)


def vocabulary(size=6):
  return ne.Vocabulary(
    ["<pad>", *(f"w{i}" for i in range(size - 1))], pad="<pad>"
  )


def sharded_checkpoint(directory, embed=None):
  """A two-file checkpoint: the embeddings in the second file."""
  embed = vectors() if embed is None else embed
  first = {"model.layers.0.w": np.ones((4, 4), np.float32)}
  second = {KEY: embed, "lm_head.weight": np.zeros((2, 2), np.float32)}
  names = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
  ]
  for name, tensors in zip(names, (first, second)):
    save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
  weight_map = {k: names[0] for k in first} | {k: names[1] for k in second}
  index = os.path.join(directory, "model.safetensors.index.json")
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return [os.path.join(directory, n) for n in names], index


def test_sharded_checkpoint_reads_one_tensor_of_one_file(tmp_path, monkeypatch):
  (first, second), index = sharded_checkpoint(tmp_path)
  with open(first, "wb") as f:
    f.write(b"not a safetensors file")  # reading it would fail
  opened, read = [], []
  real_open = tensor_files.open_file

  def recording(path):
    opened.append(os.fspath(path))
    return real_open(path)

  read_region = stored_tensors._File.read_region

  def reading(file, name, local, out):
    read.append((file.path, name))
    return read_region(file, name, local, out)

  monkeypatch.setattr(tensor_files, "open_file", recording)
  monkeypatch.setattr(stored_tensors._File, "read_region", reading)
  for path in (tmp_path, index):
    table = ne.from_safetensors(path, key=KEY, vocabulary=vocabulary())
    assert np.asarray(table.rows_array()).tobytes() == vectors().tobytes()
    assert (table.padding_index, table.frozen) == (0, True)
  assert opened == [second, second] and read == [(second, KEY)] * 2


def test_missing_key_names_the_files_looked_in(tmp_path):
  (first, second), index = sharded_checkpoint(tmp_path)
  with pytest.raises(ValueError) as error:
    ne.from_safetensors(tmp_path, key="model.embed_token.weight")
  message = str(error.value)
  assert index in message and "Did you mean 'model.embed_tokens.weight'" in (
    message
  )
  assert os.path.basename(first) in message and os.path.basename(second) in (
    message
  )
  os.remove(index)  # no index: the headers are searched
  with pytest.raises(ValueError, match="looked in") as error:
    ne.from_safetensors(tmp_path, key="nope")
  assert os.path.basename(first) in str(error.value)
  table = ne.from_safetensors(tmp_path, key=KEY)
  assert table.vocab_size == 6


def test_bad_indexes_and_directories(tmp_path):
  (first, second), index = sharded_checkpoint(tmp_path)
  os.remove(second)
  with pytest.raises(FileNotFoundError, match="incomplete download"):
    ne.from_safetensors(tmp_path, key=KEY)
  with open(index, "w") as f:
    json.dump({"weight_map": {KEY: "../elsewhere.safetensors"}}, f)
  with pytest.raises(ValueError, match="outside the index's directory"):
    ne.from_safetensors(index, key=KEY)
  with open(index, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ne.from_safetensors(index, key=KEY)
  with open(index, "w") as f:
    json.dump({"metadata": {}}, f)
  with pytest.raises(ValueError, match='needs a "weight_map"'):
    ne.from_safetensors(index, key=KEY)
  other = os.path.join(tmp_path, "other.safetensors.index.json")
  with open(other, "w") as f:
    json.dump({"weight_map": {}}, f)
  with pytest.raises(ValueError, match="several checkpoint indexes"):
    ne.from_safetensors(tmp_path, key=KEY)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no .safetensors file"):
    ne.from_safetensors(empty, key=KEY)
  with pytest.raises(FileNotFoundError, match="No checkpoint file"):
    ne.from_safetensors(tmp_path / "missing.safetensors", key=KEY)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_to_safetensors_round_trip_is_bit_exact(tmp_path, dtype):
  table = ne.EmbeddingTable.from_pretrained(vectors(dtype=dtype))
  table = table.with_vocabulary(vocabulary())
  path = tmp_path / "embed.safetensors"
  ne.to_safetensors(table, path, key=KEY)
  plain = load_file(path)  # any safetensors reader
  assert list(plain) == [KEY] and plain[KEY].dtype == np.dtype(dtype)
  with safetensors.safe_open(path, "np") as f:
    assert f.metadata() == {"format": "pt"}
  back = ne.from_safetensors(path, key=KEY, vocabulary=table.vocabulary)
  assert back.dtype == table.dtype and back.vocabulary == table.vocabulary
  assert np.asarray(back.rows_array()).tobytes() == (
    np.asarray(table.rows_array()).tobytes()
  )


def test_alignment_rows_written_on_request_and_read_back(tmp_path):
  table = ne.EmbeddingTable.from_pretrained(vectors(), padding_index=0)
  table = table.with_vocabulary(vocabulary()).padded_to_multiple(4)  # 8 rows
  tokens, every = tmp_path / "tokens.safetensors", tmp_path / "all.safetensors"
  ne.to_safetensors(table, tokens, KEY)
  ne.to_safetensors(table, every, KEY, alignment_rows=True)
  assert load_file(tokens)[KEY].shape == (6, 3)
  assert load_file(every)[KEY].shape == (8, 3)
  with pytest.raises(ValueError, match="pass `true_vocab_size=6`"):
    ne.from_safetensors(every, key=KEY, vocabulary=table.vocabulary)
  back = ne.from_safetensors(
    every, key=KEY, vocabulary=table.vocabulary, true_vocab_size=6
  )
  assert (back.num_rows, back.vocab_size, back.padding_index) == (8, 6, 0)
  assert np.asarray(back.rows_array()).tobytes() == (
    np.asarray(table.rows_array()).tobytes()
  )
  with pytest.raises(ValueError, match=r"all.safetensors.*exceeds the 8 rows"):
    ne.from_safetensors(every, key=KEY, true_vocab_size=9)


def test_to_safetensors_writes_the_rows_as_read_of_every_kind(tmp_path):
  table = ne.EmbeddingTable.from_pretrained(vectors(dim=4)).padded_to_multiple(
    8
  )
  lora = table.quantized("int4").with_lora(
    1, name="e", init_base_rng=jax.random.key(0)
  )
  lora.lora_a.value = pz.nx.wrap(np.full((8, 1), 0.5, np.float32)).tag(
    "vocabulary", "rank"
  )
  q = table.quantized("int8")
  rows = q.with_trainable_rows([1, 4], name="r")
  for adapted, ref in [
    (q, q.dequantized()),
    (lora, lora.merged()),
    (rows, rows.merged()),
  ]:
    path = tmp_path / f"{type(adapted).__name__}.safetensors"
    ne.to_safetensors(adapted, path, KEY)
    assert load_file(path)[KEY].tobytes() == (
      np.asarray(ref.token_rows()).tobytes()
    )
    ne.to_safetensors(adapted, path, KEY, alignment_rows=True)
    assert load_file(path)[KEY].tobytes() == (
      np.asarray(ref.rows_array()).tobytes()
    )


def test_to_safetensors_errors(tmp_path):
  table = ne.EmbeddingTable.from_pretrained(vectors())
  with pytest.raises(TypeError, match="must be a named_embed table"):
    ne.to_safetensors(vectors(), tmp_path / "x.safetensors", KEY)
  with pytest.raises(TypeError, match="tensor name"):
    ne.to_safetensors(table, tmp_path / "x.safetensors", 3)
  with pytest.raises(ValueError, match="non-empty"):
    ne.to_safetensors(table, tmp_path / "x.safetensors", "")
  assert not os.listdir(tmp_path)


def test_tensor_file_of_a_single_file_is_that_file(tmp_path):
  path = os.path.join(tmp_path, "model.safetensors")
  save_file({KEY: vectors()}, path)
  assert checkpoints.tensor_file(path, KEY) == path
  assert checkpoints.tensor_file(tmp_path, KEY) == path
