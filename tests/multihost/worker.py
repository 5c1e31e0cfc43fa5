"""One process of a multi-process named_embed run, for tests/multihost_test.py.

Started N times on localhost (``--process-id 0..N-1``); each process gets
``--devices`` CPU devices, and JAX's distributed runtime joins them into
one set of devices with real cross-process collectives (gloo). Each
*scenario* runs several checks in the same processes and writes what the
test compares: ``<scenario>.npz`` (arrays, from process 0) and
``<scenario>-<process>.json`` (messages, memory figures, files read).

The model functions (`build_table`, `forward`, `train`) also run in the
test process on one device: they give the single-process reference.

  python tests/multihost/worker.py --scenario a --process-id 0 \\
      --processes 2 --devices 4 --port 12345 --workdir /tmp/run

Without ``--process-id`` it launches the processes itself. The scenario
``peak`` measures the peak host memory of ``ne.load(..., mesh=, rules=)``
for a table of ``--table-mib`` MiB split over every device, and prints
each process's figures (docs/sharding.md, "Across hosts")::

  python tests/multihost/worker.py --scenario peak --processes 4 \\
      --devices 2 --table-mib 512
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import pathlib
import sys
import threading
import time
import traceback

VOCAB = 61  # tokens; the table has 64 rows (pad_to_multiple=8)
EMBED = 16
PAD_MULTIPLE = 8
RULES = {"vocabulary": "model", "batch": "data"}
ROW_RULES = {"vocabulary": "model"}  # for a mesh with one "model" axis
BIG_ROWS, BIG_DIM = 131072, 128  # a 64 MiB float32 table


# ------------------------------------------------------------ the model


def build_table(mesh):
  """The table, built in its sharded layout (`ne.sharded_init`)."""
  import jax

  import named_embed as ne

  rules = RULES if "data" in mesh.shape else ROW_RULES
  return ne.sharded_init(
    ne.EmbeddingTable.from_config,
    mesh,
    rules,
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=VOCAB,
    embedding_axes={"embedding": EMBED},
    padding_index=0,
    pad_to_multiple=PAD_MULTIPLE,
  )


def batch(mesh, seed=1):
  """Token ids and next-token targets ``{batch: 4, seq: 6}``, batch split
  over ``data``; a target is an alignment-row id (61) at one position."""
  import numpy as np
  from penzai import pz

  import named_embed as ne

  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(4, 7)).astype(np.int32)
  ids[0, 1] = 0  # the pad token's row
  inputs = pz.nx.wrap(ids[:, :-1]).tag("batch", "seq")
  targets = pz.nx.wrap(ids[:, 1:]).tag("batch", "seq")
  return ne.shard((inputs, targets), mesh, RULES)


def forward(table, inputs, targets):
  """Lookup rows, decode logits, fused loss, and the gradient of the tied
  table through the lookup and the loss."""
  import jax
  import jax.numpy as jnp
  from penzai import pz

  import named_embed as ne

  def loss_fn(table, inputs, targets):
    hidden = ne.lookup(table, inputs)
    loss = ne.decode_cross_entropy(table, hidden, targets, chunk_size=4)
    rows = hidden.unwrap("batch", "seq", "embedding")
    return loss + 0.01 * jnp.sum(rows), (rows, hidden)

  @jax.jit
  def run(table, inputs, targets):
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (rows, hidden)), grad = value_and_grad(table, inputs, targets)
    logits = ne.decode(table, hidden).unwrap("batch", "seq", "vocabulary")
    return rows, logits, loss, grad.rows_array()

  with jax.set_mesh(table.rows_sharding.mesh):
    rows, logits, loss, grad = run(pz.freeze_params(table), inputs, targets)
  return {"rows": rows, "logits": logits, "loss": loss, "grad": grad}


def train(table, mesh, steps):
  """``steps`` Adam steps on the fused loss; the losses and the table."""
  import jax
  import optax
  from penzai import pz

  import named_embed as ne

  rules = RULES
  model_def, values = pz.unbind_params(table, freeze=True)
  optimizer = optax.adam(0.05)

  def loss_fn(values, inputs, targets):
    table = pz.bind_variables(model_def, values)
    hidden = ne.lookup(table, inputs)
    return ne.decode_cross_entropy(table, hidden, targets, chunk_size=4)

  @jax.jit
  def step(values, state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(values, inputs, targets)
    grads = ne.shard(grads, mesh, rules)
    with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
      updates, state = optimizer.update(grads, state, values)
    return optax.apply_updates(values, updates), state, loss

  losses = []
  with jax.set_mesh(mesh):
    state = jax.jit(optimizer.init)(values)
    for _ in range(steps):
      inputs, targets = batch(mesh, seed=10)  # the same batch: loss falls
      values, state, loss = step(values, state, inputs, targets)
      losses.append(loss)
  return losses, pz.bind_variables(model_def, values)


def compressed_tables():
  """Quantised and adapted tables, with and without alignment rows, whose
  every array holds distinct values (LoRA's A starts at zero otherwise).
  The test writes them to files on one process; the scenarios load them
  across processes, save them, and reload each other's saves."""
  import jax
  import ml_dtypes
  import numpy as np
  from penzai import pz

  import named_embed as ne

  rng = np.random.default_rng(5)
  rows = rng.standard_normal((64, EMBED)).astype(np.float32)
  vocab = ne.Vocabulary([f"t{i}" for i in range(VOCAB)], pad="t0")
  padded = (  # 61 tokens and 3 alignment rows
    ne.EmbeddingTable.from_pretrained(rows[:VOCAB])
    .with_vocabulary(vocab)
    .padded_to_multiple(PAD_MULTIPLE)
  )
  bf16 = ne.EmbeddingTable.from_pretrained(  # 64 tokens, no alignment rows
    rows.astype(ml_dtypes.bfloat16), padding_index=0
  )

  def filled(table):
    for param in pz.unbind_params(table)[1]:
      value = param.value
      shape = tuple(value.named_shape.values())
      data = rng.standard_normal(shape).astype(value.dtype)
      param.value = pz.nx.wrap(data, *value.named_shape)
    return table

  key = jax.random.key(3)
  return {
    "int8": padded.quantized("int8"),
    "int4_g4": padded.quantized("int4", group_size=4),
    "int4": bf16.quantized("int4"),
    "lora_bf16": filled(bf16.with_lora(4, name="l", init_base_rng=key)),
    "lora_int8": filled(
      padded.quantized("int8").with_lora(
        2, alpha=3.0, name="l", init_base_rng=key
      )
    ),
    "rows": filled(padded.with_trainable_rows(["t3", "t40"], name="r")),
  }


def leaves(table):
  """The arrays of a table, in a fixed order (parameters' values too)."""
  import jax
  from penzai import pz

  return jax.tree.leaves(pz.freeze_params(table))


# ------------------------------------------------------------ utilities


def gather(array):
  """The whole of a global array on every process (tests only)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def status(field: str = "RssAnon") -> int:
  """A memory figure of this process from /proc/self/status, in bytes.

  ``RssAnon``: anonymous resident memory (not the file pages mapped from
  the page cache, which reading a memory-mapped file adds). ``VmHWM``: the
  peak of all resident memory since `reset_peak`."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def rss_anon() -> int:
  return status("RssAnon")


def reset_peak() -> None:
  """Resets VmHWM to the current resident memory (Linux 4.0+)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


class PeakMemory:
  """Samples `rss_anon` in a thread: the growth over the block, at its
  peak and at its end."""

  def __enter__(self):
    gc.collect()
    reset_peak()
    self.rss = status("VmRSS")
    self.base = self.peak = rss_anon()
    self._running = True
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while self._running:
      self.peak = max(self.peak, rss_anon())
      time.sleep(0.0005)

  def __exit__(self, *exc):
    self._running = False
    self._thread.join()
    self.end = rss_anon()
    self.peak = max(self.peak, self.end)
    self.grew_at_peak = self.peak - self.base
    self.grew = self.end - self.base
    # Sampling misses peaks while the main thread holds the GIL (safetensors
    # serialising a file); the kernel's high-water mark does not, but it
    # counts file pages too (those of a memory-mapped read).
    self.resident_at_peak = status("VmHWM") - self.rss


class FilesRead(logging.Handler):
  """Collects named_embed's debug lines "reading [...] of <file>, ..."."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())

  def __enter__(self):
    logger = logging.getLogger("named_embed")
    self._level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(self)
    return self

  def __exit__(self, *exc):
    logger = logging.getLogger("named_embed")
    logger.removeHandler(self)
    logger.setLevel(self._level)

  def files(self):
    return sorted(
      {
        os.path.basename(line.split(" of ")[1].split(",")[0])
        for line in self.lines
      }
    )


def outcome(call):
  """``{"type", "message"}`` of what ``call()`` raised, or None."""
  try:
    call()
  except Exception as error:  # the checks expect specific errors
    return {"type": type(error).__name__, "message": str(error)}
  return None


# ------------------------------------------------------------ scenarios


def scenario_a(args, arrays, notes):
  """2 processes x 4 devices, Auto axes: init, forward, train, save,
  reload on another mesh, memory, and the failures."""
  import jax
  from jax.sharding import AxisType

  import named_embed as ne

  auto = (AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
  rows8 = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  table = build_table(mesh)
  arrays["init_rows"] = gather(table.rows_array())
  arrays["init_rows_model8"] = gather(build_table(rows8).rows_array())
  for name, value in forward(table, *batch(mesh)).items():
    arrays[f"forward_{name}"] = gather(value)
  losses, trained = train(table, mesh, steps=3)
  arrays["train_losses"] = [float(loss) for loss in losses]
  arrays["trained_rows"] = gather(trained.rows_array())
  out = os.path.join(args.workdir, "a_out")
  ne.save(trained, out)  # every process writes its own blocks
  notes["a_out_files"] = sorted(os.listdir(out))
  again = ne.load(out, mesh=rows8, rules=ROW_RULES)
  notes["reloaded_spec"] = str(again.rows_array().sharding.spec)
  notes["reloaded_label"] = again.embeddings.label
  arrays["reloaded_model8"] = gather(again.rows_array())
  memory(args, notes, rows8)
  compressed(
    args, arrays, notes, "a", rows8, ROW_RULES, "compressed/{}.safetensors"
  )
  failures(args, notes, rows8, trained)


def memory(args, notes, mesh):
  """Host memory of loads with a mesh, against a load without one."""
  import named_embed as ne

  big = os.path.join(args.workdir, "big.safetensors")
  with PeakMemory() as from_file, FilesRead() as read:
    table = ne.load(big, mesh=mesh, rules=ROW_RULES)
    table.rows_array().block_until_ready()
  notes["file_load"] = vars_of(from_file)
  notes["file_load_files"] = read.files()
  directory = os.path.join(args.workdir, "big_out")
  with PeakMemory() as saving:
    ne.save(table, directory)
  notes["directory_save"] = vars_of(saving)
  notes["big_out_files"] = sorted(os.listdir(directory))
  del table
  with PeakMemory() as from_directory, FilesRead() as read:
    table = ne.load(directory, mesh=mesh, rules=ROW_RULES)
    table.rows_array().block_until_ready()
  notes["directory_load"] = vars_of(from_directory)
  notes["directory_load_files"] = read.files()
  del table
  with PeakMemory() as whole:
    table = ne.load(big)  # mesh=None: the whole table on this process
    table.rows_array().block_until_ready()
  notes["whole_load"] = vars_of(whole)
  del table


def compressed(args, arrays, notes, scenario, mesh, rules, source) -> None:
  """Loads each compressed or adapted table from ``source`` on ``mesh``,
  notes the regions each process read and the arrays' shardings, and saves
  it to the directory ``<scenario>_<kind>``, every process its own blocks
  (the test reads the saves back on one process)."""
  import named_embed as ne

  started = time.perf_counter()
  for kind in compressed_tables():
    path = os.path.join(args.workdir, source.format(kind))
    with FilesRead() as read:
      table = ne.load(path, mesh=mesh, rules=rules)
    notes[f"{kind}_read"] = read.lines
    notes[f"{kind}_type"] = type(table).__name__
    notes[f"{kind}_dtypes"] = [str(leaf.dtype) for leaf in leaves(table)]
    notes[f"{kind}_specs"] = [str(leaf.sharding.spec) for leaf in leaves(table)]
    ne.save(table, os.path.join(args.workdir, f"{scenario}_{kind}"))
  notes["compressed_seconds"] = time.perf_counter() - started


def vars_of(measure: PeakMemory) -> dict:
  return {
    "grew": measure.grew,
    "grew_at_peak": measure.grew_at_peak,
    "resident_at_peak": measure.resident_at_peak,
  }


def failures(args, notes, mesh, trained):
  """Errors every process must raise together (none may hang)."""
  import named_embed as ne

  work = args.workdir
  mine = "big.safetensors" if args.process_id == 0 else "missing.safetensors"
  notes["missing_file"] = outcome(
    lambda: ne.load(os.path.join(work, mine), mesh=mesh, rules=ROW_RULES)
  )
  notes["mesh_mismatch"] = outcome(
    lambda: ne.load(
      os.path.join(work, "u61.safetensors"), mesh=mesh, rules=ROW_RULES
    )
  )
  notes["one_file"] = outcome(
    lambda: ne.save(trained, os.path.join(work, "t.safetensors"))
  )
  # Last: process 1 skips a load that process 0 makes. Process 0 must give
  # up after NAMED_EMBED_SYNC_TIMEOUT seconds instead of hanging.
  os.environ["NAMED_EMBED_SYNC_TIMEOUT"] = "3"
  started = time.perf_counter()
  if args.process_id == 0:
    notes["diverged"] = outcome(
      lambda: ne.load(os.path.join(work, "a_out"), mesh=mesh, rules=ROW_RULES)
    )
  notes["diverged_seconds"] = time.perf_counter() - started


def scenario_b(args, arrays, notes):
  """4 processes x 2 devices, Explicit axes: reload A's save, init,
  forward, train, save, and a Hugging Face checkpoint."""
  import jax

  import named_embed as ne

  mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit by default
  notes["process_grid"] = [
    [d.process_index for d in row] for row in mesh.devices
  ]
  reloaded = ne.load(
    os.path.join(args.workdir, "a_out"), mesh=mesh, rules=RULES
  )
  arrays["reloaded_from_a"] = gather(reloaded.rows_array())
  table = build_table(mesh)
  arrays["init_rows"] = gather(table.rows_array())
  for name, value in forward(table, *batch(mesh)).items():
    arrays[f"forward_{name}"] = gather(value)
  inputs, _ = batch(mesh)  # eager, with ids on every process: checked inside
  strict = ne.lookup(table, inputs, out_of_range="error")
  arrays["strict_rows"] = gather(strict.unwrap("batch", "seq", "embedding"))
  losses, trained = train(table, mesh, steps=2)
  arrays["train_losses"] = [float(loss) for loss in losses]
  arrays["trained_rows"] = gather(trained.rows_array())
  out = os.path.join(args.workdir, "b_out")
  ne.save(trained, out)
  notes["b_out_files"] = sorted(os.listdir(out))
  vocab = ne.Vocabulary([f"t{i}" for i in range(64)], pad="t0")
  with FilesRead() as read:
    hf = ne.from_safetensors(
      os.path.join(args.workdir, "hf"),
      "model.embed_tokens.weight",
      vocabulary=vocab,
      mesh=mesh,
      rules=RULES,
    )
  notes["hf_files"] = read.files()
  notes["hf_spec"] = str(hf.rows_array().sharding.spec)
  notes["hf_padding_index"] = hf.padding_index
  arrays["hf_rows"] = gather(hf.rows_array())
  compressed(args, arrays, notes, "b", mesh, RULES, "a_{}")
  # the big table over all 8 devices: a quarter of it on each process
  rows8 = jax.make_mesh((8,), ("model",))
  with PeakMemory() as from_file:
    table = ne.load(
      os.path.join(args.workdir, "big.safetensors"), mesh=rows8, rules=ROW_RULES
    )
    table.rows_array().block_until_ready()
  notes["file_load"] = vars_of(from_file)
  del table


def scenario_peak(args, arrays, notes):
  """The peak host memory of a load with a mesh over every device, of the
  table file ``--workdir/peak-<MiB>.safetensors`` (see `launch_peak`)."""
  import jax
  import numpy as np

  import named_embed as ne

  mesh = jax.make_mesh((jax.device_count(),), ("model",))
  path = os.path.join(args.workdir, f"peak-{args.table_mib}.safetensors")
  warm = os.path.join(args.workdir, f"warm-{args.process_id}.safetensors")
  small = np.ones((jax.device_count(), 4), np.float32)  # compiles, caches
  ne.save(ne.EmbeddingTable.from_pretrained(small), warm)
  ne.load(warm, mesh=mesh, rules=ROW_RULES).rows_array().block_until_ready()
  with PeakMemory() as load:
    table = ne.load(path, mesh=mesh, rules=ROW_RULES)
    table.rows_array().block_until_ready()
  notes["load"] = vars_of(load)
  notes["share"] = sum(
    s.data.nbytes for s in table.rows_array().addressable_shards
  )
  del table
  with PeakMemory() as whole:  # for contrast: every process the whole table
    table = ne.load(path)
    table.rows_array().block_until_ready()
  notes["whole_load"] = vars_of(whole)


def launch_peak(args) -> None:
  """Writes the table file if missing, runs `scenario_peak` in
  ``--processes`` local processes, and prints their figures."""
  import contextlib
  import socket
  import subprocess
  import tempfile

  import numpy as np

  import named_embed as ne

  workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="peak-"))
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / f"peak-{args.table_mib}.safetensors"
  dim = 1024
  rows = args.table_mib * (1 << 20) // (4 * dim)
  if not path.exists():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, dim), np.float32)
    ne.save(ne.EmbeddingTable.from_pretrained(table), path)
    del table
  with contextlib.closing(socket.socket()) as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="65536")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        "--scenario",
        "peak",
        "--process-id",
        str(p),
        "--processes",
        str(args.processes),
        "--devices",
        str(args.devices),
        "--port",
        str(port),
        "--workdir",
        str(workdir),
        "--table-mib",
        str(args.table_mib),
      ],  # fmt: skip
      env=env,
    )
    for p in range(args.processes)
  ]
  codes = [proc.wait() for proc in procs]
  if codes != [0] * len(codes):
    sys.exit(f"processes exited with {codes}")
  MiB = 1 << 20
  print(
    f"ne.load of a {args.table_mib} MiB float32 table ({rows} x {dim}),"
    f" {args.processes} processes x {args.devices} CPU devices, the"
    " vocabulary over all devices; growth over the resident memory before"
    " the load, in MiB:"
  )
  print(
    "process  share  peak (VmHWM)  peak RssAnon (sampled)  retained"
    "  | without a mesh: peak  retained"
  )
  for p in range(args.processes):
    notes = json.loads((workdir / f"peak-{p}.json").read_text())
    load, whole = notes["load"], notes["whole_load"]
    print(
      f"{p:7d}  {notes['share'] / MiB:5.0f}  {load['resident_at_peak'] / MiB:12.1f}"
      f"  {load['grew_at_peak'] / MiB:22.1f}  {load['grew'] / MiB:8.1f}"
      f"  | {whole['resident_at_peak'] / MiB:20.1f}  {whole['grew'] / MiB:8.1f}"
    )


SCENARIOS = {"a": scenario_a, "b": scenario_b, "peak": scenario_peak}


# ------------------------------------------------------------ main


def initialize(args) -> None:
  """Joins the other processes. A coordinator that cannot be reached in
  ``--init-timeout`` seconds is a clear error: JAX itself would abort the
  process (SIGABRT) with a stack trace."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", args.devices)
  address = f"localhost:{args.port}"
  if args.process_id != 0:  # process 0 runs the coordinator
    wait_for_coordinator("localhost", args.port, args.init_timeout, args)
  jax.distributed.initialize(
    coordinator_address=address,
    num_processes=args.processes,
    process_id=args.process_id,
    initialization_timeout=args.init_timeout,
    heartbeat_timeout_seconds=30,
    shutdown_timeout_seconds=30,
  )


def wait_for_coordinator(host, port, timeout, args) -> None:
  import socket

  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, port), timeout=1).close()
      return
    except OSError as error:
      if time.monotonic() > deadline:
        sys.exit(
          f"process {args.process_id} of {args.processes} could not reach"
          f" the coordinator at {host}:{port} within {timeout} s ({error})."
          " Is process 0 running, and is the port open?"
        )
      time.sleep(0.1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scenario", choices=(*SCENARIOS, "join"), required=True)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument("--port", type=int)
  parser.add_argument("--workdir", type=pathlib.Path)
  parser.add_argument("--init-timeout", type=int, default=60)
  parser.add_argument("--table-mib", type=int, default=512)
  args = parser.parse_args()
  if args.process_id is None:
    if args.scenario != "peak":
      parser.error("without --process-id, only --scenario peak runs")
    launch_peak(args)
    return
  started = time.perf_counter()
  initialize(args)
  import numpy as np

  notes = {"joined_seconds": time.perf_counter() - started}
  arrays = {}
  if args.scenario != "join":
    SCENARIOS[args.scenario](args, arrays, notes)
  notes["seconds"] = time.perf_counter() - started
  name = f"{args.scenario}-{args.process_id}.json"
  (args.workdir / name).write_text(json.dumps(notes, indent=1))
  if args.process_id == 0 and arrays:
    np.savez(args.workdir / f"{args.scenario}.npz", **arrays)


if __name__ == "__main__":
  try:
    main()
  except Exception:
    traceback.print_exc()
    sys.exit(1)
