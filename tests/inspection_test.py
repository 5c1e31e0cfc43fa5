"""Tests for named_embed._src.tools.inspection against numpy references."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from penzai import pz

import named_embed as ne
from named_embed._src.tools import inspection

WORDS = [f"w{i}" for i in range(20)]


def make_table(padding_index=None, vocabulary=True, axes=None, seed=0):
  rng = np.random.default_rng(seed)
  shape = (len(WORDS), *(axes or {"embedding": 6}).values())
  table = ne.EmbeddingTable.from_pretrained(
    rng.normal(size=shape).astype(np.float32),
    embedding_axes=tuple(axes or {"embedding": 6}),
    padding_index=padding_index,
  )
  return table.with_vocabulary(ne.Vocabulary(WORDS)) if vocabulary else table


def flat_rows(table):
  return np.asarray(table.rows_array(), np.float64).reshape(len(WORDS), -1)


def ref_scores(rows, query, metric):
  """Similarities (cosine, dot) or distances (euclidean), float64."""
  if metric == "dot":
    return rows @ query
  if metric == "euclidean":
    return np.linalg.norm(rows - query, axis=1)
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  return unit @ (query / np.linalg.norm(query))


def ref_nearest(rows, query, metric, k, excluded=()):
  scores = ref_scores(rows, query, metric)
  order = scores if metric == "euclidean" else -scores
  order = np.where(np.isin(np.arange(len(rows)), excluded), np.inf, order)
  ids = np.argsort(order, kind="stable")[:k]
  return ids, scores[ids]


def unwrap(named, *order):
  return np.asarray(named.order_as(*order).data_array)


# ---------------------------------------------------------------- nearest


@pytest.mark.parametrize("metric", inspection.METRICS)
def test_token_query_matches_numpy(metric, run):
  table = make_table()
  ids, scores = run(lambda t: t.nearest("w3", k=5, metric=metric), table)
  assert ids.named_shape == {"neighbor": 5}
  assert ids.dtype == jnp.int32 and scores.dtype == jnp.float32
  rows = flat_rows(table)
  want_ids, want_scores = ref_nearest(rows, rows[3], metric, 5, excluded=[3])
  np.testing.assert_array_equal(unwrap(ids, "neighbor"), want_ids)
  np.testing.assert_allclose(unwrap(scores, "neighbor"), want_scores, 1e-5)


@pytest.mark.parametrize("metric", inspection.METRICS)
def test_batched_vector_query_over_two_embedding_axes(metric, run):
  table = make_table(axes={"heads": 2, "head_dim": 3})
  rng = np.random.default_rng(1)
  raw = rng.normal(size=(3, 4, 2, 3)).astype(np.float32)
  vectors = pz.nx.wrap(raw.transpose(3, 0, 1, 2)).tag(
    "head_dim", "batch", "other", "heads"
  )
  ids, scores = run(
    lambda t, v: inspection.nearest(t, v, 4, metric), table, vectors
  )
  assert ids.named_shape == {"batch": 3, "other": 4, "neighbor": 4}
  rows = flat_rows(table)
  queries = unwrap(vectors, "batch", "other", "heads", "head_dim")
  for b in range(3):
    for o in range(4):
      want_ids, want_scores = ref_nearest(
        rows, queries[b, o].reshape(-1).astype(np.float64), metric, 4
      )
      got = unwrap(ids, "batch", "other", "neighbor")[b, o]
      np.testing.assert_array_equal(got, want_ids)
      np.testing.assert_allclose(
        unwrap(scores, "batch", "other", "neighbor")[b, o], want_scores, 1e-5
      )


def test_plain_vector_query_can_return_its_own_row():
  table = make_table()
  row = np.asarray(table.rows_array())[7]
  ids, scores = inspection.nearest(table, row, k=2)
  assert unwrap(ids, "neighbor")[0] == 7
  np.testing.assert_allclose(unwrap(scores, "neighbor")[0], 1.0, rtol=1e-6)


def test_token_list_and_id_array_queries_exclude_each_query(run):
  table = make_table()
  rows = flat_rows(table)
  ids, _ = table.nearest(["w1", 4, -1], k=3)
  assert ids.named_shape == {"query": 3, "neighbor": 3}
  for i, query in enumerate([1, 4, 19]):
    want, _ = ref_nearest(rows, rows[query], "cosine", 3, excluded=[query])
    np.testing.assert_array_equal(unwrap(ids, "query", "neighbor")[i], want)
  id_array = pz.nx.wrap(jnp.array([[2, 5], [-1, 0]], jnp.int32)).tag("a", "b")
  got, _ = run(lambda t, q: t.nearest(q, k=3, metric="dot"), table, id_array)
  assert got.named_shape == {"a": 2, "b": 2, "neighbor": 3}
  for (a, b), query in np.ndenumerate(np.array([[2, 5], [19, 0]])):
    want, _ = ref_nearest(rows, rows[query], "dot", 3, excluded=[query])
    np.testing.assert_array_equal(unwrap(got, "a", "b", "neighbor")[a, b], want)


def test_exclude_padding_and_full_k():
  table = make_table(padding_index=2)
  rows = flat_rows(table)
  ids, scores = table.nearest("w0", k=25, exclude=["w5", 6])  # 20 rows
  want, _ = ref_nearest(rows, rows[0], "cosine", 16, excluded=[0, 2, 5, 6])
  got = unwrap(ids, "neighbor")
  np.testing.assert_array_equal(got[:16], want)
  assert sorted(got[16:]) == [0, 2, 5, 6]
  assert np.all(unwrap(scores, "neighbor")[16:] == -np.inf)
  _, distances = table.nearest("w0", k=20, metric="euclidean")
  distances = unwrap(distances, "neighbor")
  assert np.all(np.diff(distances[:18]) >= 0) and np.all(
    distances[18:] == np.inf
  )


def test_low_precision_table_scores_in_float32():
  table = make_table()
  half = ne.EmbeddingTable.from_pretrained(
    table.rows_array().astype(jnp.bfloat16)
  ).with_vocabulary(table.vocabulary)
  ids, scores = half.nearest("w0", k=3)
  assert scores.dtype == jnp.float32
  rows = np.asarray(half.rows_array().astype(jnp.float32), np.float64)
  want, _ = ref_nearest(rows, rows[0], "cosine", 3, excluded=[0])
  np.testing.assert_array_equal(unwrap(ids, "neighbor"), want)
  vector = pz.nx.wrap(jnp.asarray(rows[0], jnp.float32)).tag("embedding")
  ids, _ = half.nearest(vector, k=1)  # float32 query, bfloat16 table
  assert unwrap(ids, "neighbor").tolist() == [0]
  same = half.similarity(vector, "w0")
  assert same.dtype == jnp.float32
  np.testing.assert_allclose(float(same), 1.0, rtol=1e-6)
  ids, _ = half.analogy([vector, "w1"], k=1)
  assert ids.dtype == jnp.int32


def test_jit_compiles_once_for_new_vectors():
  table = make_table()
  traces = []

  @jax.jit
  def search(t, v):
    traces.append(1)
    return inspection.nearest(t, v, k=2)

  for seed in range(3):
    vector = np.random.default_rng(seed).normal(size=6).astype(np.float32)
    search(table, pz.nx.wrap(vector).tag("embedding"))
  assert len(traces) == 1


def test_query_errors():
  table = make_table()
  with pytest.raises(KeyError, match="'nope' is not in the table's vocab"):
    table.nearest("nope")
  with_unk = make_table().with_vocabulary(ne.Vocabulary(WORDS, unk="w0"))
  with pytest.raises(KeyError, match="nope"):
    with_unk.nearest(["w1", "nope"])
  with pytest.raises(ValueError, match="has no vocabulary"):
    make_table(vocabulary=False).nearest("w1")
  with pytest.raises(IndexError, match="Row 20 is outside"):
    table.nearest(20)
  with pytest.raises(IndexError, match=r"Ids must be in \[-20, 20\)"):
    table.nearest(pz.nx.wrap(jnp.array([0, 30])).tag("batch"))
  with pytest.raises(ValueError, match="`k` must be a positive int, got 0"):
    table.nearest("w1", k=0)
  with pytest.raises(TypeError, match="`k` must be a positive int"):
    table.nearest("w1", k=2.0)
  with pytest.raises(ValueError, match="`metric` must be one of"):
    table.nearest("w1", metric="manhattan")
  with pytest.raises(ValueError, match="needs the table's embedding axes"):
    table.nearest(pz.nx.wrap(jnp.ones(5)).tag("embedding"))
  with pytest.raises(ValueError, match="named axes only"):
    table.nearest(pz.nx.wrap(jnp.ones((2, 6))).tag_prefix("embedding"))
  with pytest.raises(ValueError, match=r"\['neighbor'\] cannot be batch"):
    table.nearest(pz.nx.wrap(jnp.ones((2, 6))).tag("neighbor", "embedding"))
  with pytest.raises(ValueError, match="shape of one row"):
    table.nearest(np.ones((2, 6), np.float32))
  with pytest.raises(TypeError, match="A query must be"):
    table.nearest([])


# ------------------------------------------------------- similarity, analogy


@pytest.mark.parametrize("metric", inspection.METRICS)
def test_similarity_matches_numpy(metric, run):
  table = make_table()
  rows = flat_rows(table)
  got = run(lambda t: t.similarity("w2", 9, metric), table)
  assert got.named_shape == {}
  want = ref_scores(rows[9:10], rows[2], metric)[0]
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  pairs = table.similarity(["w1", "w2"], ["w3", "w4"], metric)
  want = [
    ref_scores(rows[[b]], rows[a], metric)[0] for a, b in [(1, 3), (2, 4)]
  ]
  np.testing.assert_allclose(unwrap(pairs, "query"), want, rtol=1e-5)


def test_similarity_broadcasts_batch_axes():
  table = make_table()
  rows = flat_rows(table)
  vectors = pz.nx.wrap(jnp.asarray(rows[:3], jnp.float32)).tag(
    "batch", "embedding"
  )
  got = table.similarity(vectors, ["w5", "w6"])
  assert dict(got.named_shape) == {"batch": 3, "query": 2}
  want = [
    [ref_scores(rows[[q]], rows[b], "cosine")[0] for q in (5, 6)]
    for b in range(3)
  ]
  np.testing.assert_allclose(unwrap(got, "batch", "query"), want, rtol=1e-5)


def ref_analogy(rows, positive, negative, k):
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  mean = (unit[positive].sum(0) - unit[negative].sum(0)) / (
    len(positive) + len(negative)
  )
  return ref_nearest(rows, mean, "cosine", k, excluded=positive + negative)


def test_analogy_matches_gensim_semantics(run):
  table = make_table()
  rows = flat_rows(table)
  ids, scores = run(lambda t: t.analogy(["w1", "w7"], ["w3"], k=4), table)
  want_ids, want_scores = ref_analogy(rows, [1, 7], [3], 4)
  np.testing.assert_array_equal(unwrap(ids, "neighbor"), want_ids)
  np.testing.assert_allclose(unwrap(scores, "neighbor"), want_scores, 1e-5)
  ids, _ = inspection.analogy(table, "w4", k=2)
  np.testing.assert_array_equal(
    unwrap(ids, "neighbor"), ref_analogy(rows, [4], [], 2)[0]
  )


def test_analogy_with_a_vector_and_errors():
  table = make_table()
  rows = flat_rows(table)
  vector = pz.nx.wrap(jnp.asarray(rows[5] * 3.0, jnp.float32)).tag("embedding")
  ids, _ = table.analogy([vector, "w2"], k=3)
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  want, _ = ref_nearest(rows, unit[5] + unit[2], "cosine", 3, excluded=[2])
  np.testing.assert_array_equal(unwrap(ids, "neighbor"), want)
  with pytest.raises(ValueError, match="at least one"):
    table.analogy([])
  with pytest.raises(KeyError, match="'queen'"):
    table.analogy(["queen"])


# ---------------------------------------------------------------- rendering

ADDRESS = re.compile(r"0x[0-9a-f]+")


def test_text_rendering_has_the_summary_and_no_addresses():
  table = make_table(padding_index=0)
  text = treescope.render_to_text(table)
  first = text.splitlines()[0]
  assert first.startswith(
    "EmbeddingTable(  # vocabulary:20 × embedding:6 float32,"
    " padding row 0 'w0', row norms min "
  )
  norms = np.linalg.norm(flat_rows(table), axis=1)
  assert f"max {norms.max():.3g}" in first
  assert "vocabulary=Vocabulary(['w0', 'w1'," in text
  assert not ADDRESS.search(text)
  one_line = repr(table)
  assert one_line.startswith("EmbeddingTable(embeddings=<NamedArray float32(")
  assert "#" not in one_line and "\n" not in one_line


def test_summary_of_unbound_and_traced_tables():
  slot = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=None,
    vocab_size=4,
    embedding_axes={"embedding": 2},
  )
  assert treescope.render_to_text(slot).splitlines()[0] == (
    "EmbeddingTable(  # unbound ParameterSlot 'embed.embeddings',"
    " no padding row"
  )
  seen = []

  @jax.jit
  def render(table):
    seen.append(ne.summarize(table))
    return table.value.data_array

  render(make_table(vocabulary=False))
  assert seen == ["vocabulary:20 × embedding:6 float32, no padding row"]


def test_show_writes_a_page_with_token_labels(tmp_path):
  table = make_table(padding_index=3)
  path = ne.show(table, tmp_path / "table.html", title="Words <1>")
  assert path == str((tmp_path / "table.html").resolve())
  page = (tmp_path / "table.html").read_text(encoding="utf-8")
  assert "<title>Words &lt;1&gt;</title>" in page
  assert "padding row 3 &#x27;w3&#x27;" in page
  for word in ("w0", "w19", "w3 (padding)"):
    assert f'"{word}"' in page
  unlabelled = ne.show(make_table(vocabulary=False), tmp_path / "b.html")
  assert '"id 7"' in pathlib.Path(unlabelled).read_text(encoding="utf-8")
  trainable = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=3,
    embedding_axes={"heads": 2, "head_dim": 2},
  )
  page = ne.show(trainable, tmp_path / "c.html")
  text = pathlib.Path(page).read_text(encoding="utf-8")
  assert '"lookup_table": ["id 0", "id 1", "id 2"]' in text


# ------------------------------------------------- every kind of table


def kinds_of(table):
  """The kinds of table over ``table``, with non-trivial adapters, and
  their float references (dequantised or merged)."""
  lora = table.quantized("int4").with_lora(
    2, 3.0, name="e", init_base_rng=jax.random.key(1)
  )
  a = np.random.default_rng(2).normal(size=(table.num_rows, 2))
  lora.lora_a.value = pz.nx.wrap(a.astype(np.float32)).tag("vocabulary", "rank")
  rows = table.quantized("int8").with_trainable_rows([3, 9, 12], name="r")
  trained = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
  rows.rows.value = pz.nx.wrap(trained).tag("rows", "embedding")
  q8, q4 = table.quantized("int8"), table.quantized("int4", group_size=2)
  return {
    "int8": (q8, q8.dequantized()),
    "int4": (q4, q4.dequantized()),
    "lora": (lora, lora.merged()),
    "rows": (rows, rows.merged()),
  }


KIND_NAMES = ["int8", "int4", "lora", "rows"]


@pytest.fixture(params=[False, True], ids=["one_chunk", "chunks"])
def chunked(request, monkeypatch):
  """Chunks of 8 rows (20 rows: two and a ragged last one), or one."""
  from named_embed._src.tools import row_scan

  if request.param:
    monkeypatch.setattr(row_scan, "CHUNK_BYTES", 8 * 6 * 4)
  return request.param


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("metric", inspection.METRICS)
def test_every_kind_searches_its_rows_as_read(kind, metric, chunked, run):
  table, ref = kinds_of(make_table(padding_index=0).padded_to_multiple(8))[kind]
  frozen = pz.freeze_params(table)
  queries = ["w1", "w4", "w12"]

  def search(t):
    return t.nearest(queries, k=6, metric=metric, exclude=["w2"])

  ids, scores = run(search, frozen)
  want_ids, want_scores = search(ref)
  np.testing.assert_array_equal(
    unwrap(ids, "query", "neighbor"), unwrap(want_ids, "query", "neighbor")
  )
  np.testing.assert_allclose(
    unwrap(scores, "query", "neighbor"),
    unwrap(want_scores, "query", "neighbor"),
    rtol=1e-5,
    atol=1e-6,
  )
  rows = np.asarray(ref.token_rows(), np.float64)
  for q, word in enumerate(queries):  # numpy on the rows as read
    i = WORDS.index(word)
    got, _ = ref_nearest(rows, rows[i], metric, 6, excluded=[0, 2, i])
    np.testing.assert_array_equal(unwrap(ids, "query", "neighbor")[q], got)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_kind_takes_vectors_similarity_and_analogy(kind, chunked):
  table, ref = kinds_of(make_table())[kind]
  vector = pz.nx.wrap(np.linspace(-1, 1, 6, dtype=np.float32)).tag("embedding")
  for got, want in [
    (table.nearest(vector, k=20), ref.nearest(vector, k=20)),
    (
      ne.analogy(table, ["w1", "w5"], ["w3"], 4),
      ref.analogy(["w1", "w5"], ["w3"], 4),
    ),
  ]:
    np.testing.assert_array_equal(
      unwrap(got[0], "neighbor"), unwrap(want[0], "neighbor")
    )
    np.testing.assert_allclose(
      unwrap(got[1], "neighbor"), unwrap(want[1], "neighbor"), rtol=1e-5
    )
  for metric in inspection.METRICS:
    np.testing.assert_allclose(
      float(table.similarity("w1", vector, metric)),
      float(ref.similarity("w1", vector, metric)),
      rtol=1e-6,
    )
  rows = np.asarray(ref.rows_array(), np.float64)
  np.testing.assert_allclose(
    float(ne.similarity(table, 2, 7, "dot")), rows[2] @ rows[7], rtol=1e-5
  )


def test_a_bfloat16_table_is_scored_in_float32():
  import ml_dtypes

  table = make_table()
  half = ne.EmbeddingTable.from_pretrained(
    np.asarray(table.rows_array()).astype(ml_dtypes.bfloat16)
  )
  ids, scores = half.nearest(3, k=4)
  rows = np.asarray(half.rows_array()).astype(np.float64)
  want, _ = ref_nearest(rows, rows[3], "cosine", 4, excluded=[3])
  np.testing.assert_array_equal(unwrap(ids, "neighbor"), want)
  assert scores.dtype == jnp.float32


WRONG = [
  (np.ones((3, 2), np.float32), "got an array"),
  (
    pz.nn.EmbeddingTable(
      embeddings=pz.nx.wrap(np.ones((3, 2), np.float32)).tag(
        "vocabulary", "embedding"
      ),
      vocabulary_axis="vocabulary",
    ),
    "penzai's own pz.nn.EmbeddingTable",
  ),
  ("w1", "got builtins.str"),
]


@pytest.mark.parametrize("wrong, words", WRONG, ids=["array", "penzai", "str"])
def test_a_wrong_table_argument_is_a_type_error_naming_it(
  wrong, words, tmp_path
):
  layer = ne.EmbeddingLookup(make_table())
  calls = {
    "ne.nearest": lambda t: ne.nearest(t, "w1"),
    "ne.similarity": lambda t: ne.similarity(t, "w1", "w2"),
    "ne.analogy": lambda t: ne.analogy(t, ["w1"]),
    "ne.summarize": lambda t: ne.summarize(t),
    "ne.show": lambda t: ne.show(t, tmp_path / "x.html"),
  }
  for name, call in calls.items():
    with pytest.raises(TypeError, match=rf"{name}: `table` must be .*{words}"):
      call(wrong)
    with pytest.raises(
      TypeError, match=r"EmbeddingLookup layer: pass its table"
    ):
      call(layer)


def test_summary_of_every_kind_with_alignment_rows():
  table = make_table(padding_index=0).padded_to_multiple(8)
  line = ne.summarize(table)
  norms = np.linalg.norm(flat_rows(make_table()), axis=1)
  assert line.startswith(
    "vocabulary:24 × embedding:6 float32, padding row 0 'w0', 20 tokens + 4"
    " alignment rows, row norms min "
  )
  assert f"mean {norms.mean():.3g} max {norms.max():.3g}" in line
  assert table.summary(statistics=False) == line.split(", row norms")[0]
  for kind, (adapted, ref) in kinds_of(table).items():
    text = treescope.render_to_text(adapted)
    assert type(adapted).__name__ + "(  # " in text.splitlines()[0]
    low, mean, high = ne.row_norm_statistics(adapted)
    ref_norms = np.linalg.norm(np.asarray(ref.token_rows()), axis=1)
    np.testing.assert_allclose(
      [low, mean, high],
      [ref_norms.min(), ref_norms.mean(), ref_norms.max()],
      rtol=1e-5,
    )


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_show_draws_the_rows_as_read_of_every_kind(kind, tmp_path):
  from named_embed._src.tools import rendering

  table, ref = kinds_of(make_table(padding_index=3).padded_to_multiple(8))[kind]
  page = pathlib.Path(ne.show(table, tmp_path / "t.html")).read_text()
  assert f"<title>{type(table).__name__}</title>" in page
  assert '"w3 (padding)"' in page and "rows as read" in page
  drawn = rendering._rows_as_read(table)
  np.testing.assert_array_equal(
    unwrap(drawn, "vocabulary", "embedding"), np.asarray(ref.rows_array())
  )


# ------------------------------------------- readable results and views


def test_nearest_returns_neighbors_that_unpack_and_name_their_tokens(run):
  from named_embed._src.tools import neighbors

  table = make_table(padding_index=0)
  found = run(lambda t: t.nearest(["w3", "w5"], k=3), table)
  assert isinstance(found, neighbors.Neighbors) and isinstance(found, tuple)
  ids, scores = found  # unpacks exactly as the (ids, scores) it was
  assert found.ids is ids and found.scores is scores and len(found) == 2
  assert found.vocabulary is table.vocabulary and found.metric == "cosine"
  want_ids = unwrap(ids, "query", "neighbor")
  want_scores = unwrap(scores, "query", "neighbor")
  pairs = found.pairs()
  assert [[t for t, _ in row] for row in pairs] == [
    [WORDS[i] for i in row] for row in want_ids
  ]
  np.testing.assert_array_equal([[s for _, s in r] for r in pairs], want_scores)
  lines = [
    f"  {w!r}: [" + ", ".join(f"({WORDS[i]!r}, {s:.4g})" for i, s in zip(r, c))
    for w, r, c in zip(["w3", "w5"], want_ids, want_scores)
  ]
  text = repr(found)
  assert text.startswith("Neighbors({\n") and text.endswith(
    "}, metric='cosine')"
  )
  for line in lines:
    assert line + "]," in text.splitlines()
  single = table.nearest(2, k=2, metric="euclidean")
  i, s = unwrap(single.ids, "neighbor"), unwrap(single.scores, "neighbor")
  assert repr(single) == (
    f"Neighbors([({WORDS[i[0]]!r}, {s[0]:.4g}), ({WORDS[i[1]]!r},"
    f" {s[1]:.4g})], metric='euclidean')"
  )


def test_neighbors_render_as_token_lists_in_treescope_not_heatmaps():
  table = make_table()
  found = table.analogy(["w1", "w7"], ["w3"], k=2)
  ids, scores = (unwrap(a, "neighbor") for a in found)
  text = treescope.render_to_text(found)
  assert text.splitlines() == [
    "Neighbors(  # cosine similarity, best first",
    f"  [({WORDS[ids[0]]!r}, {scores[0]:.4g}), ({WORDS[ids[1]]!r},"
    f" {scores[1]:.4g})],",
    ")",
  ]
  with treescope.active_autovisualizer.set_scoped(
    treescope.ArrayAutovisualizer()
  ):
    page = treescope.render_to_html({"found": found}, compressed=False)
    arrays = treescope.render_to_html(tuple(found), compressed=False)
  assert "arrayviz" not in page and f"&#x27;{WORDS[ids[0]]}&#x27;" in page
  assert "arrayviz" in arrays  # what a plain (ids, scores) tuple draws
  batched = pz.nx.wrap(np.array([[1, 2]])).tag("a", "b")
  lines = treescope.render_to_text(table.nearest(batched, k=1)).splitlines()
  assert lines[1].startswith("  a=0, b=0: [(") and len(lines) == 4


def test_neighbors_of_a_table_without_vocabulary_and_under_jit(monkeypatch):
  from named_embed._src.tools import neighbors

  table = make_table(vocabulary=False)
  found = jax.jit(lambda t: t.nearest(0, k=3, metric="dot"))(table)
  assert isinstance(found, neighbors.Neighbors) and found.metric == "dot"
  ids = unwrap(found.ids, "neighbor").tolist()
  assert [i for i, _ in found.pairs()] == ids
  assert all(type(i) is int for i, _ in found.pairs())
  seen = []

  @jax.jit
  def inside(t):
    result = t.nearest(0, k=3)
    seen.append(repr(result))
    with pytest.raises(ValueError, match="inside jax.jit"):
      result.pairs()
    return result

  inside(table)
  assert seen[0].startswith("Neighbors(ids=<NamedArray int32")
  many = table.nearest(list(range(20)), k=20)
  text = repr(many)
  assert "... (1 more)" not in text and "... (0 more queries)" not in text
  monkeypatch.setattr(neighbors, "MAX_LINES", 3)
  monkeypatch.setattr(neighbors, "MAX_PAIRS", 2)
  text = repr(many).splitlines()
  assert (
    text[1]
    == "  0: ["
    + ", ".join(
      f"({i}, {s:.4g})"
      for i, s in zip(
        unwrap(many.ids, "query", "neighbor")[0, :2],
        unwrap(many.scores, "query", "neighbor")[0, :2],
      )
    )
    + ", ... (18 more)],"
  )
  assert text[-2] == "  ... (17 more queries),"


@pytest.mark.parametrize("kind", ["float", *KIND_NAMES])
def test_the_inline_view_draws_vocabulary_arrays_a_row_a_token(kind):
  from named_embed._src.tools import rendering

  table = make_table(padding_index=0).padded_to_multiple(8)
  table = table if kind == "float" else kinds_of(table)[kind][0]
  labels = rendering.axis_labels(table)
  assert labels[:2] == ["w0 (padding)", "w1"] and len(labels) == 24
  assert labels[20:] == [f"alignment row {i}" for i in range(20, 24)]
  plain = treescope.render_to_html(table, compressed=False)
  with treescope.active_autovisualizer.set_scoped(
    treescope.ArrayAutovisualizer()
  ):
    drawn = treescope.render_to_html(table, compressed=False)
  assert '"w0 (padding)", "w1"' not in plain  # nothing drawn, no labels
  assert drawn.count('"alignment row 23"') >= 1
  assert '"w0 (padding)", "w1", "w2"' in drawn
