"""Tests for `named_embed._src.files.stored_tensors`: tensors stored whole or
in blocks, read a region at a time."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from named_embed._src.files import stored_tensors, tensor_files
from named_embed._src.files.stored_tensors import block_name, open_tensor

WHOLE = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)


def write_blocks(directory, blocks, metadata=None, files=None):
  """Blocks ``{(start, stop): array}`` of tensor "w", one file each, and an
  index."""
  weight_map = {}
  for number, ((start, stop), array) in enumerate(blocks.items()):
    name = block_name("w", start, stop)
    file = (files or {}).get(name, f"part-{number}.safetensors")
    save_file({name: array}, directory / file, metadata=metadata)
    weight_map[name] = file
  index = {"metadata": metadata or {}, "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def grid(rows, cols, array=WHOLE):
  """The blocks of ``array`` cut at ``rows`` and ``cols`` boundaries."""
  blocks = {}
  for r0, r1 in zip(rows[:-1], rows[1:]):
    for c0, c1 in zip(cols[:-1], cols[1:]):
      # C order: safetensors writes the raw buffer of what it is given
      blocks[((r0, c0), (r1, c1))] = np.ascontiguousarray(array[r0:r1, c0:c1])
  return blocks


def test_block_names_round_trip():
  name = block_name("model.embed_tokens.weight", (3, 0), (9, 64))
  assert name == "model.embed_tokens.weight[3:9,0:64]"
  assert stored_tensors.parse_block_name(name) == (
    "model.embed_tokens.weight",
    (3, 0),
    (9, 64),
  )
  for plain in ("w", "w[0]", "w[a:b]", "w[1:2]x"):
    assert stored_tensors.parse_block_name(plain) == (plain, (), ())


@pytest.mark.parametrize(
  "rows, cols", [([0, 8], [0, 6]), ([0, 2, 8], [0, 6]), ([0, 4, 8], [0, 3, 6])]
)
def test_any_region_reads_back_from_any_grid(tmp_path, rows, cols):
  write_blocks(tmp_path, grid(rows, cols))
  stored = open_tensor(tmp_path, "w")
  assert (stored.shape, stored.dtype) == ((8, 6), np.float32)
  assert len(stored.blocks) == (len(rows) - 1) * (len(cols) - 1)
  np.testing.assert_array_equal(stored.read(), WHOLE)
  for region in [
    (slice(1, 7),),
    (slice(3, 4), slice(2, 5)),
    (slice(0, 8), slice(5, 6)),
    (slice(2, 2),),
  ]:
    np.testing.assert_array_equal(stored.read(region), WHOLE[region])


def test_bfloat16_blocks_read_bit_for_bit(tmp_path):
  rows = (WHOLE / 7).astype(ml_dtypes.bfloat16)
  write_blocks(tmp_path, grid([0, 4, 8], [0, 6], rows))
  stored = open_tensor(tmp_path, "w")
  assert stored.dtype == np.dtype(ml_dtypes.bfloat16)
  assert stored.read((slice(2, 6),)).tobytes() == rows[2:6].tobytes()


def test_blocks_that_do_not_tile_are_refused(tmp_path):
  gap = {((0, 0), (3, 6)): WHOLE[:3], ((4, 0), (8, 6)): WHOLE[4:]}
  write_blocks(tmp_path, gap)
  with pytest.raises(ValueError, match=r"do not tile dimension 0"):
    open_tensor(tmp_path, "w")


def test_missing_cells_are_refused(tmp_path):
  blocks = grid([0, 4, 8], [0, 3, 6])
  del blocks[((4, 3), (8, 6))]
  write_blocks(tmp_path, blocks)
  with pytest.raises(ValueError, match=r"3 blocks do not cover a \(8, 6\)"):
    open_tensor(tmp_path, "w")


def test_a_block_of_the_wrong_shape_is_corrupt(tmp_path):
  write_blocks(tmp_path, grid([0, 4, 8], [0, 6]))
  save_file({"w[4:8,0:6]": WHOLE[:3]}, tmp_path / "part-1.safetensors")
  with pytest.raises(ValueError, match=r"has shape \(3, 6\).*needs shape"):
    open_tensor(tmp_path, "w")  # checked on opening, before any read


def test_a_file_of_another_save_is_refused(tmp_path):
  write_blocks(tmp_path, grid([0, 4, 8], [0, 6]), {"named_embed_save": "a"})
  save_file(
    {"w[4:8,0:6]": WHOLE[4:]},
    tmp_path / "part-1.safetensors",
    metadata={"named_embed_save": "b"},
  )
  with pytest.raises(ValueError, match=r"written by another save"):
    open_tensor(tmp_path, "w")  # the index, read again, is the same


def test_missing_tensors_and_files_are_named(tmp_path):
  save_file({"w": WHOLE, "bias": WHOLE[0]}, tmp_path / "one.safetensors")
  with pytest.raises(ValueError, match=r"has no tensor 'x'.*'bias', 'w'"):
    open_tensor(tmp_path / "one.safetensors", "x")
  write_blocks(tmp_path, grid([0, 4, 8], [0, 6]))
  with pytest.raises(ValueError, match=r"maps no tensor 'x'"):
    open_tensor(tmp_path, "x")
  (tmp_path / "part-1.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"part-1.safetensors"):
    open_tensor(tmp_path, "w")


def test_blocks_inside_one_file_without_an_index(tmp_path):
  blocks = {block_name("w", *r): a for r, a in grid([0, 5, 8], [0, 6]).items()}
  save_file(blocks, tmp_path / "blocks.safetensors")
  stored = open_tensor(tmp_path / "blocks.safetensors", "w")
  np.testing.assert_array_equal(stored.read(), WHOLE)
  assert "2 blocks in 1 files" in stored.describe()


def test_regions_are_read_into_aligned_arrays_that_cpu_devices_adopt(
  tmp_path,
):
  import jax

  save_file({"w": WHOLE}, tmp_path / "one.safetensors")
  stored = open_tensor(tmp_path / "one.safetensors", "w")
  for region in [None, (slice(2, 5),), (slice(1, 7), slice(2, 4))]:
    rows = stored.read(region)
    assert rows.ctypes.data % stored_tensors.ALIGNMENT == 0
    assert rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, WHOLE[region or ()])
  rows = stored.read((slice(2, 5),))
  placed = jax.device_put(rows, jax.devices("cpu")[0])
  assert placed.unsafe_buffer_pointer() == rows.ctypes.data  # no copy


def test_regions_cut_along_the_columns_are_read_a_chunk_at_a_time(
  tmp_path, monkeypatch
):
  save_file({"w": WHOLE}, tmp_path / "one.safetensors")
  write_blocks(tmp_path, grid([0, 3, 8], [0, 6]))
  monkeypatch.setattr(tensor_files, "CHUNK_BYTES", 2 * 6 * 4)  # 2 rows
  reads = []
  read_into = tensor_files.read_into

  def spy(f, offset, out, path):
    reads.append(out.nbytes)
    return read_into(f, offset, out, path)

  monkeypatch.setattr(tensor_files, "read_into", spy)
  for path in (tmp_path / "one.safetensors", tmp_path):
    reads.clear()
    stored = open_tensor(path, "w")
    np.testing.assert_array_equal(
      stored.read((slice(1, 8), slice(2, 5))), WHOLE[1:8, 2:5]
    )
    assert max(reads) <= 2 * 6 * 4  # never more than a chunk of rows
    reads.clear()
    np.testing.assert_array_equal(stored.read((slice(1, 8),)), WHOLE[1:8])
    assert sum(reads) == 7 * 6 * 4  # whole rows: exactly the region's bytes


def test_every_safetensors_dtype_of_a_table_is_read(tmp_path):
  tensors = {
    name: (WHOLE[:2] * 3).astype(dtype)
    for name, dtype in [
      ("f16", np.float16),
      ("bf16", ml_dtypes.bfloat16),
      ("f64", np.float64),
      ("i8", np.int8),
      ("u8", np.uint8),
      ("i32", np.int32),
      ("i64", np.int64),
      ("b", np.bool_),
    ]
  }
  tensors["scalar"] = np.array(2.5, np.float32)
  tensors["vector"] = np.arange(5, dtype=np.int16)
  save_file(tensors, tmp_path / "all.safetensors")
  for name, array in tensors.items():
    stored = open_tensor(tmp_path / "all.safetensors", name)
    assert stored.dtype == array.dtype
    assert stored.read().tobytes() == array.tobytes()
