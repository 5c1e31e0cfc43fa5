"""Quantised tables: layouts, values and gradients against numpy references,
memory, files, rendering and errors."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from conftest import raw
from penzai import pz

import named_embed as ne

RNG = np.random.default_rng(0)
W = RNG.normal(size=(37, 16)).astype(np.float32)
SCHEMES = [("int8", None), ("int4", None), ("int4", 4), ("int8", 8)]


def np_quantize(w, bits, group):
  """Independent reference: codes ``[V, D]`` (unpacked) and the float rows
  they read back as."""
  q_max = 2 ** (bits - 1) - 1
  v, d = w.shape
  groups = w.reshape(v, -1, group or d)
  scale = np.abs(groups).max(axis=-1) / np.float32(q_max)
  safe = np.where(scale > 0, scale, np.float32(1))
  codes = np.clip(np.round(groups / safe[..., None]), -q_max, q_max)
  rows = (codes.astype(np.float32) * scale[..., None]).reshape(v, d)
  return codes.reshape(v, d).astype(np.int8), rows, scale


def table(w=W, **kwargs):
  return ne.EmbeddingTable.from_pretrained(w, **kwargs)


@pytest.mark.parametrize("scheme, group", SCHEMES)
def test_codes_scales_and_dequantized_rows_match_numpy(scheme, group):
  bits = 8 if scheme == "int8" else 4
  codes, rows, scale = np_quantize(W, bits, group)
  q = table().quantized(scheme, group)
  # XLA may divide by 127 as a multiplication: scales within an ulp.
  got = raw(q.dequantized().value, "vocabulary", "embedding")
  np.testing.assert_allclose(got, rows, rtol=3e-7)
  np.testing.assert_allclose(
    np.asarray(q.scales.data_array).reshape(scale.shape), scale, rtol=3e-7
  )
  stored = np.asarray(q.codes.data_array)
  if bits == 4:  # value j in the low nibble of byte j, j + D/2 in the high
    low, high = stored & 0x0F, stored >> 4
    unpacked = np.concatenate([low, high], axis=1).astype(np.int8)
    unpacked = np.where(unpacked > 7, unpacked - 16, unpacked)
    np.testing.assert_array_equal(unpacked, codes)
  else:
    np.testing.assert_array_equal(stored, codes)


def test_error_bound_and_sizes():
  v, d = W.shape
  q8 = table().quantized("int8")
  error = np.abs(raw(q8.dequantized().value, "vocabulary", "embedding") - W)
  bound = np.abs(W).max(axis=1, keepdims=True) / 254
  assert (error <= bound * (1 + 1e-6)).all()
  assert q8.nbytes == v * d + 4 * v
  q4 = table().quantized("int4", group_size=8)
  grouped = np.abs(W).reshape(v, -1, 8).max(-1, keepdims=True) / 14
  error4 = np.abs(raw(q4.dequantized().value, "vocabulary", "embedding") - W)
  assert (error4.reshape(v, -1, 8) <= grouped * (1 + 1e-6)).all()
  assert q4.nbytes == v * d // 2 + 4 * v * (d // 8)
  assert q4.bits == 4 and q8.frozen and q8.vocab_size == v


@pytest.mark.parametrize(
  "scheme, group, policy",
  [(s, g, p) for (s, g), p in zip(SCHEMES, ["fill", "clip"] * 2)],
)
def test_lookup_matches_numpy(run, scheme, group, policy):
  q = table(padding_index=3).quantized(scheme, group)
  _, rows, _ = np_quantize(W, 8 if scheme == "int8" else 4, group)
  ids = np.array([[0, 3, 36], [40, -1, 5]])
  tokens = pz.nx.wrap(ids).tag("batch", "seq")
  out = run(lambda q, t: ne.lookup(q, t, out_of_range=policy), q, tokens)
  assert out.named_shape == {"batch": 2, "seq": 3, "embedding": 16}
  want = rows[np.clip(ids, 0, 36)]
  if policy == "fill":
    want[(ids < 0) | (ids > 36)] = np.nan
  np.testing.assert_allclose(
    raw(out, "batch", "seq", "embedding"), want, rtol=3e-7
  )


def test_multi_axis_tables_group_along_the_last_axis(run):
  w = RNG.normal(size=(9, 2, 8)).astype(np.float32)
  t = table(w, embedding_axes=("heads", "head_dim"))
  q = t.quantized("int4", group_size=4)
  assert q.scales.named_shape == {"vocabulary": 9, "heads": 2, "head_dim": 2}
  _, rows, _ = np_quantize(w.reshape(9, 16), 4, 4)
  rows = rows.reshape(9, 2, 8)
  out = run(lambda q: ne.lookup(q, np.array([4, 8])), q)
  np.testing.assert_allclose(
    raw(out, "heads", "head_dim"), rows[[4, 8]], rtol=3e-7
  )
  hidden = pz.nx.wrap(RNG.normal(size=(3, 2, 8)).astype(np.float32)).tag(
    "seq", "heads", "head_dim"
  )
  logits = run(lambda q, h: ne.decode(q, h), q, hidden)
  want = np.einsum("shd,vhd->sv", raw(hidden, "seq", "heads", "head_dim"), rows)
  np.testing.assert_allclose(raw(logits, "seq", "vocabulary"), want, rtol=1e-5)
  q8 = t.quantized("int8")  # one scale over every embedding axis of a row
  assert q8.scales.named_shape == {"vocabulary": 9}


def test_bfloat16_tables_read_back_in_bfloat16():
  q = table(W.astype(jnp.bfloat16)).quantized("int8")
  out = ne.lookup(q, np.array([1, 2]))
  assert out.dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16


@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 4)])
def test_decode_and_its_hidden_gradient_match_numpy(run, scheme, group):
  t = table().padded_to_multiple(8)  # alignment rows get -inf
  q = t.quantized(scheme, group)
  rows = raw(q.dequantized().value, "vocabulary", "embedding")
  h = RNG.normal(size=(5, 16)).astype(np.float32)

  def f(q, h):
    hidden = pz.nx.wrap(h).tag("seq", "embedding")
    logits = ne.decode(q, hidden, soft_cap=5.0)
    return logits.untag("seq", "vocabulary").unwrap()

  def ref(h):
    z = 5.0 * jnp.tanh(h @ rows.T / 5.0)
    return jnp.where(jnp.arange(40) < 37, z, -jnp.inf)

  np.testing.assert_allclose(run(f, q, h), ref(h), rtol=1e-5, atol=1e-6)

  def total(f):
    return lambda h: jnp.sum(jnp.sin(f(h)[:, :37]))

  grad = run(jax.grad(total(lambda h: f(q, h))), h)
  np.testing.assert_allclose(
    grad, jax.grad(total(ref))(h), rtol=1e-4, atol=1e-5
  )


@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 8)])
def test_fused_loss_and_gradient_match_the_dequantized_table(
  run, scheme, group
):
  q = table().quantized(scheme, group)
  rows = raw(q.dequantized().value, "vocabulary", "embedding")
  h = RNG.normal(size=(6, 16)).astype(np.float32)
  targets = np.array([0, 5, 36, 7, 7, 20])
  options = dict(label_smoothing=0.1, z_loss=1e-3, soft_cap=4.0)

  def ours(h):
    hidden = pz.nx.wrap(h).tag("seq", "embedding")
    tokens = pz.nx.wrap(targets).tag("seq")
    return ne.decode_cross_entropy(q, hidden, tokens, chunk_size=5, **options)

  def textbook(h):
    z = 4.0 * jnp.tanh(h @ rows.T / 4.0)
    lse = jax.nn.logsumexp(z, axis=1)
    logp = z - lse[:, None]
    nll = -(0.9 * logp[np.arange(6), targets] + 0.1 * logp.mean(axis=1))
    return jnp.mean(nll + 1e-3 * lse**2)

  np.testing.assert_allclose(run(ours, h), textbook(h), rtol=1e-5)
  np.testing.assert_allclose(
    run(jax.grad(ours), h), jax.grad(textbook)(h), rtol=1e-4, atol=1e-6
  )


def test_compiled_memory_never_holds_a_float_table():
  v, d, n = 131072, 1024, 1024
  float_table = v * d * 4
  for scheme, group in [("int8", None), ("int4", 64)]:
    t = ne.EmbeddingTable.from_pretrained(jnp.zeros((8, d), jnp.float32))
    q = t.quantized(scheme, group)
    codes = jax.ShapeDtypeStruct(
      (v, *q.codes.data_array.shape[1:]), q.codes.dtype
    )
    scales = jax.ShapeDtypeStruct(
      (v, *q.scales.data_array.shape[1:]), jnp.float32
    )
    names_c, names_s = tuple(q.codes.named_axes), tuple(q.scales.named_axes)

    def rebuild(c, s, q=q, names_c=names_c, names_s=names_s):
      return ne.QuantizedTable(
        codes=pz.nx.wrap(c, *names_c),
        scales=pz.nx.wrap(s, *names_s),
        scheme=q.scheme,
        group_size=q.group_size,
        embedding_shape=q.embedding_shape,
      )

    ids = jax.ShapeDtypeStruct((16, 512), jnp.int32)
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)

    def lookup(c, s, i, rebuild=rebuild):
      return ne.lookup(rebuild(c, s), i).data_array

    def fused(c, s, h, y, rebuild=rebuild):
      hid = pz.nx.wrap(h).tag("t", "embedding")
      loss = lambda hid: ne.decode_cross_entropy(
        rebuild(c, s), hid, pz.nx.wrap(y).tag("t")
      )
      return jax.value_and_grad(loss)(hid)

    def textbook(c, s, h, y, rebuild=rebuild):
      rows = rebuild(c, s).dequantized().rows_array()

      def loss(h):
        z = h @ rows.T
        return jnp.mean(
          jax.nn.logsumexp(z, 1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0]
        )

      return jax.value_and_grad(loss)(h)

    def temp(f, *args):
      compiled = jax.jit(f).lower(*args).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    # Temporaries scale with the gathered rows (32 MiB as float32), never
    # with the table (512 MiB as float32).
    assert temp(lookup, codes, scales, ids) < float_table / 16
    fused_temp = temp(fused, codes, scales, hidden, targets)
    assert fused_temp * 16 <= temp(textbook, codes, scales, hidden, targets)
    assert fused_temp < float_table / 4


def test_tied_model_and_parameters():
  q = table().quantized("int8")
  model = pz.nn.Sequential([ne.EmbeddingLookup(q), ne.EmbeddingDecode(q)])
  out = model(pz.nx.wrap(np.array([1, 2])).tag("seq"))
  assert out.named_shape == {"seq": 2, "vocabulary": 37}
  assert not pz.unbind_params(model)[1]  # frozen: nothing to train


def test_save_and_load_are_bit_exact(tmp_path):
  vocab = ne.Vocabulary([f"t{i}" for i in range(37)], pad="t0")
  base = table().with_vocabulary(vocab).padded_to_multiple(8)
  for scheme, group in SCHEMES:
    q = base.quantized(scheme, group)
    path = os.path.join(tmp_path, f"{scheme}{group}.safetensors")
    ne.save(q, path)
    back = ne.load(path)
    assert isinstance(back, ne.QuantizedTable)
    for a, b in [(q.codes, back.codes), (q.scales, back.scales)]:
      assert a.named_shape == b.named_shape and a.dtype == b.dtype
      np.testing.assert_array_equal(
        np.asarray(a.data_array), np.asarray(b.data_array)
      )
    assert (back.scheme, back.group_size, back.vocabulary) == (
      scheme,
      group,
      vocab,
    )
    assert (back.padding_index, back.true_vocab_size) == (0, 37)


def test_summary_and_show(tmp_path):
  q = table(padding_index=0).quantized("int4", group_size=8)
  text = treescope.render_to_text(q).splitlines()[0]
  assert text == (
    "QuantizedTable(  # vocabulary:37 × embedding:16 int4 (a float32 scale"
    " per 8 values) read as float32, 592 bytes (16 a row), padding row 0"
  )
  page = ne.show(q, tmp_path / "q.html")
  assert "rows as read" in pathlib.Path(page).read_text()


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (dict(scheme="int2"), ValueError, "`scheme`"),
    (dict(scheme=8), TypeError, "`scheme`"),
    (dict(scheme="int8", group_size=5), ValueError, "`group_size` 5"),
    (dict(scheme="int8", group_size=0), ValueError, "`group_size`"),
    (dict(scheme="int8", group_size=2.0), TypeError, "`group_size`"),
    (dict(scheme="int8", group_size=True), TypeError, "`group_size`"),
  ],
)
def test_bad_arguments(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    table().quantized(**kwargs)


def test_tables_that_cannot_be_quantized():
  with pytest.raises(ValueError, match="odd"):
    table(W[:, :15]).quantized("int4")
  bad = W.copy()
  bad[4, 2] = np.nan
  with pytest.raises(ValueError, match="rows 4"):
    table(bad).quantized("int8")
  q = table().quantized("int8")
  with pytest.raises(TypeError, match="already quantised"):
    q.quantized("int4")
  from named_embed._src.tables import quantized

  with pytest.raises(TypeError, match="`table`"):
    quantized.quantize(q, "int4")
  bad[4, 2], bad[6, 0] = 1.0, -np.inf
  with pytest.raises(ValueError, match="rows 6"):
    table(bad).quantized("int8")
  key = jax.random.key(0)
  for adapted in [
    table().with_lora(2, name="e", init_base_rng=key),
    table().with_trainable_rows([1], name="r"),
  ]:
    with pytest.raises(TypeError, match=r"table.merged\(\).quantized"):
      quantized.quantize(adapted)
  with pytest.raises(TypeError, match="got ndarray"):
    quantized.quantize(W)
  unbound, _ = pz.unbind_params(table(freeze=False, name="t"))
  with pytest.raises(ValueError, match="unbound"):
    unbound.quantized()
  ids = np.array([1, 0, 3])
  np.testing.assert_array_equal(  # one-hot reads the codes chunk by chunk
    raw(ne.lookup(q, ids, strategy="one_hot"), "embedding"),
    raw(ne.lookup(q, ids), "embedding"),
  )


def test_masks_reductions_and_the_error_policy_work_as_for_a_float_table():
  q = table().quantized("int8")
  dense = q.dequantized()
  hidden = pz.nx.wrap(RNG.normal(size=(2, 3, 16)).astype(np.float32)).tag(
    "batch", "seq", "embedding"
  )
  targets = pz.nx.wrap(np.array([[1, 2, 40], [3, 4, 5]])).tag("batch", "seq")
  where = pz.nx.wrap(np.array([[True, True, False], [True, False, True]]))
  where = where.tag("batch", "seq")
  options = dict(where=where, reduction="none", chunk_size=8)
  got = ne.decode_cross_entropy(q, hidden, targets, **options)
  want = ne.decode_cross_entropy(dense, hidden, targets, **options)
  np.testing.assert_allclose(
    raw(got, "batch", "seq"), raw(want, "batch", "seq"), rtol=1e-6
  )
  with pytest.raises(IndexError, match="id 40"):
    ne.lookup(q, np.array([1, 40]), out_of_range="error")
  lookup = jax.jit(
    lambda q, i: ne.lookup(q, i, out_of_range="error").data_array
  )
  np.testing.assert_array_equal(
    lookup(q, np.array([1, 2])),
    raw(dense.value, "vocabulary", "embedding")[1:3],
  )


# ----------------------------------------------- inspection and resizing


@pytest.mark.parametrize("scheme, group", SCHEMES)
def test_inspection_reads_the_dequantised_rows(scheme, group):
  q = table().quantized(scheme, group)
  dense = q.dequantized()
  rows = raw(dense.value, "vocabulary", "embedding").astype(np.float64)
  for metric in ("cosine", "dot", "euclidean"):
    got, got_scores = q.nearest([2, 30], k=5, metric=metric, exclude=[7])
    want, want_scores = dense.nearest([2, 30], k=5, metric=metric, exclude=[7])
    np.testing.assert_array_equal(
      raw(got, "query", "neighbor"), raw(want, "query", "neighbor")
    )
    np.testing.assert_allclose(
      raw(got_scores, "query", "neighbor"),
      raw(want_scores, "query", "neighbor"),
      rtol=1e-5,
    )
  distance = np.linalg.norm(rows[3] - rows[9])
  assert float(q.similarity(3, 9, "euclidean")) == pytest.approx(
    distance, rel=1e-5
  )
  got, _ = q.analogy([1, 2], [3], k=3)
  want, _ = dense.analogy([1, 2], [3], k=3)
  np.testing.assert_array_equal(raw(got, "neighbor"), raw(want, "neighbor"))


def test_a_quantised_table_adapts_but_does_not_quantise_again():
  q = table().quantized("int8")
  assert isinstance(
    q.with_lora(2, name="e", init_base_rng=jax.random.key(0)), ne.LoraTable
  )
  assert isinstance(q.with_trainable_rows([1], name="r"), ne.TrainableRowsTable)
  with pytest.raises(TypeError, match=r"dequantized\(\).quantized\('int4'\)"):
    q.quantized("int4")
