"""One process of a 2-process orbax checkpoint run, for
tests/orbax_multihost_test.py.

Started once a process on localhost (``--process-id 0..N-1``), each with
``--devices`` CPU devices joined by `jax.distributed` (gloo), as
tests/multihost/worker.py is. It places a model of every kind of table on
the mesh ``(model=8)`` (each process holds half the rows), saves it with
`named_embed.orbax.save` (each process writes its own shards), and
restores it into a template that is never computed
(`eval_shape_model`), onto the same mesh and onto ``(data=2, model=4)``
with Auto axes. It writes ``orbax.npz`` (every array, gathered, from
process 0) and ``orbax-<process>.json`` (shardings, shard shapes, ties).

  python tests/multihost/orbax_worker.py --process-id 0 --processes 2 \\
      --devices 4 --port 12345 --workdir /tmp/run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import worker  # tests/multihost/worker.py: joining the processes

V, D = 61, 8  # tokens; every table has 64 rows (3 alignment rows)
ROWS8 = {"vocabulary": "model"}
RULES = {"vocabulary": "model", "batch": "data"}
TIED = ((0, 6), (1, 7), (4, 8))  # (lookup, decode) layers sharing a table


def build(seed=0):
  """Every kind of table in one model, three of them tied to decodes."""
  import jax
  import numpy as np
  from penzai import pz

  import named_embed as ne

  rng = np.random.default_rng(seed)
  w = rng.standard_normal((V, D)).astype(np.float32)
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
    lora,
    base.with_trainable_rows([1, 7, 60], name="r"),
  ]
  for param in pz.unbind_params(tables)[1]:  # distinct values everywhere
    shape = tuple(param.value.named_shape.values())
    data = rng.standard_normal(shape).astype(param.value.dtype)
    param.value = pz.nx.wrap(data, *param.value.named_shape)
  decodes = [ne.EmbeddingDecode(tables[i]) for i in (0, 1, 4)]
  return pz.nn.Sequential([ne.EmbeddingLookup(t) for t in tables] + decodes)


def leaves(model):
  import jax
  from penzai import pz

  return jax.tree.leaves(pz.freeze_params(model))


def place(model, mesh, rules):
  """``model`` on ``mesh`` where `ne.shard` would put each array, every
  process building its own shards from the host copy."""
  import jax
  import numpy as np

  from named_embed import orbax as ne_orbax

  abstract = ne_orbax.abstract_model(model, mesh, rules)

  def put(x, where):
    host = np.asarray(x)
    return jax.make_array_from_callback(
      host.shape, where.sharding, lambda index: host[index]
    )

  state = jax.tree.map(
    put, ne_orbax.checkpoint_state(model), ne_orbax.checkpoint_state(abstract)
  )
  return ne_orbax.with_checkpoint_state(abstract, state)


def describe(model, name, arrays, notes):
  """Gathers ``model``'s arrays into ``arrays`` and notes their specs, the
  shapes of this process's shards, ties and the rows shardings."""
  import jax

  for i, leaf in enumerate(leaves(model)):
    arrays[f"{name}_{i}"] = worker.gather(leaf)
  notes[f"{name}_specs"] = [str(x.sharding.spec) for x in leaves(model)]
  notes[f"{name}_shards"] = [
    sorted({s.data.shape for s in x.addressable_shards}) for x in leaves(model)
  ]
  layers = model.sublayers
  notes[f"{name}_tied"] = [
    all(
      x is y
      for x, y in zip(
        jax.tree.leaves(layers[a].table), jax.tree.leaves(layers[b].table)
      )
    )
    for a, b in TIED
  ]
  notes[f"{name}_rows_specs"] = [
    str(layer.table.rows_sharding.spec) for layer in layers
  ]


def scenario(args, arrays, notes):
  import jax
  from jax.sharding import AxisType

  from named_embed import orbax as ne_orbax

  explicit = (AxisType.Explicit,)
  rows8 = jax.make_mesh((8,), ("model",), axis_types=explicit)
  auto = (AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
  model = place(build(), rows8, ROWS8)
  describe(model, "saved", arrays, notes)
  path = args.workdir / "checkpoint"
  started = time.perf_counter()
  ne_orbax.save(path, model)  # every process writes its own shards
  notes["save_seconds"] = time.perf_counter() - started
  template = ne_orbax.eval_shape_model(build)  # never computed
  started = time.perf_counter()
  same = ne_orbax.restore(path, template, mesh=rows8, rules=ROWS8)
  notes["restore_seconds"] = time.perf_counter() - started
  describe(same, "same_mesh", arrays, notes)
  other = ne_orbax.restore(path, template, mesh=mesh, rules=RULES)
  describe(other, "other_mesh", arrays, notes)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", type=pathlib.Path, required=True)
  parser.add_argument("--init-timeout", type=int, default=60)
  args = parser.parse_args()
  started = time.perf_counter()
  worker.initialize(args)
  import numpy as np

  notes = {"joined_seconds": time.perf_counter() - started}
  arrays = {}
  scenario(args, arrays, notes)
  notes["seconds"] = time.perf_counter() - started
  name = f"orbax-{args.process_id}.json"
  (args.workdir / name).write_text(json.dumps(notes, indent=1))
  if args.process_id == 0:
    np.savez(args.workdir / "orbax.npz", **arrays)


if __name__ == "__main__":
  try:
    main()
  except Exception:
    traceback.print_exc()
    sys.exit(1)
