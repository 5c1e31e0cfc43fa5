"""Inspection, summaries, exports and resizing of every kind of table on 8
CPU devices, on every layout.

Run by tests/sharding_test.py in a subprocess. One matrix: kinds (float,
int8, int4, LoRA over int4, trainable rows over int8) x layouts (one
device, vocabulary split over Explicit mesh axes, over Auto axes; each
with and without alignment rows). Every result is compared with the same
call on the float reference table (the dequantised or merged table, on one
device), and with numpy where a formula is simple.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from jax.sharding import AxisType
from penzai import pz
from safetensors.numpy import load_file

import named_embed as ne
from named_embed._src.base import quantization
from named_embed._src.tools import rendering

D = 8
RULES = {"vocabulary": "model", "batch": "data"}
KINDS = ["float", "int8", "int4", "lora_int4", "rows_int8"]
LAYOUTS = [  # one device without alignment rows: tests/inspection_test.py
  (mesh, aligned)
  for mesh in ("one_device", "explicit", "auto")
  for aligned in (False, True)
  if mesh != "one_device" or aligned
]
LAYOUT_IDS = [f"{m}-{'aligned' if a else 'exact'}" for m, a in LAYOUTS]
NEW = ["n0", "n1", "n2", "n3", "n4"]  # 3 fill the alignment rows, 2 beyond


def tokens(aligned: bool) -> int:
  """13 tokens in 16 rows (3 alignment rows), or 16 tokens in 16 rows."""
  return 13 if aligned else 16


def make(kind: str, aligned: bool):
  """A fresh table of ``kind`` (fresh parameters: `ne.shard` moves them)."""
  v = tokens(aligned)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(v, D)).astype(np.float32)
  vocabulary = ne.Vocabulary([f"t{i}" for i in range(v)], pad="t0")
  table = ne.EmbeddingTable.from_pretrained(w).with_vocabulary(vocabulary)
  if aligned:
    table = table.padded_to_multiple(8)
  if kind == "float":
    return table
  if kind == "int8":
    return table.quantized("int8")
  if kind == "int4":
    return table.quantized("int4", group_size=4)
  if kind == "lora_int4":
    lora = table.quantized("int4").with_lora(
      2, 3.0, name="e", init_base_rng=jax.random.key(1)
    )
    a = rng.normal(size=(table.num_rows, 2)).astype(np.float32)
    lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
    return lora
  rows = table.quantized("int8").with_trainable_rows([3, 9, 12], name="r")
  trained = rng.normal(size=(3, D)).astype(np.float32)
  rows.rows.value = pz.nx.wrap(trained).tag("rows", "embedding")
  return rows


def reference(table) -> ne.EmbeddingTable:
  """The float table of an unsharded table (tests may ask the kind)."""
  if isinstance(table, ne.QuantizedTable):
    return table.dequantized()
  if isinstance(table, ne.EmbeddingTable):
    return table
  return table.merged()


def placed(kind: str, layout):
  mesh_kind, aligned = layout
  table = make(kind, aligned)
  if mesh_kind == "one_device":
    return table, None
  types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[mesh_kind]
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(types,) * 2)
  return ne.shard(table, mesh, RULES), mesh


def token_rows(table) -> np.ndarray:
  return np.asarray(table.token_rows())


def data(named, *order):
  return np.asarray(named.order_as(*order).data_array)


def same_search(got, want):
  (got_ids, got_scores), (want_ids, want_scores) = got, want
  names = tuple(want_ids.named_shape)
  np.testing.assert_array_equal(data(got_ids, *names), data(want_ids, *names))
  np.testing.assert_allclose(
    data(got_scores, *names), data(want_scores, *names), rtol=1e-5, atol=1e-5
  )


# --------------------------------------------------------------- inspection
# On one device, tests/inspection_test.py checks every kind (alignment rows
# included) against numpy; here, the split layouts against the float table.

MESH_LAYOUTS = [layout for layout in LAYOUTS if layout[0] != "one_device"]


@pytest.mark.parametrize(
  "layout",
  MESH_LAYOUTS,
  ids=[f"{m}-{'aligned' if a else 'exact'}" for m, a in MESH_LAYOUTS],
)
@pytest.mark.parametrize("kind", KINDS)
def test_nearest_similarity_analogy_equal_the_float_table(kind, layout):
  table, _ = placed(kind, layout)
  ref = reference(make(kind, layout[1]))
  v = tokens(layout[1])
  query = ["t1", "t5", "t11"]
  for metric in ("cosine", "euclidean"):  # "dot": tests/inspection_test.py
    got = ne.nearest(table, query, k=5, metric=metric, exclude=["t2", 7])
    same_search(got, ne.nearest(ref, query, k=5, metric=metric, exclude=[7, 2]))
    if metric == "cosine":  # numpy: the query, t2, 7 and the pad row left out
      rows = token_rows(ref).astype(np.float64)
      unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
      scores = unit[[1, 5, 11]] @ unit.T
      scores[:, [0, 2, 7]] = -np.inf
      scores[[0, 1, 2], [1, 5, 11]] = -np.inf
      np.testing.assert_array_equal(
        data(got[0], "query", "neighbor"),
        np.argsort(-scores, axis=1, kind="stable")[:, :5],
      )
  # vectors with batch axes, every token asked for (the excluded pad row
  # fills the end at -inf)
  vectors = pz.nx.wrap(
    np.random.default_rng(1).normal(size=(2, D)).astype(np.float32)
  ).tag("batch", "embedding")
  got = table.nearest(vectors, k=v)
  same_search(got, ref.nearest(vectors, k=v))
  assert np.isneginf(data(got[1], "batch", "neighbor")[:, -1]).all()
  # an id array, under jit
  ids = pz.nx.wrap(np.array([[1, 4], [6, 9]])).tag("batch", "seq")
  search = jax.jit(lambda t, i: ne.nearest(t, i, k=3))
  same_search(search(pz.freeze_params(table), ids), ne.nearest(ref, ids, k=3))

  for a, b, metric in [(["t1", "t2"], ["t4", "t6"], "cosine")]:
    got = ne.similarity(table, a, b, metric)
    want = ne.similarity(ref, a, b, metric)
    names = tuple(want.named_shape)
    np.testing.assert_allclose(
      data(got, *names), data(want, *names), rtol=1e-5, atol=1e-6
    )
  same_search(
    table.analogy(["t1", "t4"], ["t3"], k=4),
    ref.analogy(["t1", "t4"], ["t3"], k=4),
  )


@pytest.mark.parametrize("mesh_kind", ["explicit", "auto"])
@pytest.mark.parametrize("kind", ["int4", "lora_int4", "rows_int8"])
def test_a_split_search_never_gathers_the_rows(kind, mesh_kind):
  from named_embed._src.tools import inspection

  table, _ = placed(kind, (mesh_kind, True))
  source, arrays = table.row_parts()
  config = inspection._SearchConfig(
    source=source,
    rows_sharding=table.rows_sharding,
    metric="cosine",
    k=3,
    vocab_size=table.vocab_size,
    padding_index=table.padding_index,
    chunk_size=2,
  )
  queries = jnp.ones((2, D), jnp.float32)
  ids = jnp.full((2,), -1, jnp.int32)
  skip = np.full(1, -1, np.int32)
  text = (
    inspection._search_kernel.lower(arrays, queries, ids, skip, config)
    .compile()
    .as_text()
  )
  gathered = [line for line in text.splitlines() if "all-gather(" in line]
  # only the devices' candidates: [2 queries, 4 devices x 3]
  assert gathered and all("[2,12]" in line for line in gathered), gathered


# ------------------------------------------------------ summaries and pages


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_summary_treescope_and_page(kind, layout, tmp_path):
  table, _ = placed(kind, layout)
  alone = make(kind, layout[1])
  line = ne.summarize(table)
  assert line == ne.summarize(alone)
  assert line[:30] in treescope.render_to_text(table)
  if kind == "float":
    norms = np.linalg.norm(token_rows(alone), axis=1)
    assert f"max {norms.max():.3g}" in line and f"min {norms.min():.3g}" in line
  low, mean, high = rendering.row_norm_statistics(table)
  norms = np.linalg.norm(token_rows(reference(alone)), axis=1)
  np.testing.assert_allclose(
    [low, mean, high], [norms.min(), norms.mean(), norms.max()], rtol=1e-5
  )
  page = pathlib.Path(ne.show(table, tmp_path / "t.html")).read_text()
  assert '"t5"' in page and '"t0 (padding)"' in page
  drawn = rendering._rows_as_read(table)
  np.testing.assert_array_equal(
    data(drawn, "vocabulary", "embedding"),
    np.asarray(reference(alone).rows_array()),
  )


# ----------------------------------------------------------------- exports


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_exports_write_the_float_token_rows(kind, layout, tmp_path):
  table, _ = placed(kind, layout)
  ref = reference(make(kind, layout[1]))
  want = token_rows(ref)
  path = tmp_path / "vectors.txt"
  ne.save_word2vec(table, path)
  back = ne.load_word2vec(path)
  assert back.vocabulary.tokens == ref.vocabulary.tokens
  np.testing.assert_array_equal(np.asarray(back.rows_array()), want)
  ne.save_word2vec(table, tmp_path / "vectors.bin", binary=True)
  np.testing.assert_array_equal(
    np.asarray(ne.load_word2vec(tmp_path / "vectors.bin").rows_array()), want
  )
  ne.to_safetensors(table, tmp_path / "t.safetensors", "w")
  np.testing.assert_array_equal(
    load_file(tmp_path / "t.safetensors")["w"], want
  )
  ne.to_safetensors(table, tmp_path / "a.safetensors", "w", alignment_rows=True)
  np.testing.assert_array_equal(
    load_file(tmp_path / "a.safetensors")["w"], np.asarray(ref.rows_array())
  )
  flax = ne.to_flax(table)["params"]["embedding"]
  np.testing.assert_array_equal(np.asarray(flax), want)
  np.testing.assert_array_equal(ne.to_torch_weight(table), want)
  np.testing.assert_array_equal(
    np.asarray(ne.to_brainstate_weight(table)), want
  )


# ---------------------------------------------------------------- resizing


def arrays_of(table):
  source, arrays = table.row_parts()
  return source, [np.asarray(a) for a in arrays], arrays


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_added_tokens_keep_old_parts_and_the_placement(kind, layout):
  table, mesh = placed(kind, layout)
  v = tokens(layout[1])
  old_source, old, old_arrays = arrays_of(table)
  grown = table.with_added_tokens(NEW)
  source, new, new_arrays = arrays_of(grown)
  assert grown.vocab_size == v + len(NEW)
  assert grown.vocabulary.tokens[v:] == tuple(NEW)
  assert grown.num_rows >= grown.vocab_size
  if mesh is not None:
    assert grown.num_rows % 4 == 0
  assert grown.rows_sharding == table.rows_sharding
  for before, after, aligned in zip(old, new, source.row_aligned):
    if aligned:  # old rows bit for bit; alignment rows zero
      assert after[:v].tobytes() == before[:v].tobytes()
      assert not after[grown.vocab_size :].any()
    else:  # B, the trained rows: unchanged
      assert after.tobytes() == before.tobytes()
  if mesh is not None:
    for before, after in zip(old_arrays, new_arrays):
      assert after.sharding.spec == before.sharding.spec
  # The new rows as read start at the float32 mean of the (base's) token
  # rows as read, the pad row left out, quantised like the table.
  alone = make(kind, layout[1])
  base = alone.base if hasattr(alone, "base") else alone
  mean = token_rows(reference(base))[1:].mean(axis=0, dtype=np.float32)
  rows = np.asarray(reference_of_grown(grown).rows_array())
  step = np.abs(mean).max() / quantization.q_max(4) if kind != "float" else 0
  np.testing.assert_allclose(
    rows[v : v + len(NEW)], np.tile(mean, (len(NEW), 1)), atol=step + 1e-6
  )
  ids = pz.nx.wrap(np.array([[1, v, v + 4]])).tag("batch", "seq")
  looked = ne.lookup(grown, ids).order_as("batch", "seq", "embedding")
  np.testing.assert_allclose(
    np.asarray(looked.data_array)[0], rows[[1, v, v + 4]], rtol=1e-6
  )
  shrunk = grown.resized(v - 1 if kind != "rows_int8" else 13)
  assert shrunk.vocab_size == (v - 1 if kind != "rows_int8" else 13)
  np.testing.assert_array_equal(
    np.asarray(reference_of_grown(shrunk).token_rows()),
    rows[: shrunk.vocab_size],
  )


def reference_of_grown(table):
  """The float table of a (maybe sharded) resized table, on the host."""
  rows = rendering._rows_as_read(table)
  out = ne.EmbeddingTable.from_pretrained(data(rows, "vocabulary", "embedding"))
  if table.true_vocab_size is not None:
    out = dataclasses.replace(out, true_vocab_size=table.true_vocab_size)
  return out
