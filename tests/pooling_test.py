"""Tests for `named_embed._src.ops.pooled.lookup`: torch's ``F.embedding_bag`` by name.

References: hand-computed arrays (torch's semantics, from its documentation
and ``aten/src/ATen/native/EmbeddingBag.cpp``, with the bugs the issue
names fixed) and a loop-per-bag numpy implementation (`np_bag`) that the
hypothesis tests compare against: values, the table's gradient and the
weights' gradient, eagerly and under `jax.jit`.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raw
from penzai import pz

import named_embed as ne

W = np.array([[9.0, 9.0], [1.0, 2.0], [3.0, -4.0], [0.5, 8.0]], np.float32)
"""Row 0 is the pad token in most tests: non-zero, so skipping it shows."""


def trainable(rows=W, **kwargs):
  return pz.freeze_params(
    ne.EmbeddingTable.from_pretrained(rows, freeze=False, **kwargs)
  )


def named(ids, *axes):
  return pz.nx.wrap(np.asarray(ids)).tag(*axes)


# ------------------------------------------------------------ numpy reference


def np_bags(num_ids, offsets, include_last_offset):
  """``(start, stop)`` of each bag, from checked offsets."""
  offsets = list(offsets)
  ends = offsets[1:] if include_last_offset else [*offsets[1:], num_ids]
  starts = offsets[:-1] if include_last_offset else offsets
  return list(zip(starts, ends))


def np_bag(
  w,
  ids,
  offsets,
  cot,
  mode="mean",
  weights=None,
  padding_index=None,
  include_last_offset=False,
  max_norm=None,
  norm_type=2.0,
  scale_grad_by_freq=False,
  out_of_range="fill",
  vocab_size=None,
):
  """Pooled rows, d table and d weights of ``sum(pooled * cot)``, one bag
  and one member at a time (NaN bags contribute no gradient)."""
  vocab = vocab_size or w.shape[0]
  flat_w = w.reshape(w.shape[0], -1).astype(np.float64)
  bags = np_bags(len(ids), offsets, include_last_offset)
  out = np.zeros((len(bags), flat_w.shape[1]))
  d_w = np.zeros_like(flat_w)
  d_weights = np.zeros(len(ids))
  cot = cot.reshape(len(bags), flat_w.shape[1])
  members = [j for a, b in bags for j in range(a, b)]

  def row_id(i):
    if out_of_range == "clip":
      return min(max(i, 0), vocab - 1)
    if out_of_range == "wrap":
      return i % vocab
    return i if 0 <= i < vocab else None

  counts = {}
  for j in members:
    if row_id(ids[j]) is not None:
      counts[row_id(ids[j])] = counts.get(row_id(ids[j]), 0) + 1

  def row(r):
    x = flat_w[r]
    if max_norm is not None:
      norm = np.sum(np.abs(x) ** norm_type) ** (1 / norm_type)
      if norm > max_norm:
        x = x * (max_norm / (norm + 1e-7))
    return x

  for k, (a, b) in enumerate(bags):
    rows = [row_id(ids[j]) for j in range(a, b)]
    if any(r is None for r in rows):
      out[k] = np.nan
      continue
    kept = [(j, r) for j, r in zip(range(a, b), rows) if r != padding_index]
    if not kept:
      continue
    if mode == "max":
      values = np.stack([row(r) for _, r in kept])
      out[k] = values.max(axis=0)
      for f in range(values.shape[1]):
        first = int(np.argmax(values[:, f] == out[k, f]))
        d_w[kept[first][1], f] += cot[k, f]
      continue
    coef = 1 / len(kept) if mode == "mean" else 1.0
    for j, r in kept:
      factor = coef * (1.0 if weights is None else weights[j])
      out[k] += factor * row(r)
      scale = 1 / counts[r] if scale_grad_by_freq else 1.0
      d_w[r] += factor * scale * cot[k]
      d_weights[j] = coef * np.dot(cot[k], row(r))
  return out, d_w, d_weights


def pooled_and_grads(run, table, ids, cot, weights=None, offsets=None, **kw):
  """``pooled_lookup`` values and the gradients of ``sum(pooled * cot)``
  (NaN bags masked) w.r.t. the table and the weights, via ``run`` (under
  `jax.jit` the ids and offsets are traced too)."""

  def grads(table, weights, ids, offsets):
    def loss(table, weights):
      out = ne.pooled_lookup(table, ids, offsets=offsets, weights=weights, **kw)
      order = [n for n in out.named_shape if n not in table.embedding_axes]
      x = out.order_as(*order, *table.embedding_axes).data_array
      x = x.reshape(cot.shape)
      safe = jnp.where(jnp.isnan(x), jnp.zeros((), x.dtype), x)
      return jnp.sum(safe * cot), x

    argnums = (0, 1) if weights is not None else 0
    return jax.grad(loss, argnums, has_aux=True)(table, weights)

  grads, out = run(grads, table, weights, ids, offsets)
  out = np.asarray(out)
  if weights is None:
    return out, np.asarray(grads.rows_array()), None
  d_weights = grads[1]
  if isinstance(d_weights, pz.nx.NamedArrayBase):  # in the weights' layout
    d_weights = d_weights.order_as(*weights.named_shape).data_array
  return out, np.asarray(grads[0].rows_array()), np.asarray(d_weights)


# ------------------------------------------------------------ hand-computed


def test_fixed_size_bags_in_every_mode_skip_the_padding_row(run):
  table = trainable(padding_index=0)
  ids = named([[1, 2, 0], [0, 0, 0], [3, 3, 2]], "batch", "member")
  cot = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
  out, grad, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="sum"
  )
  np.testing.assert_array_equal(out, [[4, -2], [0, 0], [4, 12]])
  np.testing.assert_array_equal(grad, [[0, 0], [1, 2], [6, 8], [10, 12]])
  out, grad, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="mean"
  )
  np.testing.assert_allclose(out, [[2, -1], [0, 0], [4 / 3, 4]], rtol=1e-6)
  np.testing.assert_allclose(
    grad, [[0, 0], [0.5, 1], [0.5 + 5 / 3, 1 + 2], [10 / 3, 4]], rtol=1e-6
  )
  out, grad, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="max"
  )
  # The pad row [9, 9] would win every max: it is no candidate.
  np.testing.assert_array_equal(out, [[3, 2], [0, 0], [3, 8]])
  np.testing.assert_array_equal(grad, [[0, 0], [0, 2], [6, 0], [0, 6]])


def test_empty_bags_are_zeros_in_every_mode_never_nan_or_inf(run):
  table = trainable(padding_index=0)
  ids, offsets = np.array([1, 2, 0, 0]), np.array([0, 2, 2, 2, 4])
  cot = np.ones((5, 2), np.float32)
  for mode in ("sum", "mean", "max"):
    out, grad, _ = pooled_and_grads(
      run, table, ids, cot, offsets=offsets, mode=mode
    )
    assert np.isfinite(out).all(), mode
    np.testing.assert_array_equal(out[1:], 0.0)  # empty, empty, empty, pads
    assert np.isfinite(grad).all() and not grad[0].any(), mode


def test_weights_scale_rows_and_get_the_dot_product_gradient(run):
  table = trainable(padding_index=0)
  ids = named([[1, 2, 0], [3, 1, 1]], "batch", "member")
  weights = np.array([[2.0, -1.0, 5.0], [0.5, 1.0, 3.0]], np.float32)
  weights = named(weights, "batch", "member")
  cot = np.array([[1.0, 1.0], [2.0, -1.0]], np.float32)
  out, grad, d_weights = pooled_and_grads(
    run, table, ids, cot, weights, over="member", mode="sum"
  )
  np.testing.assert_array_equal(out, [[-1, 8], [4.25, 12]])
  np.testing.assert_array_equal(grad, [[0, 0], [10, -2], [-1, -1], [1, -0.5]])
  # <cot, row> per member; the pad member's weight gets no gradient.
  np.testing.assert_array_equal(d_weights, [[3, -1, 0], [-7, 0, 0]])


def test_max_gradient_goes_to_the_first_member_of_a_tie(run):
  rows = np.array([[0, 0], [5, 1], [5, 7], [2, 7]], np.float32)
  table = trainable(rows)
  ids = named([[2, 1, 3, 2]], "batch", "member")
  cot = np.array([[10.0, 20.0]], np.float32)
  out, grad, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="max"
  )
  np.testing.assert_array_equal(out, [[5, 7]])
  np.testing.assert_array_equal(grad, [[0, 0], [0, 0], [10, 20], [0, 0]])


def test_include_last_offset_ends_the_last_bag_and_ignores_the_rest(run):
  table = trainable()
  ids, offsets = np.array([1, 2, 3, 3, 1]), np.array([0, 2, 3])
  cot = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)
  out, grad, _ = pooled_and_grads(
    run,
    table,
    ids,
    cot,
    offsets=offsets,
    include_last_offset=True,
    mode="sum",
  )
  np.testing.assert_array_equal(out, [[4, -2], [0.5, 8]])
  np.testing.assert_array_equal(grad, [[0, 0], [1, 1], [1, 1], [1, 1]])
  # Ids after the last offset belong to no bag: never checked.
  bad_tail = np.array([1, 2, 3, 99, -1])
  out = ne.pooled_lookup(
    table, bad_tail, offsets=offsets, include_last_offset=True,
    out_of_range="error", mode="sum",
  )  # fmt: skip
  np.testing.assert_array_equal(
    raw(out, "bag", "embedding"), [[4, -2], [0.5, 8]]
  )


def test_include_last_offset_with_one_offset_gives_no_bags():
  out = ne.pooled_lookup(
    trainable(), np.array([1, 2]), offsets=[0], include_last_offset=True
  )
  assert out.named_shape == {"bag": 0, "embedding": 2}


def test_no_members_no_bags_and_no_ids_give_zeros_of_the_right_shape():
  table = ne.EmbeddingTable.from_pretrained(W)
  no_members = named(np.zeros((3, 0), np.int32), "batch", "member")
  out = ne.pooled_lookup(table, no_members, over="member", mode="max")
  np.testing.assert_array_equal(
    raw(out, "batch", "embedding"), np.zeros((3, 2))
  )
  no_bags = named(np.zeros((0, 4), np.int32), "batch", "member")
  out = ne.pooled_lookup(table, no_bags, over="member")
  assert out.named_shape == {"batch": 0, "embedding": 2}
  out = ne.pooled_lookup(table, np.zeros(0, np.int32), offsets=[0, 0])
  np.testing.assert_array_equal(raw(out, "bag", "embedding"), np.zeros((2, 2)))


def test_scale_grad_by_freq_counts_over_the_whole_id_array(run):
  # pytorch#190063: torch 2.13's CPU kernel gives row 3 a gradient of 0.5.
  table = trainable(np.ones((4, 3), np.float32))
  cot = np.ones((1, 3), np.float32)
  _, grad, _ = pooled_and_grads(
    run,
    table,
    np.array([1, 1, 3]),
    cot,
    offsets=np.array([0]),
    mode="sum",
    scale_grad_by_freq=True,
  )
  np.testing.assert_array_equal(grad[:, 0], [0, 1, 0, 1])
  ids = named([[1, 2], [2, 2]], "batch", "member")  # counts across bags
  cot = np.array([[1.0, 1.0], [3.0, 3.0]], np.float32)
  _, grad, _ = pooled_and_grads(
    run, trainable(), ids, cot, over="member", mode="mean",
    scale_grad_by_freq=True,
  )  # fmt: skip
  np.testing.assert_allclose(grad, [[0, 0], [0.5, 0.5], [7 / 6, 7 / 6], [0, 0]])


def test_max_norm_scales_member_rows_and_gradient_is_as_without(run):
  rows = np.array([[3.0, 4.0], [0.3, 0.4]], np.float32)
  table = trainable(rows)
  ids = named([[0, 1, 0]], "batch", "member")
  cot = np.array([[1.0, 2.0]], np.float32)
  out, grad, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="sum", max_norm=1.0
  )
  scaled = np.array([3.0, 4.0]) / (5 + 1e-7)
  np.testing.assert_allclose(out, [2 * scaled + [0.3, 0.4]], rtol=1e-6)
  np.testing.assert_array_equal(grad, [[2, 4], [1, 2]])
  np.testing.assert_array_equal(table.rows_array(), rows)  # not mutated


def test_out_of_range_under_fill_makes_the_bag_nan_and_sends_no_gradient(run):
  table = trainable(padding_index=0)
  ids = named([[1, 7, 0], [2, 3, 3], [-1, 0, 0]], "batch", "member")
  cot = np.ones((3, 2), np.float32)
  for mode in ("sum", "mean", "max"):
    out, grad, _ = pooled_and_grads(
      run, table, ids, cot, over="member", mode=mode
    )
    assert np.isnan(out[[0, 2]]).all() and np.isfinite(out[1]).all(), mode
    assert not grad[1].any(), mode  # row 1 is only in a NaN bag
    assert grad[2].any() and grad[3].any(), mode


def test_clip_and_wrap_read_the_mapped_row_and_skip_it_if_padding(run):
  table = trainable(padding_index=-1)  # row 3
  ids = named([[5, 1], [-1, 2]], "batch", "member")
  cot = np.ones((2, 2), np.float32)
  out, _, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="sum", out_of_range="clip"
  )
  np.testing.assert_array_equal(out, [[1, 2], [12, 5]])  # 5 -> 3 (padding)
  out, _, _ = pooled_and_grads(
    run, table, ids, cot, over="member", mode="sum", out_of_range="wrap"
  )
  np.testing.assert_array_equal(out, [[2, 4], [3, -4]])  # -1 -> 3 (padding)


def test_error_policy_names_ids_eagerly_and_fails_at_run_time_under_jit():
  table = trainable()
  ids = named([[1, 7], [2, 3]], "batch", "member")
  with pytest.raises(IndexError, match=r"id 7 at position \(0, 1\)"):
    ne.pooled_lookup(table, ids, over="member", out_of_range="error")
  with pytest.raises(IndexError, match=r"id 9 at position \(2,\)"):
    ne.pooled_lookup(
      table, np.array([1, 2, 9]), offsets=[0, 1], out_of_range="error"
    )
  f = jax.jit(
    lambda t, i, o: ne.pooled_lookup(t, i, offsets=o, out_of_range="error")
  )
  good = f(table, jnp.array([1, 2, 3]), jnp.array([0, 2]))
  assert good.named_shape == {"bag": 2, "embedding": 2}
  with pytest.raises(Exception, match=r"id 9 at position \(2,\)"):
    jax.block_until_ready(f(table, jnp.array([1, 2, 9]), jnp.array([0, 1])))


def test_traced_offsets_are_clamped_and_made_non_decreasing():
  table = trainable()
  f = jax.jit(
    lambda i, o: ne.pooled_lookup(table, i, offsets=o, mode="sum").data_array
  )
  ids = jnp.array([1, 2, 3, 1, 2])
  # [0, 3, 1, 9] acts as [0, 3, 3, 5]: bags [0:3], [3:3], [3:5], [5:5].
  out = np.asarray(f(ids, jnp.array([0, 3, 1, 9])))
  np.testing.assert_array_equal(out, [[4.5, 6], [0, 0], [4, -2], [0, 0]])
  # A first offset above 0: the ids before it are in no bag.
  np.testing.assert_array_equal(f(ids, jnp.array([2, 4])), [[1.5, 10], [3, -4]])


def test_multi_axis_tables_pool_over_all_embedding_axes():
  rows = np.arange(24.0, dtype=np.float32).reshape(4, 2, 3)
  table = ne.EmbeddingTable.from_pretrained(rows, embedding_axes=("h", "d"))
  ids = named([[1, 3], [2, 2]], "batch", "member")
  out = ne.pooled_lookup(table, ids, over="member", mode="max", max_norm=30.0)
  assert out.named_shape == {"batch": 2, "h": 2, "d": 3}
  norms = np.linalg.norm(rows.reshape(4, -1), axis=1)
  scaled = rows * np.minimum(1, 30 / (norms + 1e-7))[:, None, None]
  np.testing.assert_allclose(
    raw(out, "batch", "h", "d"),
    [np.maximum(scaled[1], scaled[3]), scaled[2]],
    rtol=1e-6,
  )


def test_positional_and_other_named_axes_are_kept_in_order():
  ids = pz.nx.wrap(np.arange(24).reshape(2, 4, 3) % 4)
  ids = ids.tag_prefix("member").tag("seq", "b")  # member, seq, b named
  out = ne.pooled_lookup(ne.EmbeddingTable.from_pretrained(W), ids, over="seq")
  assert out.named_shape == {"member": 2, "b": 3, "embedding": 2}
  data = np.arange(24).reshape(2, 4, 3) % 4
  np.testing.assert_allclose(
    raw(out, "member", "b", "embedding"), W[data].mean(axis=1), rtol=1e-6
  )
  positional = pz.nx.wrap(data).tag_prefix("m")  # two positional axes
  out = ne.pooled_lookup(
    ne.EmbeddingTable.from_pretrained(W), positional, over="m"
  )
  assert out.positional_shape == (4, 3) and out.named_shape == {"embedding": 2}
  np.testing.assert_allclose(out.data_array, W[data].mean(axis=0), rtol=1e-6)


def test_weights_align_by_name_or_by_the_tokens_data_layout():
  table = ne.EmbeddingTable.from_pretrained(W)
  data = np.array([[1, 2, 3], [3, 2, 1]])
  ids = named(data, "batch", "member")
  w = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]], np.float32)
  expected = (W[data] * w[..., None]).sum(axis=1)
  for weights in (w, named(w.T, "member", "batch")):
    out = ne.pooled_lookup(
      table, ids, over="member", mode="sum", weights=weights
    )
    np.testing.assert_allclose(raw(out, "batch", "embedding"), expected)


def test_bfloat16_tables_accumulate_in_float32():
  table = ne.EmbeddingTable.from_pretrained(jnp.ones((3, 2), jnp.bfloat16))
  ids = named(np.ones((1, 300), np.int32), "batch", "member")
  out = ne.pooled_lookup(table, ids, over="member", mode="sum", chunk_size=16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(raw(out, "batch", "embedding"), [[300, 300]])
  # A bfloat16 running sum over the chunks would stop at 256:
  assert float(jnp.bfloat16(256) + jnp.bfloat16(1)) == 256


def test_padded_table_alignment_rows_are_out_of_range():
  table = ne.EmbeddingTable.from_pretrained(W[:3]).padded_to_multiple(4)
  ids = named([[1, 3], [2, 2]], "batch", "member")
  out = raw(ne.pooled_lookup(table, ids, over="member"), "batch", "embedding")
  assert np.isnan(out[0]).all()
  np.testing.assert_array_equal(out[1], W[2])
  clipped = ne.pooled_lookup(table, ids, over="member", out_of_range="clip")
  np.testing.assert_array_equal(raw(clipped, "batch", "embedding")[0], [2, -1])


def test_chunk_sizes_agree():
  run = lambda f, *args: jax.jit(f)(*args)  # noqa: E731
  rng = np.random.default_rng(3)
  w = rng.normal(size=(11, 3)).astype(np.float32)
  ids = named(rng.integers(0, 11, size=(3, 13)), "batch", "member")
  cot = rng.normal(size=(3, 3)).astype(np.float32)
  for mode in ("mean", "max"):
    results = [
      pooled_and_grads(
        run, trainable(w), ids, cot, over="member", mode=mode, chunk_size=c
      )[:2]
      for c in (1, 5, 64)
    ]
    for out, grad in results[1:]:
      np.testing.assert_allclose(out, results[0][0], rtol=1e-6)
      np.testing.assert_allclose(grad, results[0][1], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ tables


def test_tied_bag_and_decode_share_one_parameter_and_sum_gradients():
  table = ne.EmbeddingTable.from_pretrained(W, freeze=False)
  bag = ne.EmbeddingBag(table, over="member", mode="sum")
  decode = ne.EmbeddingDecode(table)
  model = pz.nn.Sequential([bag, decode])
  unbound, params = pz.unbind_params(model)
  assert len(params) == 1
  ids = named([[1, 2], [3, 3]], "batch", "member")

  def loss(value):
    out = pz.bind_variables(unbound, [value])(ids)
    return jnp.sum(out.untag("batch", "vocabulary").unwrap())

  grad = jax.grad(loss)(params[0].freeze()).value
  grad = np.asarray(grad.untag("vocabulary", "embedding").unwrap())
  pooled = np.stack([W[1] + W[2], 2 * W[3]])
  expected = np.zeros_like(W)  # decode: d logits[b, v] / d W[v] = pooled[b]
  expected += pooled.sum(axis=0)
  counts = np.array([0, 1, 1, 2])[:, None]  # bag: each member gets sum(W)
  expected += counts * W.sum(axis=0)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_frozen_table_has_no_parameter_and_weights_still_train():
  frozen = ne.EmbeddingTable.from_pretrained(W)
  assert pz.unbind_params(ne.EmbeddingBag(frozen, over="m"))[1] == ()
  ids = named([[1, 2]], "b", "m")
  weights = jnp.array([[1.0, 2.0]])

  def loss(table, weights):
    out = ne.pooled_lookup(table, ids, over="m", mode="sum", weights=weights)
    return jnp.sum(out.data_array)

  d_table, d_weights = jax.grad(loss, (0, 1))(frozen, weights)
  np.testing.assert_array_equal(d_table.rows_array(), 0.0)
  np.testing.assert_array_equal(d_weights, [[3, -1]])


# ------------------------------------------------------------ layer


def test_layer_equals_function_reads_weights_from_a_side_input():
  table = ne.EmbeddingTable.from_pretrained(W, padding_index=0)
  ids = named([[1, 2, 0], [3, 0, 0]], "batch", "member")
  weights = named(np.full((2, 3), 2.0, np.float32), "batch", "member")
  layer = ne.EmbeddingBag(
    table, over="member", mode="sum", weights_input_name="member_weights"
  )
  out = pz.nn.Sequential([layer])(ids, member_weights=weights, mask=None)
  expected = ne.pooled_lookup(
    table, ids, over="member", mode="sum", weights=weights
  )
  np.testing.assert_array_equal(
    raw(out, "batch", "embedding"), raw(expected, "batch", "embedding")
  )
  with pytest.raises(TypeError, match=r"side input 'member_weights'"):
    layer(ids)
  plain = ne.EmbeddingBag(table, over="member", mode="max")
  np.testing.assert_array_equal(
    raw(plain(ids, anything=1), "batch", "embedding"), [[3, 2], [0.5, 8]]
  )


def test_layer_under_variable_jit():
  table = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=6,
    embedding_axes={"embedding": 3},
  )
  layer = ne.EmbeddingBag(table, over="member")
  ids = named([[1, 5, 2]], "b", "member")
  np.testing.assert_allclose(
    raw(pz.variable_jit(lambda m, x: m(x))(layer, ids), "b", "embedding"),
    raw(layer(ids), "b", "embedding"),
    rtol=1e-6,
  )


# ------------------------------------------------------------ memory


def test_compiled_temporary_memory_is_a_fraction_of_take_then_reduce():
  rows = jnp.zeros((4096, 256), jnp.float32)
  ids = jnp.zeros((32, 256), jnp.int32)
  cot = jnp.ones((32, 256), jnp.float32)
  table = trainable(rows)

  def ours(table, ids):
    tokens = pz.nx.wrap(ids).tag("b", "m")
    out = ne.pooled_lookup(table, tokens, over="m", mode="mean", chunk_size=16)
    return out.untag("b", "embedding").unwrap()

  def naive(table, ids):
    return jnp.take(table.rows_array(), ids, axis=0).mean(axis=1)

  def temp(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  def grad(f):
    return jax.grad(lambda t, i: jnp.sum(f(t, i) * cot))

  assert temp(ours, table, ids) * 8 <= temp(naive, table, ids)
  assert temp(grad(ours), table, ids) * 8 <= temp(grad(naive), table, ids)


# ------------------------------------------------------------ errors


def bad_calls():
  ids = named([[1, 2]], "batch", "member")
  flat = np.array([1, 2, 3])
  return [
    (dict(tokens=ids, over="member", mode="median"), ValueError, r"`mode`"),
    (
      dict(tokens=ids, over="member", mode="max", weights=np.ones((1, 2))),
      ValueError,
      r"`weights` .* only supported with mode='sum'.*got mode='max'",
    ),
    (
      dict(tokens=ids, over="member", mode="max", scale_grad_by_freq=True),
      ValueError,
      r"`scale_grad_by_freq` is not supported with mode='max'",
    ),
    (dict(tokens=ids, over="seq"), ValueError, r"`over`='seq' is not an axis"),
    (dict(tokens=ids, over=1), TypeError, r"`over` must be an axis name"),
    (
      dict(tokens=named([[1, 2]], "batch", "embedding"), over="embedding"),
      ValueError,
      r"\['embedding'\] appear both in the input",
    ),
    (
      dict(tokens=named([[1.0, 2.0]], "batch", "member"), over="member"),
      TypeError,
      r"`tokens` must hold integer token ids",
    ),
    (dict(tokens=np.array([[1, 2]]), over="member"), TypeError, r"NamedArray"),
    (dict(tokens=ids), TypeError, r"needs `over=` .* or `offsets=`"),
    (dict(tokens=ids, over="member", offsets=[0]), ValueError, r"not both"),
    (dict(tokens=ids, offsets=[0]), ValueError, r"named axes \{'batch'"),
    (dict(tokens=flat, offsets=[1, 2]), ValueError, r"start at 0.*\[0\] = 1"),
    (
      dict(tokens=flat, offsets=[0, 2, 1]),
      ValueError,
      r"non-decreasing: offsets\[2\] = 1 is less than offsets\[1\] = 2",
    ),
    (dict(tokens=flat, offsets=[0, 4]), ValueError, r"offsets\[1\] = 4"),
    (dict(tokens=flat, offsets=[0.0, 1.0]), TypeError, r"integer positions"),
    (dict(tokens=flat, offsets=[[0]]), ValueError, r"1-D array"),
    (
      dict(tokens=flat, offsets=[], include_last_offset=True),
      ValueError,
      r"include_last_offset=True needs at least one offset",
    ),
    (
      dict(tokens=ids, over="member", include_last_offset=True),
      ValueError,
      r"`include_last_offset` applies to ragged bags",
    ),
    (dict(tokens=flat[None], offsets=[0]), ValueError, r"flat ids"),
    (
      dict(tokens=flat, offsets=[0], mode="sum", weights=np.ones(3, int)),
      TypeError,
      r"`weights` must be floating",
    ),
    (
      dict(tokens=flat, offsets=[0], mode="sum", weights=np.ones(2)),
      ValueError,
      r"shape of the flat ids",
    ),
    (
      dict(tokens=ids, over="member", mode="sum", weights=np.ones((2, 1))),
      ValueError,
      r"shape of the tokens' data \(1, 2\)",
    ),
    (
      dict(tokens=flat, offsets=[0], bag_axis="embedding"),
      ValueError,
      r"\['embedding'\] appear both",
    ),
    (dict(tokens=ids, over="member", chunk_size=0), ValueError, "chunk_size"),
    (dict(tokens=ids, over="member", out_of_range="nan"), ValueError, "out_of"),
  ]


def test_a_wrong_object_for_the_table_is_a_type_error_naming_it():
  ids = named([[1, 2]], "batch", "member")
  with pytest.raises(TypeError, match=r"ne.pooled_lookup: `table` must be a"):
    ne.pooled_lookup(W, ids, over="member")
  with pytest.raises(TypeError, match=r"penzai's own pz.nn.EmbeddingTable"):
    pz_table = pz.nn.EmbeddingTable(
      embeddings=pz.nx.wrap(W).tag("vocabulary", "embedding"),
      vocabulary_axis="vocabulary",
    )
    ne.pooled_lookup(pz_table, ids, over="member")
  table = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(TypeError, match=r"pass its table \(`layer.table`\)"):
    ne.pooled_lookup(ne.EmbeddingLookup(table), ids, over="member")
  # The layer checks when it is built, not at call time.
  with pytest.raises(TypeError, match=r"EmbeddingBag: `table` must be a"):
    ne.EmbeddingBag(table.rows_array(), over="member")


@pytest.mark.parametrize("kwargs, error, pattern", bad_calls())
def test_bad_input_is_a_clear_error_naming_the_argument(kwargs, error, pattern):
  table = ne.EmbeddingTable.from_pretrained(W)
  tokens = kwargs.pop("tokens")
  with pytest.raises(error, match=pattern):
    ne.pooled_lookup(table, tokens, **kwargs)


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (dict(over="m", mode="median"), ValueError, r"`mode`"),
    (dict(over=None), TypeError, r"`over` must be an axis name"),
    (dict(over="m", mode="max", scale_grad_by_freq=True), ValueError, "max"),
    (
      dict(over="m", mode="mean", weights_input_name="w"),
      ValueError,
      r"only supported with mode='sum'",
    ),
    (dict(over="m", max_norm=-1.0), ValueError, r"`max_norm`"),
  ],
)
def test_bad_layer_options_fail_when_the_layer_is_built(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    ne.EmbeddingBag(ne.EmbeddingTable.from_pretrained(W), **kwargs)


# ------------------------------------------------------------ hypothesis


@st.composite
def ragged_cases(draw):
  vocab = draw(st.integers(2, 9))
  features = draw(st.integers(1, 4))
  num_ids = draw(st.integers(0, 14))
  cuts = sorted(draw(st.lists(st.integers(0, num_ids), max_size=5)))
  include_last = draw(st.booleans())
  offsets = [0, *cuts]
  mode = draw(st.sampled_from(["sum", "mean", "max"]))
  return dict(
    vocab=vocab,
    features=features,
    ids=draw(
      st.lists(st.integers(-1, vocab), min_size=num_ids, max_size=num_ids)
    ),
    offsets=offsets,
    include_last_offset=include_last,
    mode=mode,
    weighted=mode == "sum" and draw(st.booleans()),
    padding_index=draw(st.sampled_from([None, 0, vocab - 1])),
    out_of_range=draw(st.sampled_from(["fill", "clip", "wrap"])),
    max_norm=draw(st.sampled_from([None, 1.0])),
    scale_grad_by_freq=mode != "max" and draw(st.booleans()),
    chunk_size=draw(st.sampled_from([None, 1, 3])),
    seed=draw(st.integers(0, 2**16)),
  )


@hypothesis.settings(max_examples=16, deadline=None)
@hypothesis.given(case=ragged_cases())
def test_ragged_bags_match_numpy_values_and_both_gradients(case):
  rng = np.random.default_rng(case["seed"])
  w = rng.normal(size=(case["vocab"], case["features"])).astype(np.float32)
  w = np.round(w, 1)  # ties in "max" are likely
  ids = np.array(case["ids"], np.int32)
  offsets = np.array(case["offsets"], np.int32)
  num_bags = len(offsets) - int(case["include_last_offset"])
  cot = rng.normal(size=(num_bags, case["features"])).astype(np.float32)
  weights = None
  if case["weighted"]:
    weights = rng.normal(size=len(ids)).astype(np.float32)
  options = dict(
    mode=case["mode"],
    include_last_offset=case["include_last_offset"],
    max_norm=case["max_norm"],
    scale_grad_by_freq=case["scale_grad_by_freq"],
    out_of_range=case["out_of_range"],
  )
  want = np_bag(
    w, ids, offsets, cot, weights=weights,
    padding_index=case["padding_index"], **options,
  )  # fmt: skip
  table = trainable(w, padding_index=case["padding_index"])
  # Compiled (offsets traced) for half of the examples, eager for the rest.
  if case["seed"] % 2:
    run = lambda f, *args: f(*args)  # noqa: E731
  else:
    run = lambda f, *args: jax.jit(f)(*args)  # noqa: E731
  got = pooled_and_grads(
    run, table, ids, cot, weights, offsets=offsets,
    chunk_size=case["chunk_size"], **options,
  )  # fmt: skip
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  if weights is not None:
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)


@st.composite
def fixed_cases(draw):
  mode = draw(st.sampled_from(["sum", "mean", "max"]))
  vocab = draw(st.integers(2, 9))
  return dict(
    vocab=vocab,
    bags=draw(st.integers(1, 4)),
    members=draw(st.integers(1, 9)),
    mode=mode,
    weighted=mode == "sum" and draw(st.booleans()),
    padding_index=draw(st.sampled_from([None, 0])),
    chunk_size=draw(st.sampled_from([None, 2, 5])),
    seed=draw(st.integers(0, 2**16)),
  )


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(case=fixed_cases())
def test_fixed_size_bags_match_numpy_under_jit(case):
  rng = np.random.default_rng(case["seed"])
  w = np.round(rng.normal(size=(case["vocab"], 3)), 1).astype(np.float32)
  data = rng.integers(0, case["vocab"], size=(case["bags"], case["members"]))
  cot = rng.normal(size=(case["bags"], 3)).astype(np.float32)
  weights = None
  if case["weighted"]:
    weights = rng.normal(size=data.shape).astype(np.float32)
  offsets = np.arange(case["bags"]) * case["members"]
  want = np_bag(
    w,
    data.reshape(-1),
    offsets,
    cot,
    mode=case["mode"],
    weights=None if weights is None else weights.reshape(-1),
    padding_index=case["padding_index"],
  )
  got = pooled_and_grads(
    lambda f, *a: jax.jit(f)(*a),
    trainable(w, padding_index=case["padding_index"]),
    named(data, "batch", "member"),
    cot,
    weights,
    over="member",
    mode=case["mode"],
    chunk_size=case["chunk_size"],
  )
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  if weights is not None:
    np.testing.assert_allclose(
      got[2], want[2].reshape(data.shape), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------ every kind


KINDS = ("float", "int8", "int4", "lora", "lora_int4", "rows")
"""The kinds of table: plain (trainable), quantised (frozen), LoRA over a
float and over an int4 base (A and B train), trained rows."""
KV, KD, RANK = 11, 4, 2
KW = np.round(np.random.default_rng(5).normal(size=(KV, KD)), 2)
KW = KW.astype(np.float32)
KA = np.random.default_rng(6).normal(size=(KV, RANK)).astype(np.float32)
TRAINED = (1, 4, 9)


def kind_table(kind, padding_index=None, dtype=np.float32):
  """A table of ``kind`` whose trainable parts are `pz.Parameter`s (LoRA
  with a non-zero ``A``, so that its delta shows)."""
  w = KW.astype(dtype)
  if kind == "float":
    return ne.EmbeddingTable.from_pretrained(
      w, freeze=False, name="embed", padding_index=padding_index
    )
  base = ne.EmbeddingTable.from_pretrained(w, padding_index=padding_index)
  if kind == "int8":
    return base.quantized("int8")
  if kind == "int4":
    return base.quantized("int4", group_size=2)
  if kind == "rows":
    rows = base.with_trainable_rows(list(TRAINED), name="r")
    bumped = np.asarray(rows.rows.value.unwrap("rows", "embedding")) + 0.5
    rows.rows.value = pz.nx.wrap(bumped.astype(dtype)).tag("rows", "embedding")
    return rows
  if kind == "lora_int4":
    base = base.quantized("int4", group_size=2)
  lora = base.with_lora(RANK, 3.0, name="e", init_base_rng=jax.random.key(2))
  lora.lora_a.value = pz.nx.wrap(KA).tag("vocabulary", "rank")
  return lora


def float_rows(table) -> np.ndarray:
  """The rows as the table reads them: dequantised or merged (float64)."""
  if isinstance(table, ne.EmbeddingTable):
    return np.asarray(table.rows_array(), np.float64)
  merged = getattr(table, "merged", None) or table.dequantized
  return np.asarray(merged().rows_array(), np.float64)


def expected_grads(table, d_rows) -> dict[str, np.ndarray]:
  """Each parameter's gradient (by label) from the gradient ``d_rows`` of
  the rows as read, by the chain rule of each kind."""
  if isinstance(table, ne.EmbeddingTable):
    return {"embed.embeddings": d_rows}
  if isinstance(table, ne.LoraTable):
    a = raw(table.lora_a.value, "vocabulary", "rank")
    b = raw(table.lora_b.value, "rank", "embedding")
    return {
      "e.lora_a": table.scale * d_rows @ b.T,
      "e.lora_b": table.scale * a.T @ d_rows,
    }
  if isinstance(table, ne.TrainableRowsTable):
    return {"r.trainable_rows": d_rows[list(TRAINED)]}
  return {}


def kind_pooled_and_grads(run, table, ids, cot, weights=None, **kw):
  """Pooled values, the parameters' gradients (by label, in their storage
  order) and the weights' gradient of ``sum(pooled * cot)``."""
  unbound, params = pz.unbind_params(table)
  values = [p.freeze() for p in params]
  labels = [p.label for p in params]

  def grads(values, weights, ids):
    def loss(values, weights):
      bound = pz.bind_variables(unbound, values)
      out = ne.pooled_lookup(bound, ids, weights=weights, **kw)
      order = [n for n in out.named_shape if n != "embedding"]
      x = out.order_as(*order, "embedding").data_array
      safe = jnp.where(jnp.isnan(x), jnp.zeros((), x.dtype), x)
      return jnp.sum(safe.astype(jnp.float32) * cot), x

    return jax.grad(loss, (0, 1), has_aux=True)(values, weights)

  (d_values, d_weights), out = run(grads, values, weights, ids)
  d_params = {
    label: raw(v.value, *PARAM_AXES[label.split(".")[-1]])
    for label, v in zip(labels, d_values)
  }
  return np.asarray(out, np.float32), d_params, d_weights


PARAM_AXES = {
  "embeddings": ("vocabulary", "embedding"),
  "lora_a": ("vocabulary", "rank"),
  "lora_b": ("rank", "embedding"),
  "trainable_rows": ("rows", "embedding"),
}
"""The storage order of each kind's parameter, as `expected_grads` has it."""


def check_kind(table, got, want, rtol=1e-5, atol=1e-5):
  out, d_params, d_weights = got
  want_out, want_d_rows, want_d_weights = want
  np.testing.assert_allclose(out, want_out, rtol=rtol, atol=atol)
  expected = expected_grads(table, want_d_rows)
  assert sorted(d_params) == sorted(expected)
  for label, grad in expected.items():
    np.testing.assert_allclose(
      d_params[label], grad, rtol=rtol, atol=atol, err_msg=label
    )
  if d_weights is not None:
    np.testing.assert_allclose(
      np.asarray(d_weights).reshape(-1),
      want_d_weights,
      rtol=rtol,
      atol=atol,
    )


MODES, LAYOUTS = ("sum", "mean", "max"), ("ragged", "fixed")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_pools_like_its_float_table(kind, mode, layout):
  # Eager and jitted calls alternate over the matrix (each kind, mode and
  # layout meets both), rather than doubling it.
  turn = KINDS.index(kind) + MODES.index(mode) + LAYOUTS.index(layout)
  run = (lambda f, *a: jax.jit(f)(*a)) if turn % 2 else (lambda f, *a: f(*a))
  table = kind_table(kind, padding_index=0)
  rows = float_rows(table)
  rng = np.random.default_rng(7)
  data = rng.integers(0, KV, size=(3, 5))
  data[1, :2] = 0  # pad members: skipped
  data[2] = 0  # an all-pad bag: zeros
  weights = None
  if mode == "sum":
    weights = rng.normal(size=data.shape).astype(np.float32)
  cot = rng.normal(size=(3, KD)).astype(np.float32)
  flat, offsets = data.reshape(-1), np.arange(3) * 5
  want = np_bag(
    rows,
    flat,
    offsets,
    cot,
    mode=mode,
    weights=None if weights is None else weights.reshape(-1),
    padding_index=0,
  )
  if layout == "ragged":
    kw = dict(offsets=offsets, mode=mode, chunk_size=2)
    got = kind_pooled_and_grads(run, table, flat, cot, weights=(
      None if weights is None else weights.reshape(-1)), **kw)  # fmt: skip
  else:
    kw = dict(over="member", mode=mode, chunk_size=2)
    got = kind_pooled_and_grads(
      run, table, named(data, "batch", "member"), cot, weights, **kw
    )
  check_kind(table, got, want)
  # The float reference itself: the same call on the float rows as read.
  reference = ne.EmbeddingTable.from_pretrained(
    rows.astype(np.float32), padding_index=0
  )
  tokens = flat if layout == "ragged" else named(data, "batch", "member")
  w = weights if weights is None or layout == "fixed" else weights.reshape(-1)
  float_out = ne.pooled_lookup(reference, tokens, weights=w, **kw)
  np.testing.assert_allclose(
    got[0], raw(float_out, *float_out.named_shape), rtol=1e-5, atol=1e-6
  )


def option_cases():
  return {
    "fill": dict(out_of_range="fill"),
    "clip": dict(out_of_range="clip"),
    "wrap": dict(out_of_range="wrap"),
    "max_norm": dict(max_norm=1.5, norm_type=3.0),
    "freq": dict(scale_grad_by_freq=True),
  }


@pytest.mark.parametrize("option", list(option_cases()))
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_follows_every_lookup_option(kind, option):
  run = lambda f, *args: jax.jit(f)(*args)  # noqa: E731 (eager: above)
  kw = option_cases()[option]
  table = kind_table(kind, padding_index=KV - 1)
  rows = float_rows(table)
  ids = np.array([3, -1, 3, 12, 5, 10, 1, 4, 4, 9])
  if option in ("max_norm", "freq"):
    ids = np.abs(ids) % KV
  offsets = np.array([0, 3, 3, 6])
  cot = np.random.default_rng(8).normal(size=(4, KD)).astype(np.float32)
  for mode in ("mean", "max"):
    if mode == "max" and option == "freq":
      continue
    want = np_bag(
      rows, ids, offsets, cot, mode=mode, padding_index=KV - 1, **kw
    )
    got = kind_pooled_and_grads(
      run, table, ids, cot, offsets=offsets, mode=mode, chunk_size=3, **kw
    )
    check_kind(table, got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_takes_the_error_policy_alignment_rows_and_dtype(kind):
  table = kind_table(kind)
  ids = named([[1, 11], [2, 3]], "batch", "member")
  with pytest.raises(IndexError, match=r"id 11 at position \(0, 1\)"):
    ne.pooled_lookup(table, ids, over="member", out_of_range="error")
  rows = float_rows(table)
  ok = named([[1, 10], [2, 3]], "batch", "member")
  out = ne.pooled_lookup(table, ok, over="member", dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  want = rows[[[1, 10], [2, 3]]].astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_allclose(
    raw(out, "batch", "embedding").astype(np.float32),
    want.mean(axis=1),
    rtol=1e-2,
  )
  layer = ne.EmbeddingBag(table, over="member", mode="max", dtype="bfloat16")
  assert layer(ok).dtype == jnp.bfloat16
  # Alignment rows (a padded base) are out of range: NaN bags under "fill".
  padded = kind_table_padded(kind)
  out = ne.pooled_lookup(padded, named([[1, 11], [2, 3]], "b", "m"), over="m")
  pooled = raw(out, "b", "embedding")
  assert np.isnan(pooled[0]).all()
  rows = float_rows(padded)
  np.testing.assert_allclose(pooled[1], rows[[2, 3]].mean(0), rtol=1e-5)


def kind_table_padded(kind):
  """``kind_table(kind)`` built on a base with alignment rows (16 rows for
  11 tokens)."""
  base = ne.EmbeddingTable.from_pretrained(KW).padded_to_multiple(8)
  if kind == "float":
    return ne.EmbeddingTable.from_pretrained(
      KW, freeze=False
    ).padded_to_multiple(8)
  if kind == "int8":
    return base.quantized("int8")
  if kind == "int4":
    return base.quantized("int4", group_size=2)
  if kind == "rows":
    return base.with_trainable_rows(list(TRAINED), name="r")
  if kind == "lora_int4":
    base = base.quantized("int4", group_size=2)
  return base.with_lora(RANK, 3.0, name="e", init_base_rng=jax.random.key(2))


@pytest.mark.parametrize("kind", ["lora", "rows"])
def test_adapted_layers_train_their_adapters_through_a_bag(kind):
  table = kind_table(kind)
  layer = ne.EmbeddingBag(table, over="member", mode="sum")
  ids = named([[1, 4, 4], [9, 2, 0]], "batch", "member")
  unbound, params = pz.unbind_params(layer)
  assert {p.label for p in params} == set(
    expected_grads(table, np.zeros((KV, KD)))
  )

  def loss(values):
    return jnp.sum(pz.bind_variables(unbound, values)(ids).data_array ** 2)

  grads = jax.jit(jax.grad(loss))([p.freeze() for p in params])
  assert all(np.abs(np.asarray(g.value.data_array)).sum() > 0 for g in grads)


def test_padded_members_keep_the_bag_indices_sorted():
  """The scatters over bag indices promise XLA sorted indices
  (``indices_are_sorted``): padding a ragged layout's last chunk must
  repeat the last bag, not restart at bag 0."""
  from named_embed._src.ops.pooled import reductions

  bag = jnp.array([0, 0, 1, 3], jnp.int32)
  padded = np.asarray(reductions.chunks(bag, 3, edge=True))
  assert padded.tolist() == [[0, 0, 1], [3, 3, 3]]
  assert np.all(np.diff(padded.reshape(-1)) >= 0)
  ids = np.asarray(reductions.chunks(jnp.array([5, 6, 7, 8]), 3))
  assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
