"""Whole-model checkpoints (`named_embed.orbax`) on 8 CPU devices: a model
of every kind of table, vocabulary split with alignment rows, saved and
restored onto the same mesh and onto another one, with Explicit and Auto
axes.

The references: a numpy copy of the saved model's arrays (bit for bit),
`ne.shard` of the same model for where each array must land, and the same
jitted computation on that `ne.shard`-ed model (bit for bit too: the same
arrays in the same places give the same program).

Run by tests/sharding_test.py in a subprocess.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType
from penzai import pz
from scaled_table import ScaledTable

import named_embed as ne
from named_embed import orbax as ne_orbax

V, D = 61, 8  # tokens; every table has 64 rows (3 alignment rows)
TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
ROWS8 = {"vocabulary": "model"}  # mesh (model=8)
RULES = {"vocabulary": "model", "batch": "data"}  # mesh (data=2, model=4)


def filled(table, seed):
  rng = np.random.default_rng(seed)
  for param in pz.unbind_params(table)[1]:
    value = param.value
    data = rng.standard_normal(tuple(value.named_shape.values()))
    param.value = pz.nx.wrap(data.astype(value.dtype), *value.named_shape)
  return table


def build(seed=0):
  """Every kind of table (and `ScaledTable`, a kind of this test folder)
  in one model; the trainable, LoRA and frozen tables tied to decodes."""
  w = np.random.default_rng(seed).standard_normal((V, D)).astype(np.float32)
  base = ne.EmbeddingTable.from_pretrained(w, padding_index=0)
  base = base.padded_to_multiple(8)
  trainable = ne.EmbeddingTable.from_pretrained(2 * w, freeze=False, name="t")
  key = jax.random.key(seed)
  lora = base.quantized("int8").with_lora(2, 3.0, name="l", init_base_rng=key)
  tables = [
    trainable.padded_to_multiple(8),
    base,
    base.quantized("int8"),
    base.quantized("int4", group_size=4),
    filled(lora, seed + 1),
    filled(base.with_trainable_rows([1, 7, 60], name="r"), seed + 2),
    filled(ScaledTable.over(base, name="s"), seed + 3),
  ]
  decodes = [ne.EmbeddingDecode(tables[i]) for i in (0, 1, 4)]
  return pz.nn.Sequential([ne.EmbeddingLookup(t) for t in tables] + decodes)


@functools.cache
def meshes(axis_type: str):
  kind = TYPES[axis_type]
  return {
    "model8": (jax.make_mesh((8,), ("model",), axis_types=(kind,)), ROWS8),
    "data2_model4": (
      jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2),
      RULES,
    ),
  }


def place(model, mesh, rules):
  """``model`` placed on ``mesh`` as `ne.shard` places it, keeping a frozen
  array held twice one array (`ne.shard` places it once a use)."""
  abstract = ne_orbax.abstract_model(model, mesh, rules)
  target = ne_orbax.checkpoint_state(abstract)
  state = jax.tree.map(
    lambda x, where: jax.device_put(x, where.sharding),
    ne_orbax.checkpoint_state(model),
    target,
  )
  return ne_orbax.with_checkpoint_state(abstract, state)


def arrays_of(model):
  return [np.array(x) for x in jax.tree.leaves(pz.freeze_params(model))]


def shardings_of(model):
  return [x.sharding for x in jax.tree.leaves(pz.freeze_params(model))]


def assert_tied(model):
  layers = model.sublayers
  for lookup, decode in ((0, 7), (1, 8), (4, 9)):
    a = jax.tree.leaves(layers[lookup].table)
    b = jax.tree.leaves(layers[decode].table)
    assert all(x is y for x, y in zip(a, b)), (lookup, decode)


def outputs(model, mesh):
  """Every lookup's rows, and the tied LoRA table's logits and fused loss,
  in one jitted call on the model's mesh."""
  ids = np.random.default_rng(9).integers(0, V, size=(2, 5))
  tokens = ne.shard(pz.nx.wrap(ids).tag("batch", "seq"), mesh, RULES)

  @jax.jit
  def run(model, tokens):
    layers = model.sublayers
    rows = [layer(tokens) for layer in layers[:7]]
    out = [r.unwrap("batch", "seq", "embedding") for r in rows]
    lora = layers[9]
    out.append(lora(rows[4]).unwrap("batch", "seq", "vocabulary"))
    out.append(ne.decode_cross_entropy(lora.table, rows[4], tokens))
    return out

  with jax.set_mesh(mesh):
    return [np.asarray(x) for x in run(pz.freeze_params(model), tokens)]


def save(model, path):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, ne_orbax.checkpoint_state(model))


@pytest.mark.parametrize("axis_type", list(TYPES))
def test_restore_onto_the_same_mesh_keeps_every_shard_in_place(
  tmp_path, axis_type
):
  mesh, rules = meshes(axis_type)["model8"]
  model = place(build(), mesh, rules)
  assert shardings_of(model) == shardings_of(ne.shard(build(), mesh, rules))
  assert_tied(model)
  want = arrays_of(model)
  save(model, tmp_path / "c")
  template = place(build(seed=5), mesh, rules)  # other values, same place
  abstract = ne_orbax.abstract_model(template)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(
      tmp_path / "c", ne_orbax.checkpoint_state(abstract)
    )
  restored = ne_orbax.with_checkpoint_state(abstract, state)
  assert shardings_of(restored) == shardings_of(model)
  for got, ref in zip(arrays_of(restored), want):
    assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()
  assert_tied(restored)
  rows = restored.sublayers[2].table.codes.data_array  # int8 codes
  assert [s.data.shape for s in rows.addressable_shards] == [(8, D)] * 8
  for layer in restored.sublayers:
    assert (
      layer.table.rows_sharding == template.sublayers[0].table.rows_sharding
    )


@pytest.mark.parametrize("axis_type", list(TYPES))
@pytest.mark.parametrize(
  "saved_on, restored_on", [("model8", "data2_model4"), ("data2_model4", None)]
)
def test_restore_onto_another_mesh_places_as_ne_shard(
  tmp_path, axis_type, saved_on, restored_on
):
  """Saved split 8 ways and restored onto (data=2, model=4) (the rows split
  4 ways, replicated over "data"), or saved on (2, 4) and restored onto one
  device (mesh=None, a template on one device)."""
  saved_mesh, saved_rules = meshes(axis_type)[saved_on]
  model = place(build(), saved_mesh, saved_rules)
  want = arrays_of(model)
  ne_orbax.save(tmp_path / "c", model)
  template = ne_orbax.eval_shape_model(build)  # never computed
  if restored_on is None:
    restored = ne_orbax.restore(tmp_path / "c", template)
    device = jax.local_devices()[0]
    assert all(s.device_set == {device} for s in shardings_of(restored))
    reference, mesh = build(), None
  else:
    mesh, rules = meshes(axis_type)[restored_on]
    restored = ne_orbax.restore(
      tmp_path / "c", template, mesh=mesh, rules=rules
    )
    reference = ne.shard(build(), mesh, rules)
    assert shardings_of(restored) == shardings_of(reference)
    for got, ref in zip(restored.sublayers, reference.sublayers):
      assert got.table.rows_sharding == ref.table.rows_sharding
    codes = restored.sublayers[3].table.codes.data_array  # int4 bytes
    shapes = {s.data.shape for s in codes.addressable_shards}
    assert shapes == {(16, D // 2)}  # 64 rows over 4 devices
  for got, ref in zip(arrays_of(restored), want):
    assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()
  assert_tied(restored)
  if axis_type == "explicit" and saved_on == "model8":
    for got, ref in zip(outputs(restored, mesh), outputs(reference, mesh)):
      assert got.tobytes() == ref.tobytes()
