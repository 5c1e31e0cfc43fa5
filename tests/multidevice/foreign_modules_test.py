"""flax nnx and equinox modules around sharded tables, on 8 CPU devices.

Every kind of table, placed with `named_embed.shard` on a (2, 4) mesh
(vocabulary over "model", batch over "data") with Explicit or Auto axes,
is held in `named_embed.nnx.Embedding` / `named_embed.equinox.Embedding`
and trained (tied and untied, tests/nnx_test.py's model) under `nnx.jit` /
`eqx.filter_jit` on both meshes and eagerly on the Explicit one. The
losses and trained arrays must equal the penzai path's on one device,
frozen arrays must be what they were, and every array must stay where
`ne.shard` put it.

Run by tests/sharding_test.py in a subprocess.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
import pytest
from equinox_test import Model as EqxModel
from equinox_test import eqx_trained, eqx_training
from jax.sharding import AxisType
from nnx_test import Model as NnxModel
from nnx_test import (
  check_trained,
  frozen_arrays,
  initial_arrays,
  model_inputs,
  model_tables,
  nnx_trained,
  nnx_training,
  penzai_training,
)

import named_embed as ne
from named_embed._src.tools import foreign_modules

V = 16  # the vocabulary splits over the 4 devices of "model"
RULES = {"vocabulary": "model", "batch": "data"}


@functools.cache
def mesh_of(layout: str):
  kind = AxisType.Explicit if layout == "explicit" else AxisType.Auto
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)


def mesh_context(layout: str):
  """`jax.set_mesh` for Explicit axes (JAX needs it to differentiate
  eagerly: the loss's cotangent is made on the mesh); none for Auto."""
  if layout == "explicit":
    return jax.set_mesh(mesh_of(layout))
  return contextlib.nullcontext()


@functools.cache
def placed(layout: str):
  """The model's tables and inputs, placed by `RULES` (built once: the
  modules never change the tables they are given)."""
  mesh = mesh_of(layout)

  def place(x):
    return ne.shard(x, mesh, RULES)

  return model_tables(vocab=V, place=place), model_inputs(V, place)


@functools.cache
def reference():
  """The penzai path on one device (tables and inputs unplaced)."""
  return penzai_training(model_tables(vocab=V), model_inputs(V), jit=True)


def check_placement(got: list, want: list, layout: str):
  for a, b in zip(got, want):
    assert a.sharding.is_equivalent_to(b.sharding, b.ndim), (
      f"{layout}: {a.shape} moved from {b.sharding.spec} to {a.sharding.spec}"
    )


def test_the_tables_are_split_over_the_devices():
  tables, _ = placed("explicit")
  rows = tables["float"].rows_array()
  assert rows.sharding.shard_shape(rows.shape) == (V // 4, rows.shape[1])


# Eager on the Explicit mesh only: each eager run compiles every kernel's
# gradient anew, and jit covers both kinds of axes.
RUNS = [("explicit", False), ("explicit", True), ("auto", True)]
RUN_IDS = ["explicit-eager", "explicit-jit", "auto-jit"]


@pytest.mark.parametrize("layout, jit", RUNS, ids=RUN_IDS)
def test_nnx_trains_sharded_tables_as_the_penzai_path(layout, jit):
  tables, inputs = placed(layout)
  model = NnxModel(tables)
  with mesh_context(layout):
    losses = nnx_training(model, inputs, jit=jit)
  check_trained(
    losses, nnx_trained(model), *reference(), initial_arrays(tables)
  )
  for name, emb in model.embeddings.items():
    _, trainable, frozen = foreign_modules.split_table(tables[name], "t")
    params = [p[...] for p in emb.params]
    kept = [f[...] for f in emb.frozen]
    check_placement([*params, *kept], [*trainable, *frozen], layout)
    for got, want in zip(kept, frozen_arrays(tables[name])):
      np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("layout, jit", RUNS, ids=RUN_IDS)
def test_equinox_trains_sharded_tables_as_the_penzai_path(layout, jit):
  tables, inputs = placed(layout)
  with mesh_context(layout):
    model, losses = eqx_training(EqxModel(tables), inputs, jit=jit)
  check_trained(
    losses, eqx_trained(model), *reference(), initial_arrays(tables)
  )
  for name, emb in model.embeddings.items():
    _, trainable, frozen = foreign_modules.split_table(tables[name], "t")
    check_placement([*emb.params, *emb.frozen], [*trainable, *frozen], layout)
    back = foreign_modules.split_table(emb.table, "t")[2]
    check_placement(back, frozen, layout)
    for got, want in zip(frozen_arrays(emb.table), frozen_arrays(tables[name])):
      np.testing.assert_array_equal(got, want)
