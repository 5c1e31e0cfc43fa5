"""Resizing vocabulary-sharded tables on 8 CPU devices.

Run by tests/sharding_test.py in a subprocess (8 devices must be configured
before JAX starts). A resized table must be placed like the input (same
mesh, same spec, the row count still divisible by the vocabulary shards),
keep every old row bit for bit, and work in lookups, decodes and the fused
loss.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from penzai import pz

import named_embed as ne

D = 4
V = 13
RULES = {"vocabulary": "model", "batch": "data"}
TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def sharded_table(shape, kind):
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(TYPES[kind],) * 2)
  w = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32)
  w[0] = 100.0  # the pad row: a mean that counted it would show
  vocab = ne.Vocabulary(
    ["<pad>", *(f"t{i}" for i in range(V - 1))], pad="<pad>"
  )
  table = ne.EmbeddingTable.from_pretrained(w, freeze=False, name="tok")
  table = table.with_vocabulary(vocab).padded_to_multiple(shape[1])
  return mesh, w, ne.shard(table, mesh, RULES)


def check_placed_like(new, old, mesh):
  shards = mesh.shape["model"]
  assert new.rows_sharding == old.rows_sharding
  rows = new.rows_array()
  assert rows.sharding.spec == old.rows_array().sharding.spec
  assert rows.sharding.mesh == mesh
  assert new.num_rows % shards == 0
  assert new.embeddings.label == "tok.embeddings"
  assert not new.frozen


@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
@pytest.mark.parametrize("added", [2, 9])  # into the alignment rows; beyond
def test_added_tokens_keep_the_placement(shape, kind, added):
  mesh, w, table = sharded_table(shape, kind)
  tokens = [f"new{i}" for i in range(added)]
  bigger = table.with_added_tokens(tokens)
  check_placed_like(bigger, table, mesh)
  assert bigger.vocab_size == V + added
  rows = np.asarray(bigger.rows_array())
  assert rows[:V].tobytes() == w.tobytes()
  mean = w[1:].mean(axis=0, dtype=np.float32)
  np.testing.assert_allclose(
    rows[V : V + added], np.tile(mean, (added, 1)), rtol=1e-6
  )
  assert not rows[V + added :].any()  # alignment rows
  ids = np.array([[1, V, V + added - 1]])
  looked = ne.lookup(bigger, pz.nx.wrap(ids).tag("batch", "seq"))
  np.testing.assert_allclose(
    np.asarray(looked.order_as("batch", "seq", "embedding").data_array)[0],
    rows[ids[0]],
  )


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_resized_table_trains_in_the_fused_loss(kind):
  mesh, w, table = sharded_table((2, 4), kind)
  grown = table.with_added_tokens(["<tool>", "</tool>"])
  shrunk = grown.resized(6)
  check_placed_like(shrunk, table, mesh)
  assert shrunk.vocabulary.tokens == table.vocabulary.tokens[:6]
  assert np.asarray(shrunk.rows_array())[:6].tobytes() == w[:6].tobytes()
  hidden = ne.shard(
    pz.nx.wrap(np.ones((2, D), np.float32)).tag("batch", "embedding"),
    mesh,
    RULES,
  )
  targets = ne.shard(pz.nx.wrap(np.array([V, V + 1])).tag("batch"), mesh, RULES)

  @jax.jit
  def loss_and_grad(rows):
    def loss(rows):
      bound = pz.bind_variables(pz.unbind_params(grown)[0], [rows])
      return ne.decode_cross_entropy(bound, hidden, targets)

    return jax.value_and_grad(loss)(rows)

  value, grad = loss_and_grad(pz.unbind_params(grown)[1][0].freeze())
  assert np.isfinite(float(value))
  grad = np.asarray(grad.value.order_as("vocabulary", "embedding").data_array)
  assert np.abs(grad[V : V + 2]).sum() > 0  # the new tokens learn
  assert not grad[V + 2 :].any()  # alignment rows never do
