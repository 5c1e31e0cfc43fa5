"""Train a tied-embedding LM with a vocabulary-parallel table on 8 devices.

The script gives itself 8 CPU devices (``jax_num_cpu_devices``, set before
JAX's backend starts) and a ``(data=2, model=4)`` mesh. One mapping from
axis names to mesh axes places everything::

  RULES = {"vocabulary": "model", "batch": "data"}

The table's rows are split over ``model`` and the token batches over
``data``; every other axis (``embedding``, ``mlp``, ``seq``) is replicated.
The vocabulary has 1001 tokens, which 4 does not divide, so
`ne.sharded_init` builds the table with ``pad_to_multiple=4``: 1004 rows,
251 per device, each device computing only its own rows. The three padding
rows are not tokens: they get ``-inf`` logits and no gradient.

The model is a penzai ``Sequential``: an `EmbeddingLookup`, a residual MLP
and an `EmbeddingDecode` of the same table (tied weights). The loss runs
every layer but the last and hands the decode layer to
`ne.decode_cross_entropy`, which on this table is vocabulary-parallel: each
device runs a chunked online log-sum-exp over its own rows, and the
statistics are combined with one small all-reduce. The step (``optax.adam``
on the parameter values of `pz.unbind_params`) runs under `jax.jit`, and
``ne.shard(grads, mesh, RULES)`` pins each gradient to its parameter's
layout inside it, so the table and its Adam moments stay split over
``model`` from the first step to the last. The data follow a fixed next-token rule, ``x -> 1 + (5x + 3) % 1000``.

The script prints the per-device bytes of the table and the loss as it
falls. Run it from the repository root::

  python examples/sharded_lm.py                      # 40 steps, Explicit axes
  python examples/sharded_lm.py --steps 10 --axis-types auto
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before the backend starts

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from penzai import pz  # noqa: E402

import named_embed as ne  # noqa: E402

VOCAB = 1001  # not a multiple of 4: the table is padded to 1004 rows
EMBED = 64
MLP = 256
BATCH = 16
SEQ = 32
MESH_SHAPE = (2, 4)
MESH_AXES = ("data", "model")
RULES = {"vocabulary": "model", "batch": "data"}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def next_token(tokens: np.ndarray) -> np.ndarray:
  """The rule the model has to learn: a fixed permutation of 1..V-1."""
  return 1 + (5 * tokens + 3) % (VOCAB - 1)


def make_batch(rng: np.random.Generator, mesh: jax.sharding.Mesh):
  """Input ids and targets ``{"batch", "seq"}``, batch split over data."""
  chain = np.empty((BATCH, SEQ + 1), np.int32)
  chain[:, 0] = rng.integers(1, VOCAB, BATCH)
  for position in range(SEQ):
    chain[:, position + 1] = next_token(chain[:, position])
  inputs = pz.nx.wrap(chain[:, :-1]).tag("batch", "seq")
  targets = pz.nx.wrap(chain[:, 1:]).tag("batch", "seq")
  return ne.shard((inputs, targets), mesh, RULES)


def build_model(mesh: jax.sharding.Mesh, key: jax.Array) -> pz.nn.Sequential:
  """Lookup, residual MLP, decode; the table is built already sharded."""
  table_key, mlp_key = jax.random.split(key)
  table = ne.sharded_init(
    ne.EmbeddingTable.from_config,
    mesh,
    RULES,
    name="embed",
    init_base_rng=table_key,
    vocab_size=VOCAB,
    embedding_axes={"embedding": EMBED},
    pad_to_multiple=mesh.shape["model"],
  )
  mlp = pz.nn.Sequential(
    [
      pz.nn.Linear.from_config(
        name="mlp_in",
        init_base_rng=mlp_key,
        input_axes={"embedding": EMBED},
        output_axes={"mlp": MLP},
      ),
      pz.nn.Elementwise(jax.nn.gelu),
      pz.nn.Linear.from_config(
        name="mlp_out",
        init_base_rng=mlp_key,
        input_axes={"mlp": MLP},
        output_axes={"embedding": EMBED},
      ),
    ]
  )
  model = pz.nn.Sequential(
    [ne.EmbeddingLookup(table), pz.nn.Residual(mlp), ne.EmbeddingDecode(table)]
  )
  # Places the MLP's weights too (replicated: no rule names their axes).
  return ne.shard(model, mesh, RULES)


def per_device(array: jax.Array) -> str:
  """Spec, shard shape and bytes per device of ``array``."""
  shards = {s.data.shape for s in array.addressable_shards}
  nbytes = max(s.data.nbytes for s in array.addressable_shards)
  shapes = ", ".join(str(list(shape)) for shape in sorted(shards))
  return f"{array.sharding.spec}, {shapes} = {nbytes:,} bytes per device"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40, help="training steps")
  parser.add_argument(
    "--axis-types",
    choices=tuple(AXIS_TYPES),
    default="explicit",
    help="the mesh's axis types",
  )
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be at least 1")

  kind = AXIS_TYPES[args.axis_types]
  mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(kind,) * 2)
  print(
    f"mesh {dict(mesh.shape)} ({args.axis_types} axes) on"
    f" {jax.device_count()} {jax.devices()[0].platform} devices;"
    f" rules {RULES}"
  )
  model = build_model(mesh, jax.random.key(args.seed))
  table = model.sublayers[0].table
  rows = table.rows_array()
  print(
    f"table: {table.vocab_size} tokens, {table.num_rows} rows x {EMBED}"
    f" dims ({rows.nbytes:,} bytes in all)"
  )
  print(f"table rows: {per_device(rows)}")

  model_def, values = pz.unbind_params(model, freeze=True)
  print(f"parameters: {', '.join(v.label for v in values)}")

  def loss_fn(values, inputs, targets):
    *trunk, decode = pz.bind_variables(model_def, values).sublayers
    hidden = pz.nn.Sequential(trunk)(inputs)
    # chunk_size=128: each device scans its 251 rows in two chunks.
    return ne.decode_cross_entropy(decode, hidden, targets, chunk_size=128)

  optimizer = optax.adam(1e-2)

  @jax.jit
  def train_step(values, state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(values, inputs, targets)
    grads = ne.shard(grads, mesh, RULES)  # each gradient as its parameter
    # optax mixes Python floats with its int32 step count, which JAX's
    # strict dtype promotion (if you enable it) rejects.
    with jax.numpy_dtype_promotion("standard"):
      updates, state = optimizer.update(grads, state, values)
    return optax.apply_updates(values, updates), state, loss

  rng = np.random.default_rng(args.seed)
  log_every = max(1, args.steps // 10)
  first = final = None
  started = time.perf_counter()
  with jax.set_mesh(mesh):  # Explicit axes: jit needs to know the mesh
    state = jax.jit(optimizer.init)(values)  # moments laid out as values
    for step in range(args.steps):
      inputs, targets = make_batch(rng, mesh)
      values, state, loss = train_step(values, state, inputs, targets)
      final = float(loss)
      first = final if first is None else first
      if step % log_every == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {final:.4f}")
  seconds = time.perf_counter() - started
  print(f"first loss {first:.4f}, final loss {final:.4f} ({seconds:.1f} s)")
  trained = pz.bind_variables(model_def, values).sublayers[0].table
  print(f"table rows after training: {per_device(trained.rows_array())}")
  moment = optax.tree_utils.tree_get(state, "mu")[0].value.data_array
  print(f"Adam first moment of the table: {per_device(moment)}")


if __name__ == "__main__":
  main()
