"""Vocabulary-parallel lookup, decode and loss on 8 CPU devices.

Run by tests/sharding_test.py in a subprocess (8 devices must be configured
before JAX starts). Every result is compared with the dense single-device
computation in numpy, values and gradients.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from penzai import pz

import named_embed as ne

D = 4
RULES = {"vocabulary": "model", "batch": "data"}
MESHES = [(1, 8), (2, 4), (4, 2)]
TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def setup(shape, kind, vocab, seed=0):
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(TYPES[kind],) * 2)
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(vocab, D)).astype(np.float32)
  table = ne.EmbeddingTable.from_pretrained(w, freeze=False)
  table = pz.freeze_params(table.padded_to_multiple(shape[1]))
  table = ne.shard(table, mesh, RULES)
  return mesh, w, table


def tag(mesh, array, *names):
  return ne.shard(pz.nx.wrap(array).tag(*names), mesh, RULES)


def ids_for(vocab, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(4, 6))
  ids[0, 0], ids[1, 1], ids[2, 2] = -1, vocab, vocab + 1  # padded range too
  return ids


def dense_rows(w, ids, policy):
  vocab = w.shape[0]
  if policy == "clip":
    return w[np.clip(ids, 0, vocab - 1)]
  if policy == "wrap":
    return w[np.mod(ids, vocab)]
  rows = w[np.clip(ids, 0, vocab - 1)].copy()
  rows[(ids < 0) | (ids >= vocab)] = np.nan
  return rows


def dense_row_grad(w, ids, cotangent, policy):
  vocab = w.shape[0]
  grad = np.zeros_like(w)
  for index, i in np.ndenumerate(ids):
    if policy == "clip":
      i = min(max(i, 0), vocab - 1)
    elif policy == "wrap":
      i = i % vocab
    elif not 0 <= i < vocab:
      continue
    grad[i] += cotangent[index]
  return grad


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("vocab", [16, 13])
@pytest.mark.parametrize("policy", ["fill", "clip", "wrap"])
def test_lookup_and_gradient_equal_dense(kind, shape, vocab, policy):
  mesh, w, table = setup(shape, kind, vocab)
  ids = ids_for(vocab)
  tokens = tag(mesh, ids, "batch", "seq")
  cotangent = np.random.default_rng(2).normal(size=(4, 6, D)).astype(np.float32)

  def rows(table, tokens):
    out = ne.lookup(table, tokens, out_of_range=policy)
    return out.order_as("batch", "seq", "embedding").data_array

  def loss(table, tokens):
    return jnp.nansum(rows(table, tokens) * cotangent)

  np.testing.assert_allclose(
    jax.jit(rows)(table, tokens), dense_rows(w, ids, policy), rtol=1e-6
  )
  grad = jax.jit(jax.grad(loss))(table, tokens).rows_array()
  assert grad.sharding.spec[0] == "model"
  expected = dense_row_grad(w, ids, cotangent, policy)
  np.testing.assert_allclose(np.asarray(grad)[:vocab], expected, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(grad)[vocab:], 0.0)


@pytest.mark.parametrize("kind", TYPES)
def test_error_policy_on_a_sharded_table_reports_and_fills(kind, caplog):
  # Raising in one device's callback would leave the other devices waiting
  # in the all-reduce until XLA aborts the process: on a mesh, bad ids are
  # logged as an error naming them, and their rows are NaN.
  mesh, w, table = setup((2, 4), kind, 13)
  ids = ids_for(13)
  tokens = tag(mesh, ids, "batch", "seq")
  f = jax.jit(
    lambda t, i: (
      ne.lookup(t, i, out_of_range="error")
      .order_as("batch", "seq", "embedding")
      .data_array
    )
  )
  with caplog.at_level("ERROR", logger="named_embed"):
    out = np.asarray(jax.block_until_ready(f(table, tokens)))
  assert "id 13 at position (1, 1)" in caplog.text
  np.testing.assert_array_equal(out, dense_rows(w, ids, "fill"))
  good = np.arange(24).reshape(4, 6) % 13
  np.testing.assert_array_equal(
    np.asarray(f(table, tag(mesh, good, "batch", "seq"))), w[good]
  )
  with pytest.raises(IndexError, match=r"id 13 at position \(1, 1\)"):
    ne.lookup(table, tokens, out_of_range="error")  # eager: raises first


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("vocab", [16, 13])
def test_decode_equals_dense_and_masks_padding(kind, shape, vocab):
  mesh, w, table = setup(shape, kind, vocab)
  h = np.random.default_rng(3).normal(size=(4, 6, D)).astype(np.float32)
  hidden = tag(mesh, h, "batch", "seq", "embedding")

  def logits(table, hidden):
    out = ne.decode(table, hidden)
    return out.order_as("batch", "seq", "vocabulary").data_array

  out = np.asarray(jax.jit(logits)(table, hidden))
  np.testing.assert_allclose(out[..., :vocab], h @ w.T, rtol=1e-5, atol=1e-6)
  assert np.isneginf(out[..., vocab:]).all()
  real = np.arange(table.num_rows) < vocab

  def total(table, hidden):
    return jnp.sum(jnp.where(real, logits(table, hidden), 0.0))

  grad = jax.jit(jax.grad(total))(table, hidden)
  assert grad.rows_array().sharding.spec[0] == "model"
  np.testing.assert_allclose(
    np.asarray(grad.rows_array())[:vocab],
    np.broadcast_to(h.reshape(-1, D).sum(0), (vocab, D)),
    rtol=1e-5,
  )


def dense_loss(w, h, targets, mask):
  z = h @ w.T
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  nll = lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]
  return np.sum(np.where(mask, nll, 0.0)) / mask.sum()


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("vocab", [16, 13])
def test_fused_loss_and_tied_gradients_equal_dense(kind, shape, vocab):
  mesh, w, table = setup(shape, kind, vocab)
  ids = np.random.default_rng(4).integers(0, vocab, size=(4, 6))
  targets = np.roll(ids, 1, axis=1)
  mask = np.ones_like(ids, bool)
  mask[0, :2] = False
  bad = targets.copy()
  bad[0, 0] = vocab + 2  # masked: contributes nothing, under any policy

  def loss(table, tokens, target_ids, where):
    hidden = ne.lookup(table, tokens)
    return ne.decode_cross_entropy(
      table, hidden, target_ids, where=where, chunk_size=3
    )

  args = (
    tag(mesh, ids, "batch", "seq"),
    tag(mesh, bad, "batch", "seq"),
    tag(mesh, mask, "batch", "seq"),
  )
  f = jax.jit(jax.value_and_grad(loss))
  value, grad = f(table, *args)
  np.testing.assert_allclose(
    value, dense_loss(w, w[ids], targets, mask), rtol=1e-5
  )

  def reference(w):
    z = w[ids] @ w.T
    nll = (
      jax.nn.logsumexp(z, -1)
      - jnp.take_along_axis(z, targets[..., None], -1)[..., 0]
    )
    return jnp.sum(jnp.where(mask, nll, 0.0)) / np.float32(mask.sum())

  expected = jax.grad(reference)(jnp.asarray(w))
  rows = grad.rows_array()
  assert rows.sharding.spec[0] == "model"
  np.testing.assert_allclose(
    np.asarray(rows)[:vocab], expected, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(rows)[vocab:], 0.0)
  local_rows = table.num_rows // shape[1]
  assert {s.data.shape for s in rows.addressable_shards} == {(local_rows, D)}
  assert {s.data.shape for s in table.rows_array().addressable_shards} == {
    (local_rows, D)
  }
  check_hlo(f.lower(table, *args).compile().as_text(), table.num_rows)


def check_hlo(text: str, num_rows: int):
  """No all-gather of the whole table; no collective inside a loop body."""
  for line in text.splitlines():
    if "all-gather(" in line:
      assert f"[{num_rows},{D}]" not in line, line
  bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", text))
  computations = re.split(r"\n(?=%?[\w.\-]+ [\(\{]|ENTRY)", text)
  for computation in computations:
    name = computation.split(" ", 1)[0].lstrip("%")
    if name in bodies:
      assert "all-reduce" not in computation, name
      assert "all-gather" not in computation, name


@pytest.mark.parametrize("kind", TYPES)
def test_sharded_init_never_builds_the_full_table(kind):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(TYPES[kind],) * 2)
  table = ne.sharded_init(
    ne.EmbeddingTable.from_config,
    mesh,
    RULES,
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=13,
    embedding_axes={"embedding": D},
    pad_to_multiple=4,
  )
  rows = table.rows_array()
  assert table.vocab_size == 13 and table.num_rows == 16
  assert {s.data.shape for s in rows.addressable_shards} == {(4, D)}
  reference = ne.EmbeddingTable.from_config(
    name="e",
    init_base_rng=jax.random.key(0),
    vocab_size=13,
    embedding_axes={"embedding": D},
    pad_to_multiple=4,
  )
  np.testing.assert_array_equal(np.asarray(rows), reference.rows_array())


@pytest.mark.parametrize("kind", TYPES)
def test_shard_constrains_activations_inside_jit(kind):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(TYPES[kind],) * 2)
  x = pz.nx.wrap(np.ones((4, 8), np.float32)).tag("batch", "vocabulary")

  @jax.jit
  def f(x):
    return ne.shard(x * 2, mesh, RULES).data_array

  with jax.set_mesh(mesh):  # Explicit axes: jit must know the mesh
    out = f(x)
  assert out.sharding.spec == jax.sharding.PartitionSpec("data", "model")


@pytest.mark.parametrize("kind", TYPES)
def test_replicated_table_with_data_parallel_tokens(kind):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(TYPES[kind],) * 2)
  rules = {"batch": ("data", "model")}
  w = np.random.default_rng(5).normal(size=(13, D)).astype(np.float32)
  table = pz.freeze_params(ne.EmbeddingTable.from_pretrained(w, freeze=False))
  table = ne.shard(table, mesh, rules)
  ids = np.random.default_rng(6).integers(0, 13, size=(8, 3))
  tokens = ne.shard(pz.nx.wrap(ids).tag("batch", "seq"), mesh, rules)
  targets = ne.shard(
    pz.nx.wrap(np.roll(ids, 1)).tag("batch", "seq"), mesh, rules
  )

  def loss(table):
    hidden = ne.lookup(table, tokens)
    return ne.decode_cross_entropy(table, hidden, targets, chunk_size=4)

  value, grad = jax.jit(jax.value_and_grad(loss))(table)
  mask = np.ones(ids.shape, bool)
  np.testing.assert_allclose(
    value, dense_loss(w, w[ids], np.roll(ids, 1), mask), rtol=1e-5
  )

  def reference(w):
    z = w[ids] @ w.T
    picked = jnp.take_along_axis(z, np.roll(ids, 1)[..., None], -1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(z, -1) - picked)

  np.testing.assert_allclose(
    grad.rows_array(), jax.grad(reference)(jnp.asarray(w)), rtol=1e-4, atol=1e-6
  )


@pytest.mark.parametrize("kind", TYPES)
def test_lookup_with_embedding_and_tokens_on_the_same_mesh_axis(kind):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(TYPES[kind],) * 2)
  rules = {"embedding": "data", "batch": "data"}  # FSDP-style table
  w = np.arange(16.0 * D, dtype=np.float32).reshape(16, D)
  table = ne.shard(ne.EmbeddingTable.from_pretrained(w), mesh, rules)
  ids = np.arange(6).reshape(2, 3)
  tokens = ne.shard(pz.nx.wrap(ids).tag("batch", "seq"), mesh, rules)
  out = jax.jit(lambda t, i: ne.lookup(t, i).data_array)(table, tokens)
  np.testing.assert_array_equal(out, w[ids])


def test_loss_refuses_vocabulary_and_tokens_on_the_same_mesh_axis():
  mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes
  rules = {"vocabulary": "data", "batch": "data"}
  w = np.ones((16, D), np.float32)
  table = ne.shard(ne.EmbeddingTable.from_pretrained(w), mesh, rules)
  hidden = ne.shard(
    pz.nx.wrap(np.ones((4, D), np.float32)).tag("batch", "embedding"),
    mesh,
    rules,
  )
  targets = ne.shard(pz.nx.wrap(np.arange(4)).tag("batch"), mesh, rules)
  with pytest.raises(NotImplementedError, match=r"both split over mesh axes"):
    jax.jit(ne.decode_cross_entropy)(table, hidden, targets)
