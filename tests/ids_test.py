"""Token ids wider than 32 bits while x64 is off (the default).

JAX converts an int64 array to int32 by keeping its low 32 bits, so
``2**32 + 1`` becomes ``1``. Concrete host ids (numpy int64 / uint64
arrays and scalars, Python ints, lists) must follow the out-of-range policy
on their true values, before any conversion, wherever ids enter: lookups
(plain and row-source tables), the fused loss's targets, pooled lookups and
inspection queries. References are computed with Python integers.

Under `jax.jit` the ids are closed over (concrete inside the trace): passed
as jit arguments they would be converted by JAX before named_embed sees
them (documented in docs/semantics.md, and checked at the end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data, raw
from penzai import pz

import named_embed as ne
from named_embed._src.base import range_policy

V = 5
W = np.arange(10.0, dtype=np.float32).reshape(V, 2) * np.float32([1, 10])
BIG = 2**32 + 1  # low 32 bits: 1
IDS = [BIG, -(2**32) + 2, 2**40, 3, -1, 2**62]
"""In int64: beyond int32 above and below, in range, and negative."""


def clip_ref(ids):
  return [min(max(i, 0), V - 1) for i in ids]


def wrap_ref(ids):
  return [i % V for i in ids]  # Python modulo of the exact values


def trainable(rows=W):
  return pz.freeze_params(ne.EmbeddingTable.from_pretrained(rows, freeze=False))


def closed(run, f, table):
  """``f(table)`` eagerly or jitted, the ids closed over (concrete)."""
  return run(f, table)


@pytest.mark.parametrize(
  "ids",
  [
    np.array(IDS, np.int64),
    IDS,  # a list of Python ints
    np.array(IDS, np.int64).reshape(2, 3),
  ],
  ids=["int64", "list", "int64-2d"],
)
def test_lookup_policies_use_the_true_64_bit_values(run, ids):
  table = trainable()
  flat = np.asarray(ids).reshape(-1).tolist()

  def found(policy):
    out = closed(run, lambda t: ne.lookup(t, ids, out_of_range=policy), table)
    return raw(out, "embedding").reshape(-1, 2)

  filled = found("fill")
  valid = [0 <= i < V for i in flat]
  np.testing.assert_array_equal(
    filled[valid], W[[i for i in flat if 0 <= i < V]]
  )
  assert np.isnan(filled[np.logical_not(valid)]).all()
  np.testing.assert_array_equal(found("clip"), W[clip_ref(flat)])
  np.testing.assert_array_equal(found("wrap"), W[wrap_ref(flat)])


@pytest.mark.parametrize("policy", ["fill", "clip", "wrap"])
def test_lookup_gradients_reach_the_rows_the_policy_selects(run, policy):
  ids = np.array(IDS, np.int64)
  cotangent = np.arange(1.0, 1.0 + 2 * len(IDS), dtype=np.float32).reshape(
    -1, 2
  )

  def grad(table):
    def loss(table):
      out = data(ne.lookup(table, ids, out_of_range=policy), "embedding")
      return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * cotangent)

    return jax.grad(loss)(table).rows_array()

  expected = np.zeros_like(W)
  rows = {"fill": IDS, "clip": clip_ref(IDS), "wrap": wrap_ref(IDS)}[policy]
  for position, row in enumerate(rows):
    if 0 <= row < V:
      expected[row] += cotangent[position]
  np.testing.assert_array_equal(np.asarray(run(grad, trainable())), expected)


@pytest.mark.parametrize(
  "ids, shown, position",
  [
    (np.array([1, BIG]), BIG, "(1,)"),
    (np.array([[2, 2], [2**63 - 1, 0]]), 2**63 - 1, "(1, 0)"),
    (np.array([3, 2**64 - 1], np.uint64), 2**64 - 1, "(1,)"),
    ([0, -(2**40)], -(2**40), "(1,)"),
    (BIG, BIG, "()"),
    (np.int64(BIG), BIG, "()"),
  ],
  ids=["int64", "int64-max", "uint64", "list", "python-int", "numpy-scalar"],
)
def test_error_names_the_true_id_eagerly_and_under_jit(
  run, ids, shown, position
):
  table = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(IndexError) as info:
    closed(run, lambda t: ne.lookup(t, ids, out_of_range="error"), table)
  assert f"id {shown} at position {position}" in str(info.value)
  layer = lambda t: ne.EmbeddingLookup(t, out_of_range="error")  # noqa: E731
  with pytest.raises(IndexError, match=f"id {shown} at position"):
    closed(run, lambda t: layer(t)(ids), table)


def test_wide_ids_in_range_read_their_rows_under_every_policy(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = np.array([4, 0, 2], np.int64)
  for policy in range_policy.POLICIES:
    out = closed(run, lambda t: ne.lookup(t, ids, out_of_range=policy), table)
    np.testing.assert_array_equal(raw(out, "embedding"), W[[4, 0, 2]])


@pytest.mark.parametrize(
  "ids",
  [
    np.array([2**64 - 1, BIG, 3], np.uint64),
    np.array([2**32 - 1, 3], np.uint32),
  ],
  ids=["uint64", "uint32"],
)
def test_unsigned_ids_beyond_int32(run, ids):
  table = ne.EmbeddingTable.from_pretrained(W)
  values = [int(i) for i in ids]

  def found(policy):
    out = closed(run, lambda t: ne.lookup(t, ids, out_of_range=policy), table)
    return raw(out, "embedding")

  filled = found("fill")
  assert np.isnan(filled[:-1]).all()
  np.testing.assert_array_equal(filled[-1], W[3])
  np.testing.assert_array_equal(found("clip"), W[clip_ref(values)])
  np.testing.assert_array_equal(found("wrap"), W[wrap_ref(values)])


def test_named_tokens_holding_host_ids_follow_the_policy():
  # A NamedArray whose data is a numpy array (pz.nx.wrap would convert it).
  tokens = pz.nx.NamedArray(
    named_axes={"seq": 3}, data_array=np.array([BIG, 2, -BIG])
  )
  table = ne.EmbeddingTable.from_pretrained(W)
  out = ne.lookup(table, tokens, out_of_range="wrap")
  np.testing.assert_array_equal(
    out.untag("seq", "embedding").unwrap(), W[wrap_ref([BIG, 2, -BIG])]
  )


@pytest.mark.parametrize("kind", ["int8", "lora"])
def test_compressed_and_adapted_tables_follow_the_policy(run, kind):
  base = ne.EmbeddingTable.from_pretrained(W)
  if kind == "int8":
    table = base.quantized("int8")
  else:
    table = base.with_lora(1, name="a", init_base_rng=jax.random.key(0))
    a = np.arange(1.0, 1.0 + V, dtype=np.float32)[:, None]  # a visible delta
    table.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
    table = pz.freeze_params(table)
  plain = table.merged() if kind == "lora" else table.dequantized()
  reference = np.asarray(plain.rows_array())
  ids = np.array(IDS, np.int64)
  for policy, rows in [("clip", clip_ref(IDS)), ("wrap", wrap_ref(IDS))]:
    out = closed(run, lambda t: ne.lookup(t, ids, out_of_range=policy), table)
    np.testing.assert_allclose(raw(out, "embedding"), reference[rows])
  out = closed(run, lambda t: ne.lookup(t, ids), table)
  assert np.isnan(raw(out, "embedding")[[0, 1, 2, 4, 5]]).all()
  with pytest.raises(IndexError, match=f"id {BIG} at position"):
    closed(run, lambda t: ne.lookup(t, ids, out_of_range="error"), table)


# --------------------------------------------------------------- fused loss


def naive_losses(hidden, targets):
  logits = hidden @ W.T
  top = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  return lse - logits[np.arange(len(targets)), targets]


H = np.random.default_rng(0).normal(size=(len(IDS), 2)).astype(np.float32) / 8


@pytest.mark.parametrize("targets", [np.array(IDS), IDS], ids=["int64", "list"])
def test_loss_targets_use_the_true_64_bit_values(run, targets):
  table = ne.EmbeddingTable.from_pretrained(W)
  # A positional batch axis, so plain targets fit it.
  hidden = pz.nx.wrap(H.T).tag_prefix("embedding")

  def losses(policy, **kwargs):
    f = lambda t: (
      ne.decode_cross_entropy(  # noqa: E731
        t, hidden, targets, reduction="none", out_of_range=policy, **kwargs
      ).data_array
    )
    return np.asarray(closed(run, f, table))

  np.testing.assert_allclose(
    losses("clip"), naive_losses(H, clip_ref(IDS)), rtol=1e-5
  )
  np.testing.assert_allclose(
    losses("wrap"), naive_losses(H, wrap_ref(IDS)), rtol=1e-5
  )
  filled = losses("fill")
  assert np.isnan(filled[[0, 1, 2, 4, 5]]).all()
  np.testing.assert_allclose(filled[3], naive_losses(H, [3] * 6)[3], rtol=1e-5)
  with pytest.raises(IndexError, match=f"id {BIG} at position \\(0,\\)"):
    losses("error")
  # Masked-out targets are exempt from "error", however wide.
  where = np.array([False, False, False, True, False, False])
  only = losses("error", where=where)
  np.testing.assert_allclose(
    only, np.where(where, naive_losses(H, [3] * 6), 0.0), rtol=1e-5
  )


# ------------------------------------------------------------ pooled lookups

FLAT = [BIG, 2, 2**40, -1, 3]
STARTS = np.array([0, 2, 4])


def bag_sums(rows):
  """Sums of rows ``rows`` over the bags of `STARTS` (as numpy)."""
  rows = list(rows)
  return np.stack(
    [W[rows[0:2]].sum(0), W[rows[2:4]].sum(0), W[rows[4:]].sum(0)]
  )


@pytest.mark.parametrize("ids", [np.array(FLAT), FLAT], ids=["int64", "list"])
def test_ragged_bags_use_the_true_64_bit_values(run, ids):
  table = ne.EmbeddingTable.from_pretrained(W)

  def pooled(policy, **kwargs):
    f = lambda t: (
      ne.pooled_lookup(  # noqa: E731
        t, ids, offsets=STARTS, mode="sum", out_of_range=policy, **kwargs
      )
      .untag("bag", "embedding")
      .unwrap()
    )
    return np.asarray(closed(run, f, table))

  np.testing.assert_allclose(pooled("clip"), bag_sums(clip_ref(FLAT)))
  np.testing.assert_allclose(pooled("wrap"), bag_sums(wrap_ref(FLAT)))
  filled = pooled("fill")
  assert np.isnan(filled[:2]).all()
  np.testing.assert_array_equal(filled[2], W[3])
  with pytest.raises(IndexError, match=f"id {BIG} at position \\(0,\\)"):
    pooled("error")


def test_ids_after_the_last_offset_are_exempt_from_error(run):
  table = ne.EmbeddingTable.from_pretrained(W)
  ids = np.array([1, 2, BIG])
  f = lambda t: (
    ne.pooled_lookup(  # noqa: E731
      t,
      ids,
      offsets=np.array([0, 2]),
      mode="sum",
      include_last_offset=True,
      out_of_range="error",
    )
    .untag("bag", "embedding")
    .unwrap()
  )
  np.testing.assert_array_equal(closed(run, f, table), W[[1, 2]].sum(0)[None])


def test_fixed_bags_of_host_ids_use_the_true_64_bit_values():
  # A NamedArray whose data is a numpy array (pz.nx.wrap would convert it).
  tokens = pz.nx.NamedArray(
    named_axes={"bag": 2, "member": 2},
    data_array=np.array([[BIG, 2], [-(2**40), 4]]),
  )
  table = ne.EmbeddingTable.from_pretrained(W)
  for policy, ref in [("clip", clip_ref), ("wrap", wrap_ref)]:
    out = ne.EmbeddingBag(table, over="member", mode="sum", out_of_range=policy)
    rows = ref([BIG, 2, -(2**40), 4])
    np.testing.assert_array_equal(
      out(tokens).untag("bag", "embedding").unwrap(),
      [W[rows[:2]].sum(0), W[rows[2:]].sum(0)],
    )
  with pytest.raises(IndexError, match=f"id {BIG} at position \\(0, 0\\)"):
    ne.pooled_lookup(table, tokens, over="member", out_of_range="error")


# -------------------------------------------------------------- inspection


@pytest.mark.parametrize(
  "query", [np.array(BIG), np.int64(BIG), BIG], ids=["0d", "scalar", "int"]
)
def test_inspection_queries_beyond_int32_are_an_index_error(query):
  table = ne.EmbeddingTable.from_pretrained(W)
  with pytest.raises(IndexError, match=f"Row {BIG} is outside"):
    ne.nearest(table, query, k=1)
  with pytest.raises(IndexError, match=f"Row {BIG} is outside"):
    ne.similarity(table, query, 1)


# ------------------------------------------- what a traced int64 array does


def test_jit_arguments_are_converted_by_jax_before_named_embed_sees_them():
  """Documented in docs/semantics.md: passed as a jit argument, an int64
  array reaches named_embed as int32 (its low 32 bits). If this ever
  changes, update the docs."""
  table = ne.EmbeddingTable.from_pretrained(W)
  f = jax.jit(lambda t, i: ne.lookup(t, i).data_array)
  np.testing.assert_array_equal(f(table, np.array([BIG])), W[[1]])
  assert jnp.asarray(np.array([BIG])).dtype == jnp.int32


def test_with_x64_on_traced_int64_ids_keep_their_values():
  """The documented remedy: with x64 on, int64 ids reach the kernel whole,
  even as jit arguments."""
  with jax.enable_x64(True):
    table = ne.EmbeddingTable.from_pretrained(W)
    ids = jnp.asarray(np.array(IDS))
    assert ids.dtype == jnp.int64
    f = jax.jit(
      lambda t, i, policy: ne.lookup(t, i, out_of_range=policy).data_array,
      static_argnames="policy",
    )
    np.testing.assert_array_equal(f(table, ids, "clip"), W[clip_ref(IDS)])
    np.testing.assert_array_equal(f(table, ids, "wrap"), W[wrap_ref(IDS)])
    with pytest.raises(Exception, match=f"id {BIG} at position \\(0,\\)"):
      f(table, ids, "error").block_until_ready()
