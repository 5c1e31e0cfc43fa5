"""Every operation on every kind of table in every layout, on 8 CPU devices.

The matrix of issue 15: kinds (float, int8, int4, LoRA over float and over
int8, trainable rows, and `ScaledTable`, a kind written only in this test
folder) x operations x layouts (one device; a (2, 4) mesh with Explicit or
Auto axes, the vocabulary split over "model" and the batch over "data";
each with and without alignment rows). Values are compared with the same
operation on the float reference (the kind's rows as read: dequantised or
merged, one device); gradients with the same kind on one device (each
kind's own tests check its gradients against hand-written formulas).

Run by tests/sharding_test.py in a subprocess.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from penzai import pz
from scaled_table import ScaledTable

import named_embed as ne

D = 8
RULES = {"vocabulary": "model", "batch": "data"}
RNG = np.random.default_rng(7)
KINDS = ["float", "int8", "int4", "lora", "lora_int8", "rows", "scaled"]
LAYOUTS = [
  "one_device",
  "one_device_aligned",
  "explicit",
  "explicit_aligned",
  "auto",
  "auto_aligned",
]


def _vocab(layout: str) -> int:
  return 13 if layout.endswith("aligned") else 16


def _weights(v: int) -> np.ndarray:
  return np.random.default_rng(v).normal(size=(v, D)).astype(np.float32)


def make(kind: str, layout: str):
  """The table of ``kind`` (on one device), with 3 alignment rows when the
  layout says so."""
  v = _vocab(layout)
  aligned = layout.endswith("aligned")
  w = _weights(v)
  if kind == "float":
    table = ne.EmbeddingTable.from_pretrained(w, freeze=False, name="f")
    return table.padded_to_multiple(8) if aligned else table
  base = ne.EmbeddingTable.from_pretrained(w, padding_index=1)
  if aligned:
    base = base.padded_to_multiple(8)
  rows = base.num_rows
  key = jax.random.key(3)
  if kind == "int8":
    return base.quantized("int8")
  if kind == "int4":
    return base.quantized("int4", group_size=4)
  if kind in ("lora", "lora_int8"):
    under = base.quantized("int8") if kind == "lora_int8" else base
    lora = under.with_lora(2, 3.0, name="l", init_base_rng=key)
    a = np.random.default_rng(1).normal(size=(rows, 2)).astype(np.float32)
    lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
    return lora
  if kind == "rows":
    table = base.with_trainable_rows([0, 5, v - 1], name="r")
    trained = np.random.default_rng(2).normal(size=(3, D)).astype(np.float32)
    table.rows.value = pz.nx.wrap(trained).tag("rows", "embedding")
    return table
  assert kind == "scaled"
  gain = np.linspace(0.5, 2.0, rows).astype(np.float32)
  return ScaledTable.over(base, name="s", gain=gain)


def reference(table) -> ne.EmbeddingTable:
  """The float table of the rows as read, frozen, on one device."""
  if isinstance(table, ne.EmbeddingTable):
    return pz.freeze_params(table)
  if isinstance(table, ne.QuantizedTable):
    return table.dequantized()
  return pz.freeze_params(table).merged()


@functools.cache
def mesh_of(layout: str):
  kind = AxisType.Explicit if layout.startswith("explicit") else AxisType.Auto
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)


def place(x, layout: str):
  if layout.startswith("one_device"):
    return x
  return ne.shard(x, mesh_of(layout), RULES)


def one_device(layout: str) -> str:
  """The one-device layout with the same rows as ``layout``."""
  return "one_device_aligned" if layout.endswith("aligned") else "one_device"


def inputs(layout: str):
  v = _vocab(layout)
  ids = np.random.default_rng(5).integers(0, v, size=(2, 6))
  ids[0, 0] = v + 1  # out of range (an alignment row's id when aligned)
  hidden = np.random.default_rng(6).normal(size=(2, 6, D)).astype(np.float32)
  tokens = place(pz.nx.wrap(ids).tag("batch", "seq"), layout)
  targets = place(
    pz.nx.wrap(np.clip(ids, 0, v - 1)).tag("batch", "seq"), layout
  )
  hidden = place(pz.nx.wrap(hidden).tag("batch", "seq", "embedding"), layout)
  return tokens, targets, hidden


def host(x: pz.nx.NamedArray, *order: str) -> np.ndarray:
  return np.asarray(x.order_as(*order).data_array)


# ------------------------------------------------------------- operations
# Each takes (table, layout) and returns numpy arrays to compare.


def op_lookup(table, layout):
  tokens, _, _ = inputs(layout)
  out = jax.jit(lambda t, i: ne.lookup(t, i, max_norm=2.0))(table, tokens)
  return host(out, "batch", "seq", "embedding")


def op_lookup_eager_one_hot(table, layout):
  tokens, _, _ = inputs(layout)
  out = ne.lookup(table, tokens, strategy="one_hot", out_of_range="clip")
  return host(out, "batch", "seq", "embedding")


def op_decode(table, layout):
  _, _, hidden = inputs(layout)
  out = jax.jit(lambda t, h: ne.decode(t, h, soft_cap=5.0))(table, hidden)
  return host(out, "batch", "seq", "vocabulary")


def op_fused_loss(table, layout):
  _, targets, hidden = inputs(layout)
  loss = jax.jit(
    lambda t, h: ne.decode_cross_entropy(
      t, h, targets, chunk_size=3, label_smoothing=0.1, reduction="none"
    )
  )(table, hidden)
  return host(loss, "batch", "seq")


OPERATIONS = {
  "lookup": op_lookup,
  "lookup_one_hot": op_lookup_eager_one_hot,
  "decode": op_decode,
  "fused_loss": op_fused_loss,
}


@functools.cache
def placed(kind: str, layout: str):
  return place(make(kind, layout), layout)


# One device without alignment rows is every kind's own test file's case.
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_operation_equals_the_float_reference(operation, kind, layout):
  run = OPERATIONS[operation]
  table = placed(kind, layout)
  got = run(pz.freeze_params(table), layout)
  want = run(reference(make(kind, layout)), one_device(layout))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _loss_of_parameters(table, layout):
  """``(loss, gradients of every parameter, d hidden)`` of a lookup, a
  decode and the fused loss together, under jit."""
  tokens, targets, hidden = inputs(layout)
  unbound, params = pz.unbind_params(table)
  values = [p.freeze() for p in params]

  def loss(values, hidden):
    bound = pz.bind_variables(unbound, values)
    looked = ne.lookup(bound, tokens, out_of_range="clip")
    fused = ne.decode_cross_entropy(bound, hidden, targets, chunk_size=3)
    logits = ne.decode(bound, hidden).order_as("batch", "seq", "vocabulary")
    real = jnp.arange(logits.data_array.shape[-1]) < bound.vocab_size
    z = jnp.where(real, logits.data_array, 0.0)
    return fused + jnp.sum(jnp.sin(z)) + jnp.sum(looked.data_array**2) / 10

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
    values, hidden
  )
  return value, jax.tree.leaves(grads)


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if "one" not in x])
@pytest.mark.parametrize(
  "kind", ["float", "lora", "lora_int8", "rows", "scaled"]
)
def test_gradients_equal_one_device(kind, layout):
  value, grads = _loss_of_parameters(placed(kind, layout), layout)
  want_value, want_grads = _loss_of_parameters(
    make(kind, layout), one_device(layout)
  )
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  assert len(grads) == len(want_grads)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5
    )


# ------------------------------------------------------------------ files


def _rows_as_read(table) -> np.ndarray:
  return np.asarray(reference(table).rows_array())


@pytest.mark.parametrize(
  "layout", ["one_device_aligned", "explicit", "auto_aligned"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_the_same_table(kind, layout, tmp_path):
  """Every kind round-trips bit-exactly (one file; a mesh load placed by
  the rules, each device holding its share of every vocabulary tensor)."""
  table = placed(kind, layout)
  path = tmp_path / "t.safetensors"
  ne.save(table, path)
  if layout.startswith("one_device"):
    loaded = ne.load(path)
  else:
    loaded = ne.load(path, mesh=mesh_of(layout), rules=RULES)
    for leaf in jax.tree.leaves(pz.freeze_params(loaded)):
      if leaf.shape and leaf.shape[0] == loaded.num_rows:
        assert leaf.sharding.shard_shape(leaf.shape)[0] == leaf.shape[0] // 4
  assert type(loaded) is type(table)
  assert loaded.frozen == table.frozen
  assert loaded.vocab_size == table.vocab_size
  np.testing.assert_array_equal(_rows_as_read(loaded), _rows_as_read(table))
  np.testing.assert_array_equal(
    op_lookup(pz.freeze_params(loaded), layout),
    op_lookup(pz.freeze_params(table), layout),
  )


@pz.pytree_dataclass
class _UnsavedScaled(ScaledTable):
  """A kind that declares no file layout."""

  base: Any
  gain: Any
  FILE_KIND = None


def test_a_kind_without_a_file_layout_is_refused_with_a_type_error(tmp_path):
  table = pz.freeze_params(make("scaled", "one_device"))
  fields = dataclasses.fields(table)
  unsaved = _UnsavedScaled(**{f.name: getattr(table, f.name) for f in fields})
  np.testing.assert_array_equal(
    op_lookup(unsaved, "one_device"), op_lookup(table, "one_device")
  )
  with pytest.raises(TypeError, match=r"_UnsavedScaled has no file layout"):
    ne.save(unsaved, tmp_path / "t.safetensors")
