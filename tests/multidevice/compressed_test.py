"""Quantised and adapted tables on 8 CPU devices, vocabulary split.

Run by tests/sharding_test.py in a subprocess. Values are compared with
numpy computations on the rows as read (dequantised, adapters added);
gradients with the same computation on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from penzai import pz

import named_embed as ne

V, D = 13, 8
RULES = {"vocabulary": "model", "batch": "data"}
TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
RNG = np.random.default_rng(0)
W = RNG.normal(size=(V, D)).astype(np.float32)
IDS = RNG.integers(0, V, size=(4, 6))
H = RNG.normal(size=(4, 6, D)).astype(np.float32)
A = RNG.normal(size=(16, 2)).astype(np.float32)


def make(kind: str):
  table = ne.EmbeddingTable.from_pretrained(W).padded_to_multiple(4)
  key = jax.random.key(1)
  if kind == "int8":
    return table.quantized("int8")
  if kind == "int4":
    return table.quantized("int4", group_size=4)
  if kind == "rows":
    return table.with_trainable_rows([3, 9, 12], name="r")
  lora = table.quantized("int4").with_lora(2, 3.0, name="e", init_base_rng=key)
  lora.lora_a.value = pz.nx.wrap(A).tag("vocabulary", "rank")
  return lora


def rows_as_read(table) -> np.ndarray:
  read = (
    table.dequantized() if hasattr(table, "dequantized") else table.merged()
  )
  return np.asarray(read.rows_array())[:V]


def losses(table, mesh):
  """``(loss, d loss / d parameters, d loss / d hidden)`` and the decode's
  hidden gradient, with the table and inputs placed on ``mesh`` (or on one
  device when ``mesh`` is None)."""
  place = (lambda x: ne.shard(x, mesh, RULES)) if mesh else (lambda x: x)
  table = place(table)
  unbound, params = pz.unbind_params(table)
  values = [p.freeze() for p in params]
  tokens = place(pz.nx.wrap(IDS).tag("batch", "seq"))
  hidden = place(pz.nx.wrap(H).tag("batch", "seq", "embedding"))

  def loss(values, hidden):
    bound = pz.bind_variables(unbound, values)
    fused = ne.decode_cross_entropy(bound, hidden, tokens, chunk_size=2)
    logits = ne.decode(bound, hidden).order_as("batch", "seq", "vocabulary")
    real = jnp.arange(logits.data_array.shape[-1]) < V  # not alignment rows
    z = jnp.where(real, logits.data_array, 0.0)
    return fused + jnp.sum(jnp.sin(z))

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
    values, hidden
  )
  return value, grads, table, tokens, hidden


@pytest.mark.parametrize("mesh_kind", TYPES)
@pytest.mark.parametrize("kind", ["int8", "int4", "rows", "lora_int4"])
def test_sharded_lookup_decode_loss_and_gradients(mesh_kind, kind):
  mesh = jax.make_mesh(
    (2, 4), ("data", "model"), axis_types=(TYPES[mesh_kind],) * 2
  )
  rows = rows_as_read(make(kind))
  value, grads, table, tokens, hidden = losses(make(kind), mesh)
  frozen = pz.freeze_params(table)

  out = jax.jit(
    lambda t, i: ne.lookup(t, i).order_as("batch", "seq", "embedding")
  )(frozen, tokens)
  np.testing.assert_allclose(np.asarray(out.data_array), rows[IDS], rtol=1e-6)
  logits = jax.jit(
    lambda t, h: ne.decode(t, h).order_as("batch", "seq", "vocabulary")
  )(frozen, hidden)
  np.testing.assert_allclose(
    np.asarray(logits.data_array)[..., :V], H @ rows.T, rtol=1e-5, atol=1e-5
  )
  assert np.isneginf(np.asarray(logits.data_array)[..., V:]).all()

  want_value, want_grads, *_ = losses(make(kind), None)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5
    )
  if kind == "lora_int4":  # A's gradient stays split with A's rows
    (grad_a, _), _ = grads
    assert grad_a.value.data_array.sharding.spec[0] == "model"


def test_parts_are_placed_with_their_rows():
  mesh = jax.make_mesh(
    (2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2
  )
  q = ne.shard(make("int4"), mesh, RULES)
  assert q.rows_sharding.spec == jax.sharding.PartitionSpec("model", None)
  assert q.codes.data_array.sharding.spec[0] == "model"
  assert q.scales.data_array.sharding.spec[0] == "model"
  lora = ne.shard(make("lora_int4"), mesh, RULES)
  assert lora.rows_sharding.spec[0] == "model"
  assert lora.lora_a.value.data_array.sharding.spec[0] == "model"
  assert (
    lora.lora_b.value.data_array.sharding.spec
    == jax.sharding.PartitionSpec(None, None)
  )


def test_a_sharded_quantized_loss_never_gathers_the_table():
  mesh = jax.make_mesh(
    (2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2
  )
  q = ne.shard(make("int8"), mesh, RULES)
  tokens = ne.shard(pz.nx.wrap(IDS).tag("batch", "seq"), mesh, RULES)
  hidden = ne.shard(pz.nx.wrap(H).tag("batch", "seq", "embedding"), mesh, RULES)

  def loss(q, hidden):
    return ne.decode_cross_entropy(q, hidden, tokens, chunk_size=2)

  grad = jax.jit(jax.grad(loss, argnums=1))
  text = grad.lower(q, hidden).compile().as_text()
  assert "all-gather" not in text
  decode = jax.jit(lambda q, h: ne.decode(q, h).data_array)
  assert "all-gather" not in decode.lower(q, hidden).compile().as_text()
