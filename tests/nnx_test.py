"""flax nnx: `named_embed.nnx.Embedding` against the penzai path.

The reference is the penzai way of training a table: `pz.unbind_params`,
`jax.grad` of the parameters' values and optax. A model holding one table
of every kind tied (lookups and ``attend`` on one table) and one untied
(its lookups feed the fused loss of a separate float output table) is
trained both ways with optax's SGD and weight decay (frozen arrays must
still never change), eagerly and under `nnx.jit`; the losses and the
trained arrays must agree, every trainable array must have moved, and
every frozen array must be bit for bit what it was.

The model zoo and the penzai reference (the first section) are shared
with tests/equinox_test.py and tests/multidevice/foreign_modules_test.py.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from penzai import pz

import named_embed as ne
from named_embed import nnx as ne_nnx
from named_embed._src.tools import foreign_modules

# ------------------------------------------- the model zoo and the reference

V, D = 12, 4
KINDS = ("float", "frozen", "int8", "int4", "lora", "rows")
# Weight decay: frozen arrays must not change even so. SGD, not Adam: its
# steps are linear in the gradients (Adam's hide a scale).
OPTIMIZER = optax.chain(
  optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)
)


def make(kind: str, name: str, vocab: int = V) -> Any:
  """A table of ``kind`` whose parameters are labelled ``name.*``."""
  weights = np.random.default_rng(vocab).normal(size=(vocab, D))
  words = ne.Vocabulary([f"w{i}" for i in range(vocab)])
  base = ne.EmbeddingTable.from_pretrained(
    weights.astype(np.float32), embedding_axes="e", padding_index=0
  ).with_vocabulary(words)
  key = jax.random.key(len(name))
  if kind == "float":
    return ne.EmbeddingTable.from_config(
      name=name, init_base_rng=key, vocab_size=vocab, embedding_axes={"e": D}
    ).with_vocabulary(words)
  if kind == "frozen":
    return base
  if kind == "int8":
    return base.quantized("int8")
  if kind == "int4":
    return base.quantized("int4", group_size=2)
  if kind == "lora":  # A non-zero: both adapters get gradients at once
    lora = base.with_lora(rank=2, alpha=4.0, name=name, init_base_rng=key)
    a = np.random.default_rng(len(name)).normal(size=(vocab, 2)) / 4
    lora.lora_a.value = pz.nx.wrap(a.astype(np.float32)).tag(
      "vocabulary", "rank"
    )
    return lora
  assert kind == "rows", kind
  return base.with_trainable_rows([1, 5, vocab - 1], name=name)


def model_tables(kinds=KINDS, vocab: int = V, place=lambda t: t) -> dict:
  """For each kind a tied table ``kind`` and an input table ``kind_in``
  (untied: its lookups feed the float output table ``out``)."""
  tables = {}
  for kind in kinds:
    tables[kind] = place(make(kind, kind, vocab))
    tables[f"{kind}_in"] = place(make(kind, f"{kind}_in", vocab))
  tables["out"] = place(make("float", "out", vocab))
  return tables


def model_inputs(vocab: int = V, place=lambda x: x) -> tuple:
  """Tokens (one out of range: clipped), targets and bags of members."""
  ids = np.array([[1, 5, 3, vocab + 2], [2, vocab - 1, 5, 0]])
  targets = np.array([[5, 3, 2, 1], [5, 1, vocab - 1, 4]])
  bags = np.array([[1, 5, 3], [4, 0, vocab - 1]])
  return (
    place(pz.nx.wrap(ids).tag("batch", "seq")),
    place(pz.nx.wrap(targets).tag("batch", "seq")),
    place(pz.nx.wrap(bags).tag("batch", "member")),
  )


class Calls(NamedTuple):
  """The four calls of a table, however it is held."""

  lookup: Any
  pooled: Any
  attend: Any
  cross_entropy: Any


def penzai_calls(table) -> Calls:
  return Calls(
    lambda tokens, **o: ne.lookup(table, tokens, **o),
    lambda tokens, **o: ne.pooled_lookup(table, tokens, **o),
    lambda hidden, **o: ne.decode(table, hidden, **o),
    lambda hidden, targets, **o: ne.decode_cross_entropy(
      table, hidden, targets, **o
    ),
  )


def module_calls(emb) -> Calls:
  return Calls(emb, emb.pooled, emb.attend, emb.cross_entropy)


def _squares(named) -> jax.Array:
  return jnp.sum(named.data_array**2)


POOLED_KINDS = ("lora", "rows")
"""The kinds whose pooled lookups are in the loss too (each call costs an
eager compile per kind; each kind's own tests cover pooled lookups)."""


def model_loss(calls: dict[str, Calls], inputs) -> jax.Array:
  """Every kind tied (lookups and ``attend`` on one table) and untied (its
  lookups feed the fused loss and ``attend`` of the output table ``out``);
  pooled lookups of `POOLED_KINDS`."""
  tokens, targets, bags = inputs
  kinds = [name for name in calls if name != "out" and "_in" not in name]
  total = jnp.zeros((), jnp.float32)
  hidden = None
  for kind in kinds:
    tied = calls[kind]
    h = tied.lookup(tokens, out_of_range="clip")
    total += 0.1 * _squares(tied.attend(h))
    if kind in POOLED_KINDS:
      total += _squares(tied.pooled(bags, over="member", mode="mean"))
    looked = calls[f"{kind}_in"].lookup(tokens, out_of_range="clip")
    hidden = looked if hidden is None else hidden + looked
  out = calls["out"]
  return (
    total
    + out.cross_entropy(hidden, targets)
    + 0.1 * _squares(out.attend(hidden))
  )


def penzai_training(tables: dict, inputs, steps: int = 2, jit=False):
  """``(losses, {label: trained raw array})`` of the penzai path: the
  optimizer over the values of `pz.unbind_params` (eager by default: its kernels
  are then the ones an eager run of the modules compiles anyway)."""
  unbound, params = pz.unbind_params(tables)
  values = {p.label: p.value for p in params}
  state = OPTIMIZER.init(values)

  def loss(values):
    held = [pz.ParameterValue(value=v, label=k) for k, v in values.items()]
    bound = pz.bind_variables(unbound, held)
    calls = {name: penzai_calls(t) for name, t in bound.items()}
    return model_loss(calls, inputs)

  def step(values, state):
    value, grads = jax.value_and_grad(loss)(values)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      updates, state = OPTIMIZER.update(grads, state, values)
    return optax.apply_updates(values, updates), state, value

  if jit:
    step = jax.jit(step)

  losses = []
  for _ in range(steps):
    values, state, value = step(values, state)
    losses.append(float(value))
  trained = {label: np.asarray(v.data_array) for label, v in values.items()}
  return losses, trained


def initial_arrays(tables: dict) -> dict:
  """``{label: initial raw array}`` of every trainable array."""
  _, params = pz.unbind_params(tables)
  return {p.label: np.asarray(p.value.data_array) for p in params}


def frozen_arrays(table) -> list[np.ndarray]:
  """The frozen raw arrays of ``table``, as `split_table` orders them."""
  return [np.asarray(a) for a in foreign_modules.split_table(table, "t")[2]]


def check_trained(losses, trained: dict, want_losses, want: dict, start):
  """The losses and every trained array agree with the reference, and
  every trainable array has moved."""
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  assert sorted(trained) == sorted(want)
  for label, value in trained.items():
    np.testing.assert_allclose(
      value, want[label], rtol=2e-5, atol=2e-6, err_msg=label
    )
    assert not np.allclose(value, start[label]), f"{label} did not train"


# -------------------------------------------------------------- nnx models


class Model(nnx.Module):
  """One `ne_nnx.Embedding` per table of ``model_tables``."""

  def __init__(self, tables: dict):
    self.embeddings = nnx.Dict(
      {name: ne_nnx.Embedding(table) for name, table in tables.items()}
    )


def nnx_loss(model: Model, inputs) -> jax.Array:
  calls = {name: module_calls(e) for name, e in model.embeddings.items()}
  return model_loss(calls, inputs)


def nnx_training(model: Model, inputs, steps: int = 2, jit: bool = False):
  """Trains ``model`` in place with `nnx.Optimizer` (``wrt=nnx.Param``);
  returns the losses."""
  optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)

  def step(model, optimizer):
    value, grads = nnx.value_and_grad(nnx_loss)(model, inputs)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
      optimizer.update(model, grads)
    return value

  if jit:
    step = nnx.jit(step)
  return [float(step(model, optimizer)) for _ in range(steps)]


def nnx_trained(model: Model) -> dict:
  """``{label: array}`` of every `nnx.Param` of the model."""
  found = {}
  for emb in model.embeddings.values():
    for param in emb.params:
      assert param.label not in found, f"{param.label} is held twice"
      found[param.label] = np.asarray(param[...])
  return found


# ------------------------------------------------------------------ tests


@functools.cache
def one_device_reference():
  """The penzai path's training of `model_tables` (computed once a
  session: tests/equinox_test.py uses it too)."""
  return penzai_training(model_tables(), model_inputs())


@pytest.fixture
def reference():
  return one_device_reference()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_every_kind_trains_tied_and_untied_as_the_penzai_path(reference, jit):
  tables = model_tables()
  model = Model(tables)
  losses = nnx_training(model, model_inputs(), jit=jit)
  check_trained(losses, nnx_trained(model), *reference, initial_arrays(tables))
  for name, emb in model.embeddings.items():
    assert all(isinstance(f, ne_nnx.FrozenTableArray) for f in emb.frozen)
    assert not any(isinstance(f, nnx.Param) for f in emb.frozen)
    for got, want in zip(emb.frozen, frozen_arrays(tables[name])):
      np.testing.assert_array_equal(np.asarray(got[...]), want, err_msg=name)
    assert type(emb.table) is type(tables[name])


def test_the_optimizer_holds_state_for_the_trainable_arrays_only():
  tables = model_tables()
  model = Model(tables)
  optimizer = nnx.Optimizer(model, optax.adamw(0.1), wrt=nnx.Param)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  size = sum(p.size for p in params)
  state = [a for a in jax.tree.leaves(optimizer.opt_state) if a.ndim]
  assert sum(a.size for a in state) == 2 * size  # adam's two moments
  labels = sorted(initial_arrays(tables))
  assert sorted(nnx_trained(model)) == labels
  frozen = jax.tree.leaves(nnx.state(model, ne_nnx.FrozenTableArray))
  want = [a for t in tables.values() for a in frozen_arrays(t)]
  assert sorted(a.size for a in frozen) == sorted(a.size for a in want)


def test_a_tied_embedding_is_one_parameter_whose_gradient_sums_both_uses():
  table = make("float", "tied")
  tokens, targets, _ = model_inputs()
  emb = ne_nnx.Embedding(table)

  class Tied(nnx.Module):
    def __init__(self):
      self.inp = emb
      self.out = emb

  model = Tied()
  assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 1

  def loss(model):
    h = model.inp(tokens, out_of_range="clip")
    return model.out.cross_entropy(h, targets)

  both = nnx.grad(loss)(model)["inp"]["params"][0][...]
  # The two uses apart, by the penzai path: d/dW through the lookup alone
  # (decode held fixed) plus through the decode alone (hidden held fixed).
  unbound, (param,) = pz.unbind_params(table)

  def reference(value, through_lookup):
    bound = pz.bind_variables(unbound, [value])
    fixed = pz.bind_variables(unbound, [jax.lax.stop_gradient(value)])
    h = ne.lookup(
      bound if through_lookup else fixed, tokens, out_of_range="clip"
    )
    return ne.decode_cross_entropy(
      fixed if through_lookup else bound, h, targets
    )

  value = param.freeze()
  parts = [jax.grad(reference)(value, flag).value.data_array for flag in (1, 0)]
  assert float(jnp.abs(parts[0]).sum()) > 0 and float(jnp.abs(parts[1]).sum())
  np.testing.assert_allclose(both, parts[0] + parts[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS + ("value", "bf16"))
def test_the_table_comes_back_as_given_and_the_calls_are_the_operations(kind):
  if kind == "value":  # a ParameterValue: trainable through jax.grad
    table = pz.freeze_params(make("lora", "v"))
  elif kind == "bf16":
    weights = np.random.default_rng(0).normal(size=(V, D))
    table = ne.EmbeddingTable.from_pretrained(
      jnp.asarray(weights, jnp.bfloat16), embedding_axes="e"
    ).with_trainable_rows([2], name="b")
  else:
    table = make(kind, "t")
  emb = ne_nnx.Embedding(table)
  back = emb.table
  assert type(back) is type(table)
  assert back.static_facts() == table.static_facts()
  assert back.vocabulary == table.vocabulary
  holders = foreign_modules.trainable_holders
  assert [(type(h), h.label) for h in holders(back)] == [
    (type(h), h.label) for h in holders(table)
  ]
  assert [p.label for p in emb.params] == [h.label for h in holders(table)]
  for got, want in zip(
    jax.tree.leaves(pz.freeze_params(back)),
    jax.tree.leaves(pz.freeze_params(table)),
  ):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if kind != "lora":  # the options reach the operations (every kind trains)
    return
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
      np.asarray(got.data_array, np.float32),
      np.asarray(want.order_as(*got.named_shape).data_array, np.float32),
    )


def test_nnx_jit_traces_once_and_split_merge_keep_the_tables():
  tables = model_tables(("lora",))
  model = Model(tables)
  tokens, targets, _ = model_inputs()
  emb = model.embeddings["lora"]
  optimizer = nnx.Optimizer(emb, optax.sgd(0.1), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(emb, optimizer):
    traces.append(1)

    def loss(emb):
      return emb.cross_entropy(emb(tokens, out_of_range="clip"), targets)

    value, grads = nnx.value_and_grad(loss)(emb)
    optimizer.update(emb, grads)
    return value

  losses = [float(step(emb, optimizer)) for _ in range(3)]
  assert len(traces) == 1 and losses[2] < losses[0]
  graphdef, state = nnx.split(model)
  again = nnx.merge(graphdef, state)
  for name, emb in model.embeddings.items():
    got = jax.tree.leaves(pz.freeze_params(again.embeddings[name].table))
    want = jax.tree.leaves(pz.freeze_params(emb.table))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
  moved = model.embeddings["lora"].table.lora_a.value.data_array
  assert not np.array_equal(moved, tables["lora"].lora_a.value.data_array)


def test_from_pretrained_refuses_an_nnx_variable():
  param = nnx.Param(jnp.ones((4, 3)))
  for variable in (param, ne_nnx.FrozenTableArray(jnp.ones((4, 3)))):
    for freeze in (True, False):
      with pytest.raises(TypeError) as info:
        ne.EmbeddingTable.from_pretrained(variable, freeze=freeze)
      message = str(info.value)
      assert type(variable).__name__ in message
      assert "ne_nnx.Embedding" in message and "never train" in message
  table = ne.EmbeddingTable.from_pretrained(param[...], freeze=False)
  assert table.value.named_shape == {"vocabulary": 4, "embedding": 3}


def test_a_raw_trainable_table_gets_no_gradient_and_check_tables_says_so():
  table = make("float", "raw")

  class Raw(nnx.Module):
    def __init__(self):
      self.layers = [ne.EmbeddingLookup(table)]  # inside a penzai layer
      self.blocks = nnx.List([nnx.Dict({"table": nnx.data(table)})])
      self.head = nnx.Param(jnp.ones(()))

  model = Raw()

  def loss(model):
    looked = model.layers[0](jnp.array([1, 2, 3]))
    return jnp.sum(looked.data_array) * model.head[...]

  grads = nnx.grad(loss)(model)  # the premise: the table silently gets none
  assert [path for path, _ in nnx.to_flat_state(grads)] == [("head",)]
  with pytest.raises(TypeError) as info:
    ne_nnx.check_tables(model)
  message = str(info.value)
  assert "2 named_embed tables that nnx will never train" in message
  assert "`model.layers[0].table`" in message
  assert "`model.blocks[0].table`" in message
  assert "'raw.embeddings'" in message and "ne_nnx.Embedding(table)" in message

  class Fine(nnx.Module):
    def __init__(self):
      self.embed = ne_nnx.Embedding(
        table.with_lora(rank=1, name="l", init_base_rng=jax.random.key(0))
      )
      self.frozen = nnx.data(make("int8", "q"))

  assert ne_nnx.check_tables(Fine()) is None


def test_unbound_tables_and_non_tables_are_refused():
  slot = ne.EmbeddingTable.from_config(
    name="s", init_base_rng=None, vocab_size=4, embedding_axes={"e": 2}
  )
  with pytest.raises(ValueError, match=r"'s.embeddings' is unbound"):
    ne_nnx.Embedding(slot)
  with pytest.raises(TypeError, match=r"ne_nnx.Embedding: `table` must be"):
    ne_nnx.Embedding(np.ones((4, 2), np.float32))
  with pytest.raises(TypeError, match=r"layer: pass its table"):
    ne_nnx.Embedding(ne.EmbeddingLookup(make("frozen", "f")))
  table = make("float", "m")
  table.embeddings.metadata = {"source": "hub"}  # kept, as penzai's
  assert ne_nnx.Embedding(table).table.embeddings.metadata == {"source": "hub"}
  table.embeddings.metadata = {"sources": ["hub"]}
  with pytest.raises(TypeError, match=r"must be hashable.*unhashable type"):
    ne_nnx.Embedding(table)


def test_importing_without_flax_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)
  monkeypatch.delitem(sys.modules, "named_embed.nnx")
  with pytest.raises(ImportError, match=r"pip install named_embed\[flax\]"):
    importlib.import_module("named_embed.nnx")


def test_importing_named_embed_imports_neither_flax_nor_equinox():
  code = (
    "import sys, named_embed as ne; ne.EmbeddingTable;"
    " print(sorted(m for m in ('flax', 'equinox') if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stderr
