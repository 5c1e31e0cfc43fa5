"""Pooled lookups on 8 CPU devices: vocabulary-parallel, data-parallel, FSDP.

Run by tests/sharding_test.py in a subprocess (8 devices must be configured
before JAX starts). Every result is compared with a dense take-then-reduce
on one device (values, the table's gradient and the weights' gradient),
and the compiled HLO of the vocabulary-parallel case is checked: no
all-gather of the table, no collective inside a loop.
"""

from __future__ import annotations

import functools
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


# ------------------------------------------------------------ every kind

KIND_NAMES = ("float", "int8", "int4", "lora", "lora_int4", "rows")
KA = np.random.default_rng(9).normal(size=(16, 2)).astype(np.float32)


def kind_table(kind, w, multiple):
  """A table of ``kind`` over ``w`` (padded to ``multiple`` rows); LoRA
  with a non-zero ``A``."""
  if kind == "float":
    table = ne.EmbeddingTable.from_pretrained(w, freeze=False, name="embed")
    return table.padded_to_multiple(multiple)
  base = ne.EmbeddingTable.from_pretrained(w).padded_to_multiple(multiple)
  if kind == "int8":
    return base.quantized("int8")
  if kind == "int4":
    return base.quantized("int4", group_size=2)
  if kind == "rows":
    return base.with_trainable_rows([1, 5, 12], name="r")
  if kind == "lora_int4":
    base = base.quantized("int4", group_size=2)
  lora = base.with_lora(2, 3.0, name="e", init_base_rng=jax.random.key(4))
  a = KA[: base.num_rows]
  lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
  return lora


def pooled_values_and_grads(table, tokens, weights, cot, offsets=None, **kw):
  """Jitted pooled values and the gradients of ``sum(pooled * cot)`` with
  respect to the table's parameters and the weights."""
  unbound, params = pz.unbind_params(table)
  values = [p.freeze() for p in params]

  def loss(values, weights, unbound, tokens, offsets):
    bound = pz.bind_variables(unbound, values)
    out = ne.pooled_lookup(
      bound, tokens, weights=weights, offsets=offsets, **kw
    )
    order = [n for n in out.named_shape if n != "embedding"]
    x = out.order_as(*order, "embedding").data_array
    return jnp.sum(x * cot), x

  f = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
  args = (values, weights, unbound, tokens, offsets)
  (d_values, d_weights), out = f(*args)
  return out, d_values, d_weights, f.lower(*args).compile().as_text()


def assert_same(got, want):
  out, d_values, d_weights, _ = got
  want_out, want_values, want_weights, _ = want
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  assert len(d_values) == len(want_values)
  for g, w in zip(d_values, want_values):
    np.testing.assert_allclose(
      np.asarray(g.value.data_array),
      np.asarray(w.value.data_array),
      rtol=1e-4,
      atol=1e-5,
      err_msg=g.label,
    )
  if want_weights is not None:
    np.testing.assert_allclose(d_weights, want_weights, rtol=1e-5, atol=1e-5)


def check_kind_hlo(text: str):
  """No collective inside a loop body (the vocabulary-parallel kernel
  reduces each device's bags before one all-reduce)."""
  bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", text))
  for computation in re.split(r"\n(?=%?[\w.\-]+ [\(\{]|ENTRY)", text):
    if computation.split(" ", 1)[0].lstrip("%") in bodies:
      assert "all-reduce" not in computation
      assert "all-gather" not in computation


KIND_W = np.random.default_rng(10).normal(size=(16, D)).astype(np.float32)
KIND_IDS = np.random.default_rng(11).integers(0, 13, size=(4, 7))
KIND_COT = np.random.default_rng(12).normal(size=(4, D)).astype(np.float32)
KIND_WEIGHTS = np.random.default_rng(13).normal(size=(4, 7)).astype(np.float32)
FLAT = np.random.default_rng(14).integers(0, 13, size=20)
OFFSETS = np.array([0, 5, 5, 12])


def fixed_case(table_kind, mode):
  """``(table, tokens, weights, kw)`` of fixed-size bags: 13 tokens on 16
  rows (alignment rows), pad members (row 0)."""
  table = kind_table(table_kind, KIND_W[:13], multiple=4)
  tokens = pz.nx.wrap(KIND_IDS).tag("batch", "member")
  weights = KIND_WEIGHTS if mode == "sum" else None
  return table, tokens, weights, dict(over="member", mode=mode, chunk_size=3)


def ragged_case(table_kind, aligned):
  """``(table, ids, weights, kw)`` of ragged bags: "sum" with weights and
  ``scale_grad_by_freq`` on 16 rows, or "max" with alignment rows."""
  if aligned:
    table = kind_table(table_kind, KIND_W[:13], multiple=8)
    return table, FLAT, None, dict(mode="max")
  table = kind_table(table_kind, KIND_W, multiple=1)
  weights = KIND_WEIGHTS.reshape(-1)[:20]
  return table, FLAT, weights, dict(mode="sum", scale_grad_by_freq=True)


@functools.cache
def one_device(layout, table_kind, variant):
  """The same call on one device (computed once for both mesh kinds)."""
  if layout == "fixed":
    table, tokens, weights, kw = fixed_case(table_kind, variant)
    return pooled_values_and_grads(table, tokens, weights, KIND_COT, **kw)
  table, ids, weights, kw = ragged_case(table_kind, variant)
  return pooled_values_and_grads(
    table, ids, weights, KIND_COT, offsets=OFFSETS, **kw
  )


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("table_kind", KIND_NAMES)
def test_every_kind_of_table_pools_vocabulary_parallel(table_kind, kind, mode):
  """Fixed-size bags split over "data", rows over "model", alignment rows:
  equal to the same call on one device."""
  mesh = mesh_of((2, 4), kind)
  table, tokens, weights, kw = fixed_case(table_kind, mode)
  sharded = ne.shard(table, mesh, RULES)
  got = pooled_values_and_grads(
    sharded, ne.shard(tokens, mesh, RULES), weights, KIND_COT, **kw
  )
  assert_same(got, one_device("fixed", table_kind, mode))
  check_kind_hlo(got[3])
  for grad in got[1]:  # row-aligned gradients stay split with the rows
    value = grad.value
    if "vocabulary" in value.named_shape:
      spec = value.data_array.sharding.spec
      assert spec[list(value.named_axes).index("vocabulary")] == "model"


@pytest.mark.parametrize("aligned", [False, True], ids=["16_rows", "aligned"])
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("table_kind", KIND_NAMES)
def test_every_kind_of_table_pools_ragged_bags_split_over_rows(
  table_kind, kind, aligned
):
  mesh = mesh_of((1, 8), kind)
  table, ids, weights, kw = ragged_case(table_kind, aligned)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = ne.shard(table, mesh, {"vocabulary": "model"})
  ids, offsets, weights = jax.device_put((ids, OFFSETS, weights), replicated)
  got = pooled_values_and_grads(
    sharded, ids, weights, KIND_COT, offsets=offsets, **kw
  )
  assert_same(got, one_device("ragged", table_kind, aligned))
  check_kind_hlo(got[3])
