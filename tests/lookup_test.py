"""Tests for `named_embed.lookup`: torch semantics, policies, errors, layers.

References are hand-computed arrays and numpy (torch semantics are taken
from torch's documentation and `aten/src/ATen/native/Embedding.cpp`).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data, raw
from jax.experimental import checkify
from penzai import pz

import named_embed as ne

W = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.5], [-6.0, 8.0]], np.float32)
C = np.arange(1.0, 11.0, dtype=np.float32).reshape(5, 2)  # a cotangent


def trainable(rows=W, **kwargs):
  return pz.freeze_params(
    ne.EmbeddingTable.from_pretrained(rows, freeze=False, **kwargs)
  )


def eager(f, *args):
  return f(*args)


def grad_of(table, ids, run=eager, cotangent=C, **options):
  """d/d(table) of sum(lookup(ids) * cotangent), as numpy."""

  def grad(table):
    def loss(table):
      out = data(ne.lookup(table, ids, **options), "embedding")
      return jnp.sum(out * cotangent)

    return jax.grad(loss)(table).rows_array()

  return np.asarray(run(grad, table))


# ------------------------------------------------------------ basic lookups


def test_named_tokens_keep_axes_and_append_embedding_axes(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = pz.nx.wrap(np.array([[0, 3, 1], [2, 2, 0]])).tag("batch", "seq")
  out = run(lambda t, i: ne.lookup(t, i), table, ids)
  assert out.named_shape == {"batch": 2, "seq": 3, "embedding": 2}
  np.testing.assert_array_equal(
    raw(out, "batch", "seq", "embedding"), W[[[0, 3, 1], [2, 2, 0]]]
  )


def test_positional_tokens_stay_positional_in_front(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  out = run(lambda t, i: ne.lookup(t, i), table, jnp.array([[1, 2]]))
  assert out.positional_shape == (1, 2)
  assert out.named_shape == {"embedding": 2}
  np.testing.assert_array_equal(raw(out, "embedding"), W[[[1, 2]]])


def test_mixed_positional_and_named_tokens():
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = pz.nx.wrap(np.array([[0, 1], [2, 3], [1, 1]])).tag_prefix("seq")
  out = ne.lookup(table, ids)  # "seq" named, one positional axis of size 2
  assert out.positional_shape == (2,)
  assert out.named_shape == {"seq": 3, "embedding": 2}
  np.testing.assert_array_equal(
    raw(out, "seq", "embedding"), W[[[0, 2, 1], [1, 3, 1]]]
  )


def test_named_array_view_tokens_are_accepted():
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = pz.nx.wrap(np.array([[0, 1, 2], [3, 2, 1]])).tag("a", "b")
  view = ids.untag("b").tag("b")  # a NamedArrayView with another layout
  out = ne.lookup(table, pz.nx.nmap(lambda x: x)(view))
  np.testing.assert_array_equal(
    raw(out, "a", "b", "embedding"), W[raw(ids, "a", "b")]
  )


def test_multi_axis_table_output_keeps_all_embedding_axes(run):
  rows = np.arange(24.0, dtype=np.float32).reshape(4, 2, 3)
  table = ne.EmbeddingTable.from_pretrained(
    rows, embedding_axes=("heads", "head_dim")
  )
  ids = pz.nx.wrap(np.array([3, 0])).tag("seq")
  out = run(lambda t, i: ne.lookup(t, i), table, ids)
  assert out.named_shape == {"seq": 2, "heads": 2, "head_dim": 3}
  np.testing.assert_array_equal(
    raw(out, "seq", "heads", "head_dim"), rows[[3, 0]]
  )


def test_all_integer_dtypes_are_accepted():
  table = ne.EmbeddingTable.from_pretrained(W)
  for dtype in (np.int8, np.uint8, np.int16, np.int32, np.uint32):
    out = ne.lookup(table, np.array([1, 3], dtype))
    np.testing.assert_array_equal(raw(out, "embedding"), W[[1, 3]])


# ------------------------------------------------------------ out of range

BAD = np.array([0, 4, -1, 3, -5])


def test_fill_gives_nan_rows_for_every_out_of_range_id(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  out = raw(run(lambda t, i: ne.lookup(t, i), table, BAD), "embedding")
  np.testing.assert_array_equal(out[[0, 3]], W[[0, 3]])
  assert np.isnan(out[[1, 2, 4]]).all()


def test_fill_sends_no_gradient_from_bad_ids(run):
  grad = grad_of(trainable(), BAD, run)
  expected = np.zeros_like(W)
  expected[0] = C[0]
  expected[3] = C[3]
  np.testing.assert_array_equal(grad, expected)


def test_clip_reads_and_trains_the_nearest_row(run):
  table = trainable()
  out = run(lambda t, i: ne.lookup(t, i, out_of_range="clip"), table, BAD)
  np.testing.assert_array_equal(raw(out, "embedding"), W[[0, 3, 0, 3, 0]])
  grad = grad_of(table, BAD, run, out_of_range="clip")
  np.testing.assert_array_equal(
    grad, [C[0] + C[2] + C[4], [0, 0], [0, 0], C[1] + C[3]]
  )


def test_wrap_is_python_modulo(run):
  table = trainable()
  out = run(lambda t, i: ne.lookup(t, i, out_of_range="wrap"), table, BAD)
  np.testing.assert_array_equal(raw(out, "embedding"), W[np.mod(BAD, 4)])
  grad = grad_of(table, BAD, run, out_of_range="wrap")
  np.testing.assert_array_equal(
    grad, [C[0] + C[1], [0, 0], [0, 0], C[2] + C[3] + C[4]]
  )


def test_error_policy_raises_eagerly_naming_ids_and_positions():
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = pz.nx.wrap(np.array([[0, 4], [-1, 2]])).tag("b", "s")
  with pytest.raises(IndexError) as info:
    ne.lookup(table, ids, out_of_range="error")
  message = str(info.value)
  assert "2 token id(s) outside the vocabulary [0, 4)" in message
  assert "id 4 at position (0, 1)" in message
  assert "id -1 at position (1, 0)" in message
  out = ne.lookup(table, np.array([3, 0]), out_of_range="error")
  np.testing.assert_array_equal(raw(out, "embedding"), W[[3, 0]])


def test_error_policy_under_jit_compiles_and_fails_at_run_time():
  rows = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
  table = ne.EmbeddingTable.from_pretrained(rows)
  f = jax.jit(
    lambda t, i: data(ne.lookup(t, i, out_of_range="error"), "embedding")
  )
  f.lower(table, jnp.array([0, 9])).compile()  # no trace-time failure
  np.testing.assert_array_equal(
    f(table, jnp.array([3, 1])), rows[jnp.array([3, 1])]
  )
  with pytest.raises(Exception, match=r"id 9 at position \(1,\)"):
    f(table, jnp.array([0, 9])).block_until_ready()


def test_error_policy_under_checkify_is_functionalised():
  table = ne.EmbeddingTable.from_pretrained(W)
  f = checkify.checkify(
    jax.jit(
      lambda i: data(ne.lookup(table, i, out_of_range="error"), "embedding")
    )
  )
  error, out = f(jnp.array([1, 2, 7]))
  assert "the first is id 7 at position [2]" in error.get()
  np.testing.assert_array_equal(out[:2], W[[1, 2]])
  error, _ = f(jnp.array([1, 2, 3]))
  assert error.get() is None


def test_error_policy_under_vmap_and_grad():
  table = trainable()
  f = jax.jit(
    jax.vmap(
      lambda i: data(ne.lookup(table, i, out_of_range="error"), "embedding")
    )
  )
  np.testing.assert_array_equal(f(jnp.array([[1], [2]])), W[[[1], [2]]])
  grad = grad_of(table, np.array([0, 1, 1, 2, 3]), out_of_range="error")
  np.testing.assert_array_equal(grad, [C[0], C[1] + C[2], C[3], C[4]])


# ------------------------------------------------------------ padding


def test_padding_row_is_returned_as_stored_and_gets_no_gradient(run):
  table = trainable(padding_index=1)
  ids = np.array([1, 0, 1, 3, 2])
  out = run(lambda t, i: ne.lookup(t, i), table, ids)
  np.testing.assert_array_equal(raw(out, "embedding"), W[ids])
  grad = grad_of(table, ids, run)
  np.testing.assert_array_equal(grad, [C[1], [0, 0], C[4], C[3]])


def test_negative_padding_index_counts_from_the_end():
  grad = grad_of(trainable(padding_index=-1), np.array([3, 3, 0, 1, 2]))
  np.testing.assert_array_equal(grad, [C[2], C[3], C[4], [0, 0]])


@pytest.mark.parametrize(
  "policy, ids, expected_rows",
  [
    ("clip", [9, 0, 0, 0, 0], [3, 0, 0, 0, 0]),
    ("wrap", [-1, 0, 0, 0, 0], [3, 0, 0, 0, 0]),
  ],
)
def test_padding_test_uses_the_row_actually_read(policy, ids, expected_rows):
  grad = grad_of(trainable(padding_index=3), np.array(ids), out_of_range=policy)
  np.testing.assert_array_equal(grad[3], [0, 0])
  np.testing.assert_array_equal(grad[0], C[1:].sum(axis=0))


# ------------------------------------------------------------ max_norm


def test_max_norm_hand_computed_and_table_not_mutated(run):
  table = trainable()
  out = run(lambda t, i: ne.lookup(t, i, max_norm=2.0), table, np.arange(4))
  np.testing.assert_allclose(
    raw(out, "embedding"),
    [[1.2, 1.6], [1.0, 0.0], [0.0, 0.5], [-1.2, 1.6]],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(table.rows_array(), W)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, np.inf, -np.inf, 0.0, -2.0])
def test_max_norm_every_norm_type_matches_numpy(run, p):
  table = ne.EmbeddingTable.from_pretrained(W)
  out = run(
    lambda t, i: ne.lookup(t, i, max_norm=1.5, norm_type=p), table, np.arange(4)
  )
  with np.errstate(divide="ignore"):
    norms = np.linalg.norm(W.astype(np.float64), ord=p, axis=1)
  scale = np.where(norms > 1.5, 1.5 / (norms + 1e-7), 1.0)
  np.testing.assert_allclose(
    raw(out, "embedding"), W * scale[:, None], rtol=2e-6
  )


def test_max_norm_is_strict_and_applies_to_padding_row():
  rows = np.array([[2.0, 0.0], [0.0, 4.0]], np.float32)
  table = ne.EmbeddingTable.from_pretrained(rows, padding_index=1)
  out = raw(ne.lookup(table, np.array([0, 1]), max_norm=2.0), "embedding")
  np.testing.assert_array_equal(out[0], [2.0, 0.0])  # norm == max_norm: kept
  np.testing.assert_allclose(out[1], [0.0, 2.0 * 4.0 / (4.0 + 1e-7)], rtol=1e-7)


def test_max_norm_gradient_is_as_without_renorm():
  ids = np.array([0, 3, 3, 1, 2])
  np.testing.assert_array_equal(
    grad_of(trainable(), ids, max_norm=0.1, norm_type=1.0),
    grad_of(trainable(), ids),
  )


def test_max_norm_multi_axis_norm_over_all_embedding_axes():
  rows = np.array([[[3.0, 0.0], [0.0, 4.0]]], np.float32)
  table = ne.EmbeddingTable.from_pretrained(rows, embedding_axes=("a", "b"))
  out = ne.lookup(table, np.array([0, 0]), max_norm=1.0, out_of_range="clip")
  np.testing.assert_allclose(
    raw(out, "a", "b"), rows[[0, 0]] / (5 + 1e-7), rtol=1e-6
  )


# ------------------------------------------------------------ frequency


def test_scale_grad_by_freq_divides_by_count_over_whole_array(run):
  ids = pz.nx.wrap(np.array([[0, 0, 1, 3, 0]])).tag("b", "s")

  def loss(table):
    out = ne.lookup(table, ids, scale_grad_by_freq=True)
    return jnp.sum(out.untag("b", "s", "embedding").unwrap()[0] * C)

  grad = np.asarray(run(jax.grad(loss), trainable()).rows_array())
  np.testing.assert_allclose(
    grad, [(C[0] + C[1] + C[4]) / 3, C[2], [0, 0], C[3]], rtol=1e-6
  )


def test_padding_max_norm_and_frequency_combined_under_jit():
  ids = jnp.array([0, 0, 1, 3, 0])

  @jax.jit
  def f(table):
    def loss(table):
      out = ne.lookup(
        table, ids, max_norm=2.0, scale_grad_by_freq=True, out_of_range="clip"
      )
      return jnp.sum(data(out, "embedding") * C), out

    return jax.grad(loss, has_aux=True)(table)

  grad, out = f(trainable(padding_index=0))
  np.testing.assert_allclose(
    data(out, "embedding"),
    [[1.2, 1.6], [1.2, 1.6], [1.0, 0.0], [-1.2, 1.6], [1.2, 1.6]],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(grad.rows_array(), [[0, 0], C[2], [0, 0], C[3]])


# ------------------------------------------------------------ freeze / dtype


def test_frozen_table_gets_no_gradient_and_no_parameter():
  frozen = ne.EmbeddingTable.from_pretrained(W)
  np.testing.assert_array_equal(grad_of(frozen, np.array([0, 1, 2, 3, 0])), 0)
  assert pz.unbind_params(ne.EmbeddingLookup(frozen))[1] == ()


def test_lookup_keeps_storage_dtype_and_casts_only_rows():
  rows = jnp.ones((1000, 8), jnp.bfloat16)
  table = ne.EmbeddingTable.from_pretrained(rows)
  assert ne.lookup(table, np.array([1, 2])).dtype == jnp.bfloat16
  f = lambda t, i: data(ne.lookup(t, i, dtype=jnp.float32), "embedding")  # noqa: E731
  assert jax.jit(f)(table, jnp.array([1, 2])).dtype == jnp.float32
  jaxpr = jax.make_jaxpr(f)(table, jnp.array([1, 2]))
  converts = [
    e
    for e in _all_eqns(jaxpr.jaxpr)
    if e.primitive.name == "convert_element_type"
  ]
  assert converts and all(
    e.invars[0].aval.shape != (1000, 8) for e in converts
  ), "the whole table was cast"


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


def test_vocabulary_of_size_one_broadcasts_without_scatter():
  table = trainable(rows=np.array([[2.0, -1.0]], np.float32))
  out = ne.lookup(table, np.array([0, 0, 0]))
  np.testing.assert_array_equal(raw(out, "embedding"), [[2.0, -1.0]] * 3)

  def loss(t):
    return jnp.sum(data(ne.lookup(t, jnp.array([0, 0, 0])), "embedding"))

  assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss))(table))
  np.testing.assert_array_equal(
    jax.grad(loss)(table).rows_array(), [[3.0, 3.0]]
  )
  out = ne.lookup(table, np.array([1]))
  assert np.isnan(raw(out, "embedding")).all()  # "fill" still applies


# ------------------------------------------------------------ bad input


def test_float_tokens_are_a_type_error():
  table = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(
    TypeError, match=r"`tokens` must hold integer token ids, got dtype float32"
  ):
    ne.lookup(table, pz.nx.wrap(np.array([1.0, 2.0], np.float32)).tag("s"))
  with pytest.raises(TypeError, match="got dtype bool"):
    ne.EmbeddingLookup(table)(np.array([True]))


def test_clashing_axis_names_are_a_value_error_naming_both_sides():
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = pz.nx.wrap(np.array([[1, 2]])).tag("batch", "embedding")
  with pytest.raises(ValueError) as info:
    ne.EmbeddingLookup(table)(ids)
  message = str(info.value)
  assert "['embedding']" in message
  assert "['batch', 'embedding']" in message
  assert "['vocabulary', 'embedding']" in message
  with pytest.raises(ValueError, match=r"\['vocabulary'\]"):
    ne.lookup(table, pz.nx.wrap(np.array([1])).tag("vocabulary"))


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (
      dict(out_of_range="nan"),
      ValueError,
      r"`out_of_range` must be one of \('fill', 'clip', 'wrap', 'error'\), got 'nan'",
    ),
    (
      dict(max_norm=-1.0),
      ValueError,
      r"`max_norm` must be non-negative, got -1.0",
    ),
    (dict(norm_type="l2"), TypeError, r"`norm_type` must be a number"),
    (
      dict(scale_grad_by_freq=1),
      TypeError,
      r"`scale_grad_by_freq` must be a bool",
    ),
    (dict(dtype=jnp.int8), TypeError, r"`dtype` must be a floating dtype"),
  ],
)
def test_bad_options_fail_when_the_layer_is_built(kwargs, error, pattern):
  table = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(error, match=pattern):
    ne.EmbeddingLookup(table, **kwargs)
  with pytest.raises(error, match=pattern):
    ne.lookup(table, np.array([0]), **kwargs)


# ------------------------------------------------------------ penzai layers


def test_layer_equals_function_and_ignores_side_inputs():
  table = ne.EmbeddingTable.from_pretrained(W, padding_index=0)
  layer = ne.EmbeddingLookup(table, out_of_range="wrap", max_norm=1.0)
  ids = pz.nx.wrap(np.array([5, -1, 2])).tag("s")
  np.testing.assert_array_equal(
    raw(layer(ids, attn_mask=None), "s", "embedding"),
    raw(
      ne.lookup(table, ids, out_of_range="wrap", max_norm=1.0), "s", "embedding"
    ),
  )


def test_layer_under_variable_jit_and_unbound_params():
  table = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=6,
    embedding_axes={"embedding": 3},
  )
  layer = ne.EmbeddingLookup(table)
  ids = pz.nx.wrap(jnp.array([1, 5])).tag("s")
  expected = raw(layer(ids), "s", "embedding")
  np.testing.assert_array_equal(
    raw(pz.variable_jit(lambda m, x: m(x))(layer, ids), "s", "embedding"),
    expected,
  )
  unbound, params = pz.unbind_params(layer)
  assert len(params) == 1

  @jax.jit
  def apply(values, x):
    return pz.bind_variables(unbound, values)(x)

  out = apply([p.freeze() for p in params], ids)
  np.testing.assert_array_equal(raw(out, "s", "embedding"), expected)


# ------------------------------------------------------------ regressions


@pytest.mark.parametrize("policy", ["fill", "clip", "wrap", "error"])
def test_narrow_id_dtypes_reach_rows_beyond_their_range(run, policy):
  rows = np.arange(300, dtype=np.float32).reshape(300, 1)
  table = ne.EmbeddingTable.from_pretrained(rows)
  ids = jnp.array([255, 7], jnp.uint8)
  out = run(lambda t, i: ne.lookup(t, i, out_of_range=policy), table, ids)
  np.testing.assert_array_equal(raw(out, "embedding"), [[255.0], [7.0]])
  ids16 = jnp.array([-2, 299], jnp.int16)
  out = run(lambda t, i: ne.lookup(t, i, out_of_range="wrap"), table, ids16)
  np.testing.assert_array_equal(raw(out, "embedding"), [[298.0], [299.0]])


def test_frequency_counts_ignore_ids_dropped_by_fill():
  grad = grad_of(
    trainable(), np.array([0, 9, 9, -1, 0]), scale_grad_by_freq=True
  )
  np.testing.assert_allclose(grad[0], (C[0] + C[4]) / 2, rtol=1e-6)
  np.testing.assert_array_equal(grad[1:], 0.0)


def test_padding_index_of_a_table_bound_after_construction_is_resolved():
  slot_table = ne.EmbeddingTable(pz.ParameterSlot("x"), padding_index=-1)
  bound = pz.bind_variables(
    slot_table,
    [
      pz.ParameterValue(
        value=pz.nx.wrap(W, "vocabulary", "embedding"), label="x"
      )
    ],
  )
  grad = grad_of(bound, np.array([3, 0, 0, 0, 0]))
  np.testing.assert_array_equal(grad[3], [0.0, 0.0])
  bad = ne.EmbeddingTable(pz.ParameterSlot("x"), padding_index=9)
  bad = pz.bind_variables(
    bad,
    [
      pz.ParameterValue(
        value=pz.nx.wrap(W, "vocabulary", "embedding"), label="x"
      )
    ],
  )
  with pytest.raises(
    ValueError, match=r"`padding_index` 9 is outside \[-4, 4\)"
  ):
    ne.lookup(bad, np.array([0]))


# ------------------------------------------------------------ strategies


@pytest.mark.parametrize("policy", ["fill", "clip", "wrap"])
def test_one_hot_strategy_equals_gather_values_and_gradients(run, policy):
  table = trainable(padding_index=2)
  ids = np.array([0, 5, -1, 3, 3])
  options = dict(out_of_range=policy, max_norm=3.0, scale_grad_by_freq=True)
  gathered = run(lambda t, i: ne.lookup(t, i, **options), table, ids)
  one_hot = run(
    lambda t, i: ne.lookup(t, i, strategy="one_hot", **options), table, ids
  )
  np.testing.assert_array_equal(
    raw(one_hot, "embedding"), raw(gathered, "embedding")
  )
  np.testing.assert_allclose(
    grad_of(table, ids, run, strategy="one_hot", **options),
    grad_of(table, ids, run, **options),
    rtol=1e-6,
  )


def test_one_hot_backward_has_no_scatter_and_is_exact_in_bfloat16():
  rows = jnp.asarray(np.random.default_rng(1).normal(size=(9, 4)), jnp.bfloat16)
  table = ne.EmbeddingTable.from_pretrained(rows)
  ids = np.array([8, 0, 4])
  layer = ne.EmbeddingLookup(table, strategy="one_hot")
  np.testing.assert_array_equal(
    np.asarray(raw(layer(ids), "embedding"), np.float32),
    np.asarray(rows[ids], np.float32),
  )

  def loss(t):
    return jnp.sum(data(ne.lookup(t, ids, strategy="one_hot"), "embedding"))

  jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable()).jaxpr
  primitives = {eqn.primitive.name for eqn in _all_eqns(jaxpr)}
  assert "dot_general" in primitives
  assert not {p for p in primitives if "scatter" in p or "gather" in p}
  with pytest.raises(ValueError, match=r"`strategy` must be one of"):
    ne.EmbeddingLookup(table, strategy="matmul")


# ------------------------------------------------------------ compiled code


def test_compiled_lookup_is_the_raw_take_with_no_transpose_or_table_copy():
  from conftest import compiled_ops

  rows = jnp.ones((1000, 64), jnp.bfloat16)
  table = ne.EmbeddingTable.from_pretrained(rows)
  ids = pz.nx.wrap(jnp.zeros((8, 16), jnp.int32)).tag("b", "s")
  ours = compiled_ops(lambda t, i: ne.lookup(t, i).data_array, table, ids)
  raw_take = compiled_ops(
    lambda w, i: jnp.take(w, i, axis=0), rows, ids.data_array
  )
  kinds = {op for op, _ in ours}
  assert "transpose" not in kinds
  # bf16 NaN-fill selects on the raw bits (see gather._fill_nan)
  assert kinds <= {op for op, _ in raw_take} | {"bitcast-convert"}
  assert [op for op, _ in ours].count("gather") == 1

  def table_shaped(ops):  # XLA:CPU reads bf16 through a fused convert
    return sorted(op for op, shape in ops if "[1000,64]" in shape)

  assert table_shaped(ours) == table_shaped(raw_take)
  cast = compiled_ops(
    lambda t, i: ne.lookup(t, i, dtype=jnp.float32).data_array, table, ids
  )
  assert table_shaped(cast) == table_shaped(raw_take)


def test_frequency_scaling_with_fill_never_turns_gradients_into_nan():
  grad = grad_of(
    trainable(), np.array([7, 1, 1, 9, 1]), scale_grad_by_freq=True
  )
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad[1], (C[1] + C[2] + C[4]) / 3, rtol=1e-6)
  np.testing.assert_array_equal(grad[[0, 2, 3]], 0.0)


def test_error_policy_still_raises_for_a_table_placed_on_one_device():
  table = ne.EmbeddingTable.from_pretrained(W)
  table = ne.shard(
    table, jax.make_mesh((1,), ("model",)), {"vocabulary": "model"}
  )
  f = jax.jit(lambda t, i: ne.lookup(t, i, out_of_range="error").data_array)
  with pytest.raises(Exception, match=r"id 9 at position \(0,\)"):
    jax.block_until_ready(f(table, jnp.array([9])))
