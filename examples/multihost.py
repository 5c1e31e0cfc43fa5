"""Train, save and reload a vocabulary-parallel table over several processes.

JAX's multi-process runtime runs one process per host and one mesh over
every process's devices. This script is such a program: every process runs
the same code, and the table is never gathered on one device or one host.
It is built in place by `ne.sharded_init`, trained in place, written by
every process for the rows it holds with `ne.save`, and read back by every
process for its own devices' rows with `ne.load(..., mesh=...)`.

On one machine, the launcher starts N local processes, each with K CPU
devices, joined by gloo collectives over localhost, then reads the saved
checkpoint back on one process::

  python examples/multihost.py --processes 2 --devices 4
  python examples/multihost.py --processes 4 --devices 2 --steps 10

On a cluster, run one process per host yourself (no launcher)::

  python examples/multihost.py --process-id 0 --processes 8 --devices 0 \\
      --coordinator host0:1234 --out /shared/ckpt     # on host 0, and so on
  python examples/multihost.py --process-id auto --devices 0 \\
      --out /shared/ckpt        # TPU pods, SLURM: jax.distributed finds them

``--out`` must be a directory that every host sees (a shared file system).

The model is an `EmbeddingLookup`, one penzai `Linear` and the fused loss
`ne.decode_cross_entropy` on the same (tied) table, learning the fixed
next-token rule ``x -> 1 + (5x + 3) % 1000``. The training mesh is
``(data=processes, model=devices per process)`` with the rules
``{"vocabulary": "model", "batch": "data"}``: the vocabulary is split over
each host's devices (the fast links), the batch over hosts, so each host
holds every row, a 1/K share on each device, and only the gradient
all-reduce crosses hosts (`benchmarks/multihost.py` measures it). The
checkpoint is then read on another mesh, ``(model=all devices)``, where
each process holds 1/N of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

VOCAB = 1001
EMBED = 32
SEQ = 16
RULES = {"vocabulary": "model", "batch": "data"}


def next_token(tokens):
  return 1 + (5 * tokens + 3) % (VOCAB - 1)


# ------------------------------------------------------------ one process


def join(args) -> None:
  """Joins the other processes (before anything touches JAX's backend)."""
  import jax

  if args.process_id == "auto":  # TPU pods, SLURM, Open MPI: detected
    jax.distributed.initialize(initialization_timeout=int(args.timeout))
    return
  if args.devices:  # CPU devices for a run on one machine
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", args.devices)
  process = int(args.process_id)
  if process != 0:  # process 0 runs the coordinator: wait until it listens
    wait_for(args.coordinator, args.timeout, f"process {process}")
  jax.distributed.initialize(
    coordinator_address=args.coordinator,
    num_processes=args.processes,
    process_id=process,
    initialization_timeout=int(args.timeout),
  )


def wait_for(address: str, timeout: float, who: str) -> None:
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return
    except OSError as error:
      if time.monotonic() > deadline:
        sys.exit(
          f"{who} could not reach the coordinator at {address} within"
          f" {timeout:g} s ({error}). Is process 0 running?"
        )
      time.sleep(0.1)


def make_batch(rng, mesh, batch):
  import numpy as np
  from penzai import pz

  import named_embed as ne

  chain = np.empty((batch, SEQ + 1), np.int32)
  chain[:, 0] = rng.integers(1, VOCAB, batch)
  for position in range(SEQ):
    chain[:, position + 1] = next_token(chain[:, position])
  inputs = pz.nx.wrap(chain[:, :-1]).tag("batch", "seq")
  targets = pz.nx.wrap(chain[:, 1:]).tag("batch", "seq")
  # Every process passes the same global batch; each keeps its own rows.
  return ne.shard((inputs, targets), mesh, RULES)


def per_process(array) -> str:
  """This process's share of a global array."""
  local = sum(s.data.nbytes for s in array.addressable_shards)
  return f"{local:,} of {array.nbytes:,} bytes on this process"


def train(args, mesh, say):
  import jax
  import numpy as np
  import optax
  from penzai import pz

  import named_embed as ne

  table = ne.sharded_init(
    ne.EmbeddingTable.from_config,
    mesh,
    RULES,
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=VOCAB,
    embedding_axes={"embedding": EMBED},
    pad_to_multiple=jax.device_count(),  # divides any mesh axis below
  )
  say(
    f"table rows {table.num_rows} x {EMBED}: {per_process(table.value.data_array)}"
  )
  mix = pz.nn.Linear.from_config(
    name="mix",
    init_base_rng=jax.random.key(1),
    input_axes={"embedding": EMBED},
    output_axes={"embedding": EMBED},
  )
  model = ne.shard(
    pz.nn.Sequential([ne.EmbeddingLookup(table), mix]), mesh, RULES
  )
  model_def, values = pz.unbind_params(model, freeze=True)
  optimizer = optax.adam(0.02)

  def loss_fn(values, inputs, targets):
    model = pz.bind_variables(model_def, values)
    hidden = model(inputs)
    table = model.sublayers[0].table
    return ne.decode_cross_entropy(table, hidden, targets, chunk_size=128)

  @jax.jit
  def step(values, state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(values, inputs, targets)
    grads = ne.shard(grads, mesh, RULES)
    with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
      updates, state = optimizer.update(grads, state, values)
    return optax.apply_updates(values, updates), state, loss

  rng = np.random.default_rng(0)  # the same batches on every process
  batch = 4 * mesh.shape["data"]
  with jax.set_mesh(mesh):
    state = jax.jit(optimizer.init)(values)
    for number in range(args.steps):
      inputs, targets = make_batch(rng, mesh, batch)
      if number == 0 and args.hlo and jax.process_index() == 0:
        write_hlo(step.lower(values, state, inputs, targets), args.hlo)
      values, state, loss = step(values, state, inputs, targets)
      if number % max(1, args.steps // 5) == 0 or number == args.steps - 1:
        say(f"step {number:3d}  loss {float(loss):.4f}", everyone=False)
  return pz.bind_variables(model_def, values).sublayers[0].table


def write_hlo(lowered, path: str) -> None:
  """The compiled step's HLO (its collectives are what crosses the
  network), and its per-device memory, for benchmarks/multihost.py."""
  compiled = lowered.compile()
  pathlib.Path(path).write_text(compiled.as_text())
  memory = compiled.memory_analysis()
  fields = ("argument", "output", "temp", "alias")
  sizes = {f: getattr(memory, f"{f}_size_in_bytes", None) for f in fields}
  pathlib.Path(path + ".memory.json").write_text(json.dumps(sizes))


def run_process(args) -> None:
  join(args)
  import jax
  import jax.numpy as jnp

  import named_embed as ne

  def say(line: str, everyone: bool = True) -> None:
    if everyone or jax.process_index() == 0:
      print(f"[process {jax.process_index()}] {line}", flush=True)

  local = jax.local_device_count()
  mesh = jax.make_mesh((jax.process_count(), local), ("data", "model"))
  say(
    f"{jax.process_count()} processes x {local} {jax.devices()[0].platform}"
    f" devices; mesh {dict(mesh.shape)}; rules {RULES}",
    everyone=False,
  )
  table = train(args, mesh, say)
  ne.save(table, args.out)  # every process writes its own rows
  say(f"saved {sorted(os.listdir(args.out))}", everyone=False)
  # Another mesh: the vocabulary over every device of every process.
  spread = jax.make_mesh((jax.device_count(),), ("model",))
  again = ne.load(args.out, mesh=spread, rules={"vocabulary": "model"})
  say(
    f"reloaded on mesh {dict(spread.shape)}: {per_process(again.value.data_array)}"
  )
  same = jax.jit(lambda a, b: jnp.array_equal(a, b))(
    again.rows_array(), jax.device_put(table.rows_array(), again.rows_sharding)
  )
  say(f"reloaded rows equal the trained rows: {bool(same)}")


# ------------------------------------------------------------ launcher


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(procs, deadline: float) -> list[int | None]:
  """Exit codes; once one process fails (or time is up) the others are
  killed, since they would wait for it."""
  while any(p.poll() is None for p in procs):
    failed = any(p.poll() not in (None, 0) for p in procs)
    if failed or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.05)
  return [p.wait() if p.poll() is not None else None for p in procs]


def launch(args) -> None:
  """Starts the local processes, waits for them, then reads their save on
  this process alone."""
  out = args.out or os.path.join(tempfile.mkdtemp(), "checkpoint")
  coordinator = f"localhost:{free_port()}"
  procs = []
  for process in range(args.processes):
    command = [
      sys.executable, __file__, "--process-id", str(process),
      "--processes", str(args.processes), "--devices", str(args.devices),
      "--coordinator", coordinator, "--out", out,
      "--steps", str(args.steps), "--timeout", str(args.timeout),
    ]  # fmt: skip
    if args.hlo and process == 0:
      command += ["--hlo", args.hlo]
    procs.append(subprocess.Popen(command))
  codes = wait_all(procs, deadline=time.monotonic() + args.timeout * 4)
  if codes != [0] * len(procs):
    sys.exit(f"the processes failed (exit codes {codes}; None: killed)")
  import named_embed as ne

  table = ne.load(out)  # one process, no mesh: the whole table
  print(
    f"[launcher] read {out} on one process: {table.vocab_size} tokens,"
    f" {table.num_rows} rows, label {table.embeddings.label!r}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument(
    "--devices", type=int, default=4, help="CPU devices per process (0: the"
    " platform's own devices)"
  )  # fmt: skip
  parser.add_argument(
    "--process-id", help="run as this process (or 'auto'); default: launch"
  )
  parser.add_argument("--coordinator", default=None, help="host:port")
  parser.add_argument("--out", default=None, help="checkpoint directory")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--timeout", type=float, default=60)
  parser.add_argument("--hlo", help="write the train step's compiled HLO here")
  args = parser.parse_args()
  if args.steps < 1 or args.processes < 1:
    parser.error("--steps and --processes must be at least 1")
  if args.process_id is None:
    launch(args)
  elif args.out is None or (args.process_id != "auto" and not args.coordinator):
    parser.error("a process needs --out, and --coordinator unless 'auto'")
  else:
    run_process(args)


if __name__ == "__main__":
  main()
