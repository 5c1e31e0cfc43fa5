"""equinox: `named_embed.equinox.Embedding` against the penzai path.

The model zoo and the penzai reference are tests/nnx_test.py's: a model
holding one table of every kind tied and one untied is trained with the
equinox recipe (`eqx.filter_value_and_grad`, optax with weight decay over
``eqx.filter(model, eqx.is_inexact_array)``, `eqx.apply_updates`),
eagerly and under `eqx.filter_jit`; the losses and trained arrays must
agree with the penzai path's, and frozen arrays (weight decay
notwithstanding) must be bit for bit what they were.
"""

from __future__ import annotations

import importlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from nnx_test import (
  KINDS,
  OPTIMIZER,
  D,
  V,
  check_trained,
  frozen_arrays,
  initial_arrays,
  make,
  model_inputs,
  model_loss,
  model_tables,
  module_calls,
  one_device_reference,
)
from penzai import pz

import named_embed as ne
from named_embed import equinox as ne_eqx
from named_embed._src.tools import foreign_modules


class Model(eqx.Module):
  """One `ne_eqx.Embedding` per table of ``model_tables``."""

  embeddings: dict

  def __init__(self, tables: dict):
    self.embeddings = {n: ne_eqx.Embedding(t) for n, t in tables.items()}


def eqx_loss(model: Model, inputs) -> jax.Array:
  calls = {name: module_calls(e) for name, e in model.embeddings.items()}
  return model_loss(calls, inputs)


def eqx_training(model: Model, inputs, steps: int = 2, jit: bool = False):
  """The documented recipe; returns the trained model and the losses."""
  state = OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))

  def step(model, state):
    value, grads = eqx.filter_value_and_grad(eqx_loss)(model, inputs)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      updates, state = OPTIMIZER.update(
        grads, state, eqx.filter(model, eqx.is_inexact_array)
      )
    return eqx.apply_updates(model, updates), state, value

  if jit:
    step = eqx.filter_jit(step)
  losses = []
  for _ in range(steps):
    model, state, value = step(model, state)
    losses.append(float(value))
  return model, losses


def eqx_trained(model: Model) -> dict:
  """``{label: array}`` of every trainable array of the model."""
  found = {}
  for emb in model.embeddings.values():
    for label, array in zip(emb.labels, emb.params):
      assert label not in found, f"{label} is held twice"
      found[label] = np.asarray(array)
  return found


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_every_kind_trains_tied_and_untied_as_the_penzai_path(jit):
  tables = model_tables()
  model, losses = eqx_training(Model(tables), model_inputs(), jit=jit)
  check_trained(
    losses, eqx_trained(model), *one_device_reference(), initial_arrays(tables)
  )
  for name, emb in model.embeddings.items():
    assert type(emb.table) is type(tables[name])
    for got, want in zip(frozen_arrays(emb.table), frozen_arrays(tables[name])):
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(got, want, err_msg=name)


def test_filters_see_the_trainable_arrays_only():
  tables = model_tables()
  model = Model(tables)
  inexact = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
  want = initial_arrays(tables)
  assert sorted(a.size for a in inexact) == sorted(
    a.size for a in want.values()
  )
  for emb in model.embeddings.values():
    assert not any(eqx.is_inexact_array(a) for a in emb.frozen)
    assert all(eqx.is_inexact_array(a) for a in emb.params)


def test_a_tied_embedding_is_one_array_whose_gradient_sums_both_uses():
  table = make("lora", "tied")
  tokens = model_inputs()[0]
  emb = ne_eqx.Embedding(table)

  def loss(emb, through_lookup=True, through_decode=True):
    fixed = jax.lax.stop_gradient(emb)
    h = (emb if through_lookup else fixed)(tokens, out_of_range="clip")
    logits = (emb if through_decode else fixed).attend(h).data_array
    return jnp.sum(logits**2)

  both = eqx.filter_grad(loss)(emb).params
  lookup = eqx.filter_grad(lambda e: loss(e, through_decode=False))(emb)
  decode = eqx.filter_grad(lambda e: loss(e, through_lookup=False))(emb)
  # The penzai path, the two uses together.
  unbound, params = pz.unbind_params(table)

  def reference(values):
    bound = pz.bind_variables(unbound, values)
    h = ne.lookup(bound, tokens, out_of_range="clip")
    return jnp.sum(ne.decode(bound, h).data_array ** 2)

  want = jax.grad(reference)([p.freeze() for p in params])
  for got, one, two, ref in zip(both, lookup.params, decode.params, want):
    assert float(jnp.abs(two).sum()) > 0
    np.testing.assert_allclose(got, one + two, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, ref.value.data_array, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_table_comes_back_bit_for_bit(kind, dtype):
  table = make(kind, "t")
  if dtype != "float32":
    if kind != "frozen":
      return  # one frozen table of each width is enough
    table = ne.EmbeddingTable.from_pretrained(
      jnp.asarray(table.rows_array(), dtype), embedding_axes="e"
    )
  emb = ne_eqx.Embedding(table)
  back = emb.table
  assert type(back) is type(table)
  assert back.static_facts() == table.static_facts()
  assert back.vocabulary == table.vocabulary
  holders = foreign_modules.trainable_holders
  assert [(type(h), h.label) for h in holders(back)] == [
    (type(h), h.label) for h in holders(table)
  ]
  for got, want in zip(
    jax.tree.leaves(pz.freeze_params(back)),
    jax.tree.leaves(pz.freeze_params(table)),
  ):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(
      np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8)
    )
  for array in emb.frozen:
    assert not jnp.issubdtype(array.dtype, jnp.inexact)


def test_the_calls_are_the_operations_with_their_options():
  table = make("rows", "t")
  emb = ne_eqx.Embedding(table)
  tokens, targets, bags = model_inputs()
  hidden = pz.nx.wrap(np.ones((2, 4, D), np.float32)).tag("batch", "seq", "e")
  pairs = [
    (
      emb(tokens, out_of_range="wrap"),
      ne.lookup(table, tokens, out_of_range="wrap"),
    ),
    (emb.attend(hidden, soft_cap=2.0), ne.decode(table, hidden, soft_cap=2.0)),
    (
      emb.cross_entropy(hidden, targets, reduction="none"),
      ne.decode_cross_entropy(table, hidden, targets, reduction="none"),
    ),
    (
      emb.pooled(bags, over="member", mode="sum"),
      ne.pooled_lookup(table, bags, over="member", mode="sum"),
    ),
  ]
  for got, want in pairs:
    assert got.named_shape == want.named_shape
    np.testing.assert_array_equal(
      got.data_array, want.order_as(*got.named_shape).data_array
    )


def test_filter_jit_traces_once_over_training_steps():
  table = make("rows", "t")
  tokens, targets, _ = model_inputs()
  optimizer = optax.adamw(0.1, weight_decay=0.5)
  emb = ne_eqx.Embedding(table)
  state = optimizer.init(eqx.filter(emb, eqx.is_inexact_array))
  traces = []

  @eqx.filter_jit
  def step(emb, state):
    traces.append(1)

    def loss(emb):
      return emb.cross_entropy(emb(tokens, out_of_range="clip"), targets)

    value, grads = eqx.filter_value_and_grad(loss)(emb)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      updates, state = optimizer.update(
        grads, state, eqx.filter(emb, eqx.is_inexact_array)
      )
    return eqx.apply_updates(emb, updates), state, value

  losses = []
  for _ in range(3):
    emb, state, value = step(emb, state)
    losses.append(float(value))
  assert len(traces) == 1 and losses[2] < losses[0]
  np.testing.assert_array_equal(
    emb.table.base.rows_array(), table.base.rows_array()
  )


def test_raw_tables_misbehave_silently_and_check_tables_says_so():
  trainable = make("float", "raw")
  frozen = make("frozen", "f")

  class Raw(eqx.Module):
    layers: list
    frozen: ne.EmbeddingTable

  model = Raw([ne.EmbeddingLookup(trainable)], frozen)

  def loss(model):
    ids = jnp.array([1, 2])
    looked = (
      model.layers[0](ids).data_array + ne.lookup(model.frozen, ids).data_array
    )
    return jnp.sum(looked**2)

  # The premises: no gradient for the parameter; weight decay moves the
  # frozen rows.
  grads = eqx.filter_grad(loss)(model)
  assert jax.tree.leaves(grads.layers) == []
  optimizer = optax.adamw(0.1, weight_decay=0.5)
  params = eqx.filter(model, eqx.is_inexact_array)
  with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
  moved = eqx.apply_updates(model, updates).frozen.rows_array()
  assert not np.array_equal(moved, frozen.rows_array())
  with pytest.raises(TypeError) as info:
    ne_eqx.check_tables(model)
  message = str(info.value)
  assert "2 named_embed tables outside an ne_eqx.Embedding" in message
  assert "`model.layers[0].table`: an EmbeddingTable holding" in message
  assert "`model.frozen`: a frozen EmbeddingTable" in message
  assert "weight decay" in message and "ne_eqx.Embedding(table)" in message
  fine = [ne_eqx.Embedding(trainable), {"f": ne_eqx.Embedding(frozen)}]
  assert ne_eqx.check_tables(fine) is None


def test_unbound_tables_and_non_tables_are_refused():
  slot = ne.EmbeddingTable.from_config(
    name="s", init_base_rng=None, vocab_size=V, embedding_axes={"e": 2}
  )
  with pytest.raises(ValueError, match=r"'s.embeddings' is unbound"):
    ne_eqx.Embedding(slot)
  with pytest.raises(TypeError, match=r"ne_eqx.Embedding: `table` must be"):
    ne_eqx.Embedding(jnp.ones((4, 2)))


def test_importing_without_equinox_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "equinox", None)
  monkeypatch.delitem(sys.modules, "named_embed.equinox")
  with pytest.raises(ImportError, match=r"pip install named_embed\[equinox\]"):
    importlib.import_module("named_embed.equinox")
