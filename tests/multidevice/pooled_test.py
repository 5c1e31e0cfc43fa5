"""Pooled lookups on 8 CPU devices: vocabulary-parallel, data-parallel, FSDP.

Run by tests/sharding_test.py in a subprocess (8 devices must be configured
before JAX starts). Every result is compared with a dense take-then-reduce
on one device (values, the table's gradient and the weights' gradient),
and the compiled HLO of the vocabulary-parallel case is checked: no
all-gather of the table, no collective inside a loop.
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
TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def mesh_of(shape, kind):
  return jax.make_mesh(shape, ("data", "model"), axis_types=(TYPES[kind],) * 2)


def sharded_table(mesh, w, rules, padding_index=None, multiple=1):
  table = ne.EmbeddingTable.from_pretrained(
    w, freeze=False, padding_index=padding_index
  )
  table = pz.freeze_params(table.padded_to_multiple(multiple))
  return ne.shard(table, mesh, rules)


def dense(w, ids, mode, weights=None, padding_index=None):
  """Take-then-reduce on one device: ``ids [B, L]`` -> ``[B, D]``."""
  rows = jnp.take(w, ids, axis=0)
  keep = ids != (-1 if padding_index is None else padding_index)
  if weights is not None:
    rows = rows * weights[..., None]
  if mode == "max":
    picked = jnp.where(keep[..., None], rows, -jnp.inf).max(axis=1)
    return jnp.where(keep.any(axis=1)[:, None], picked, 0.0)
  total = jnp.where(keep[..., None], rows, 0.0).sum(axis=1)
  if mode == "mean":
    total = total / jnp.maximum(keep.sum(axis=1), 1)[:, None].astype(w.dtype)
  return total


def check_hlo(text: str, num_rows: int):
  """No all-gather of the whole table; no collective inside a loop body."""
  for line in text.splitlines():
    if "all-gather(" in line:
      assert f"[{num_rows},{D}]" not in line, line
  bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", text))
  for computation in re.split(r"\n(?=%?[\w.\-]+ [\(\{]|ENTRY)", text):
    if computation.split(" ", 1)[0].lstrip("%") in bodies:
      assert "all-reduce" not in computation
      assert "all-gather" not in computation


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_vocabulary_parallel_bags_equal_dense(kind, shape, mode):
  mesh = mesh_of(shape, kind)
  rng = np.random.default_rng(0)
  vocab = 13  # padded to 16 rows: 2 per device on (1, 8)
  w = rng.normal(size=(vocab, D)).astype(np.float32)
  table = sharded_table(mesh, w, RULES, padding_index=0, multiple=shape[1])
  ids = rng.integers(0, vocab, size=(4, 9))
  ids[1] = 0  # an all-padding bag
  tokens = ne.shard(pz.nx.wrap(ids).tag("batch", "member"), mesh, RULES)
  weights = None
  if mode == "sum":
    weights = rng.normal(size=ids.shape).astype(np.float32)
  cot = rng.normal(size=(4, D)).astype(np.float32)

  def pooled(table, weights):
    out = ne.pooled_lookup(
      table, tokens, over="member", mode=mode, weights=weights, chunk_size=4
    )
    return out.untag("batch", "embedding").unwrap()

  def loss(table, weights):
    return jnp.sum(pooled(table, weights) * cot)

  argnums = (0, 1) if weights is not None else 0
  f = jax.jit(jax.value_and_grad(loss, argnums))
  value, grads = f(table, weights)
  np.testing.assert_allclose(
    jax.jit(pooled)(table, weights),
    dense(w, ids, mode, weights, padding_index=0),
    rtol=1e-5,
    atol=1e-6,
  )

  def reference(w, weights):
    return jnp.sum(dense(w, ids, mode, weights, padding_index=0) * cot)

  want = jax.grad(reference, argnums)(jnp.asarray(w), weights)
  d_table = grads[0] if weights is not None else grads
  rows = d_table.rows_array()
  assert rows.sharding.spec[0] == "model"
  expected = want[0] if weights is not None else want
  np.testing.assert_allclose(np.asarray(rows)[:vocab], expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(rows)[vocab:], 0.0)
  if weights is not None:
    np.testing.assert_allclose(grads[1], want[1], rtol=1e-5, atol=1e-5)
  check_hlo(f.lower(table, weights).compile().as_text(), table.num_rows)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_ragged_bags_on_a_vocabulary_split_table(kind, mode):
  mesh = mesh_of((2, 4), kind)
  rng = np.random.default_rng(1)
  w = rng.normal(size=(16, D)).astype(np.float32)
  table = sharded_table(mesh, w, RULES)
  flat = rng.integers(0, 16, size=20)
  offsets = np.array([0, 5, 5, 12])
  bounds = [(0, 5), (5, 5), (5, 12), (12, 20)]
  cot = rng.normal(size=(4, D)).astype(np.float32)

  def pooled(table, ids, offsets):
    out = ne.pooled_lookup(table, ids, offsets=offsets, mode=mode)
    return out.untag("bag", "embedding").unwrap()

  def loss(table, ids, offsets):
    return jnp.sum(pooled(table, ids, offsets) * cot)

  def reference(w):
    bags = [
      jnp.zeros(D)
      if a == b
      else getattr(jnp, mode)(jnp.take(w, flat[a:b], axis=0), axis=0)
      for a, b in bounds
    ]
    return jnp.stack(bags)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = (table, *jax.device_put((flat, offsets), replicated))
  np.testing.assert_allclose(
    jax.jit(pooled)(*args), reference(jnp.asarray(w)), rtol=1e-5, atol=1e-6
  )
  grad = jax.jit(jax.grad(loss))(*args).rows_array()
  assert grad.sharding.spec[0] == "model"
  want = jax.grad(lambda w: jnp.sum(reference(w) * cot))(jnp.asarray(w))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize(
  "rules",
  [
    {"batch": ("data", "model")},  # replicated table, data parallel
    {"embedding": "data", "batch": "data"},  # FSDP-style table
  ],
  ids=["data_parallel", "fsdp"],
)
def test_tables_split_otherwise_equal_dense(kind, rules):
  mesh = mesh_of((2, 4), kind)
  rng = np.random.default_rng(2)
  w = rng.normal(size=(16, D)).astype(np.float32)
  table = sharded_table(mesh, w, rules)
  ids = rng.integers(0, 16, size=(8, 5))
  tokens = ne.shard(pz.nx.wrap(ids).tag("batch", "member"), mesh, rules)
  cot = rng.normal(size=(8, D)).astype(np.float32)
  for mode in ("mean", "max"):

    def loss(table):
      out = ne.pooled_lookup(
        table, tokens, over="member", mode=mode,
        scale_grad_by_freq=mode == "mean",
      )  # fmt: skip
      return jnp.sum(out.untag("batch", "embedding").unwrap() * cot)

    value, grad = jax.jit(jax.value_and_grad(loss))(table)

    def reference(w):
      return jnp.sum(dense(w, ids, mode) * cot)

    want_value, want = jax.value_and_grad(reference)(jnp.asarray(w))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    if mode == "mean":  # scale_grad_by_freq: counts over the whole batch
      counts = np.bincount(ids.reshape(-1), minlength=16)
      want = np.asarray(want) / np.maximum(counts, 1)[:, None]
    np.testing.assert_allclose(grad.rows_array(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", TYPES)
def test_tied_bag_and_fused_loss_on_a_vocabulary_split_table(kind):
  mesh = mesh_of((2, 4), kind)
  rng = np.random.default_rng(3)
  w = rng.normal(size=(13, D)).astype(np.float32)
  table = sharded_table(mesh, w, RULES, multiple=4)
  bag = ne.EmbeddingBag(table, over="member", mode="mean")
  ids = rng.integers(0, 13, size=(4, 6))
  targets = rng.integers(0, 13, size=4)
  tokens = ne.shard(pz.nx.wrap(ids).tag("batch", "member"), mesh, RULES)
  labels = ne.shard(pz.nx.wrap(targets).tag("batch"), mesh, RULES)

  def loss(bag):
    hidden = bag(tokens)
    return ne.decode_cross_entropy(bag.table, hidden, labels, chunk_size=2)

  value, grad = jax.jit(jax.value_and_grad(loss))(bag)

  def reference(w):
    hidden = jnp.take(w, ids, axis=0).mean(axis=1)
    logits = hidden @ w.T
    picked = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

  want_value, want = jax.value_and_grad(reference)(jnp.asarray(w))
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  rows = grad.table.rows_array()
  assert rows.sharding.spec[0] == "model"
  np.testing.assert_allclose(np.asarray(rows)[:13], want, rtol=1e-4, atol=1e-6)
