"""Whole-model orbax checkpoints across processes: 2 local processes x 4
CPU devices joined by `jax.distributed` (gloo), running
tests/multihost/orbax_worker.py.

The processes place a model of every kind of table on the mesh
``(model=8)`` (each holds half the rows), save it with
`named_embed.orbax.save` (each writes its own shards), and restore it
into an uncomputed template onto the same mesh and onto ``(data=2,
model=4)``. This process builds the same model on one device (the
reference, bit for bit), checks where the arrays landed against
`ne.shard` of it, and restores the processes' checkpoint itself, on one
device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from penzai import pz

import named_embed as ne
from named_embed import orbax as ne_orbax

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "multihost" / "orbax_worker.py"
PROCESSES, DEVICES = 2, 4
TIMEOUT_SECONDS = 120  # a run takes about 15-25 s on 2 loaded cores


def load_worker():
  sys.path.insert(0, str(WORKER.parent))  # its `import worker`
  try:
    spec = importlib.util.spec_from_file_location("orbax_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(WORKER.parent))
  return module


orbax_worker = load_worker()


def free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir: pathlib.Path):
  """Runs the worker in `PROCESSES` processes; their exit codes and
  output, each killed at the timeout (or 10 s after another failed)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(
      [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  port = free_port()
  logs, procs = [], []
  for process in range(PROCESSES):
    args = [
      sys.executable, str(WORKER), "--process-id", str(process),
      "--processes", str(PROCESSES), "--devices", str(DEVICES),
      "--port", str(port), "--workdir", str(workdir),
    ]  # fmt: skip
    log = open(workdir / f"orbax-{process}.log", "w+")
    logs.append(log)
    procs.append(
      subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    )
  deadline = time.monotonic() + TIMEOUT_SECONDS
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      deadline = min(deadline, time.monotonic() + 10)
    time.sleep(0.05)
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  return [p.returncode for p in procs], texts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("orbax_multihost")
  started = time.perf_counter()
  codes, texts = launch(workdir)
  seconds = time.perf_counter() - started
  if codes != [0] * PROCESSES:
    shown = "\n".join(
      f"--- process {i} (exit {code}) ---\n{text[-6000:]}"
      for i, (code, text) in enumerate(zip(codes, texts))
    )
    pytest.fail(f"the workers failed (exit codes {codes}):\n{shown}")
  notes = [
    json.loads((workdir / f"orbax-{i}.json").read_text())
    for i in range(PROCESSES)
  ]
  with np.load(workdir / "orbax.npz") as data:
    arrays = dict(data)
  return {"workdir": workdir, "notes": notes, "arrays": arrays, "s": seconds}


def reference_arrays():
  return [np.asarray(x) for x in orbax_worker.leaves(orbax_worker.build())]


@pytest.mark.parametrize("name", ["saved", "same_mesh", "other_mesh"])
def test_every_array_restores_bit_exact_across_processes(run, name):
  want = reference_arrays()
  got = [run["arrays"][f"{name}_{i}"] for i in range(len(want))]
  for x, y in zip(got, want):
    assert (x.dtype, x.shape) == (y.dtype, y.shape)
    assert x.tobytes() == y.tobytes()
  for note in run["notes"]:
    assert note[f"{name}_tied"] == [True, True, True]


def test_arrays_land_where_ne_shard_puts_them(run):
  model = orbax_worker.build()
  layouts = {
    "saved": (jax.make_mesh((1,), ("model",)), orbax_worker.ROWS8),
    "same_mesh": (jax.make_mesh((1,), ("model",)), orbax_worker.ROWS8),
    "other_mesh": (
      jax.make_mesh((1, 1), ("data", "model")),
      orbax_worker.RULES,
    ),
  }
  for name, (mesh, rules) in layouts.items():
    placed = orbax_worker.leaves(ne.shard(model, mesh, rules))
    specs = [str(x.sharding.spec) for x in placed]
    assert "P('model', None)" in specs
    for note in run["notes"]:
      assert note[f"{name}_specs"] == specs, name
      assert set(note[f"{name}_rows_specs"]) == {"P('model', None)"}


def test_each_process_holds_its_own_rows(run):
  shapes = {  # leaf 0: the trainable rows, 64 x 8; its int8 codes alike
    "saved": [[8, 8]],  # (model=8): 4 devices a process, 8 rows each
    "same_mesh": [[8, 8]],
    "other_mesh": [[16, 8]],  # (data=2, model=4): 16 rows a device
  }
  for name, want in shapes.items():
    for note in run["notes"]:
      assert note[f"{name}_shards"][0] == want, (name, note[f"{name}_shards"])


def test_each_process_wrote_its_own_shards(run):
  # orbax's OCDBT layout: one data directory a process that wrote
  checkpoint = run["workdir"] / "checkpoint"
  written = sorted(p.name for p in checkpoint.glob("ocdbt.process_*"))
  assert written == ["ocdbt.process_0", "ocdbt.process_1"]


def test_the_processes_checkpoint_restores_on_one_device(run):
  template = ne_orbax.eval_shape_model(orbax_worker.build)
  restored = ne_orbax.restore(run["workdir"] / "checkpoint", template)
  got = orbax_worker.leaves(restored)
  for x, y in zip(got, reference_arrays()):
    assert np.asarray(x).tobytes() == y.tobytes()
  params = pz.unbind_params(restored)[1]
  assert [p.label for p in params] == [
    "t.embeddings",
    "l.lora_a",
    "l.lora_b",
    "r.trainable_rows",
  ]


def test_the_run_stays_within_its_time_budget(run):
  assert run["s"] < TIMEOUT_SECONDS
  for note in run["notes"]:
    assert note["save_seconds"] < 30 and note["restore_seconds"] < 30, note
