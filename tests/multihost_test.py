"""Tables spanning processes: several local processes joined by
`jax.distributed` (gloo collectives over localhost), against one process.

Two runs of tests/multihost/worker.py, each reused for many checks:

- ``a``: 2 processes x 4 CPU devices, `Auto` mesh axes ``(data=2,
  model=4)`` and ``(model=8)``: sharded init, lookup / decode / fused loss
  and their gradients, Adam steps, a save (every process its own rows), a
  reload on another mesh, host memory of loads, and failures;
- ``b``: 4 processes x 2 devices, `Explicit` axes ``(data=2, model=4)``,
  where the vocabulary axis spans two processes: a reload of ``a``'s save,
  the same model checks, a save, and a Hugging Face sharded checkpoint.

This process computes the single-process references with the worker's own
model functions on one device. Each worker has a hard timeout, and a
failure prints every worker's stderr.
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
import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from penzai import pz
from safetensors.numpy import save_file

import named_embed as ne
from named_embed._src.files import stored_tensors

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "multihost" / "worker.py"
TIMEOUT_SECONDS = 120  # per run; a run takes about 20-40 s on 2 loaded cores
MiB = 1 << 20


def load_worker():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = load_worker()


def free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(
  scenario, processes, devices, workdir, timeout=TIMEOUT_SECONDS, **options
):
  """Runs the worker's ``scenario`` in ``processes`` local processes;
  returns their exit codes and stderr texts, killing them at ``timeout``."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    NAMED_EMBED_SYNC_TIMEOUT="60",
    # Large allocations from mmap, returned to the system when freed, so
    # that RssAnon measures what a process holds, not what malloc keeps.
    MALLOC_MMAP_THRESHOLD_="65536",
    PYTHONPATH=os.pathsep.join(
      [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  port = options.pop("port", None) or free_port()
  logs, procs = [], []
  for process in range(processes):
    args = [
      sys.executable, str(WORKER), "--scenario", scenario,
      "--process-id", str(options.get("process_id", process)),
      "--processes", str(options.get("num_processes", processes)),
      "--devices", str(devices), "--port", str(port),
      "--workdir", str(workdir),
      "--init-timeout", str(options.get("init_timeout", 60)),
    ]  # fmt: skip
    log = open(workdir / f"{scenario}-{process}.stderr", "w+")
    logs.append(log)
    procs.append(
      subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    )
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):  # one failed: the
      deadline = min(deadline, time.monotonic() + 10)  # others get 10 s
    time.sleep(0.05)
  codes = [p.poll() for p in procs]
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  return codes, texts


def check_run(codes, texts, what):
  if codes != [0] * len(codes):
    shown = "\n".join(
      f"--- process {i} (exit {code}) ---\n{text[-6000:]}"
      for i, (code, text) in enumerate(zip(codes, texts))
    )
    pytest.fail(
      f"{what} failed (exit codes {codes}; None: killed, at the"
      f" {TIMEOUT_SECONDS} s timeout or 10 s after another failed):\n{shown}"
    )


def write_inputs(workdir: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  big = rng.standard_normal((worker.BIG_ROWS, worker.BIG_DIM), np.float32)
  ne.save(ne.EmbeddingTable.from_pretrained(big), workdir / "big.safetensors")
  del big
  odd = np.ones((61, 4), np.float32)
  ne.save(ne.EmbeddingTable.from_pretrained(odd), workdir / "u61.safetensors")
  hf = workdir / "hf"
  hf.mkdir()
  head = rng.standard_normal((64, 16)).astype(np.float32)
  save_file({"lm_head.weight": head}, hf / "model-00001-of-00002.safetensors")
  save_file(
    {"model.embed_tokens.weight": hf_rows(), "model.norm.weight": head[0]},
    hf / "model-00002-of-00002.safetensors",
  )
  weight_map = {
    "lm_head.weight": "model-00001-of-00002.safetensors",
    "model.embed_tokens.weight": "model-00002-of-00002.safetensors",
    "model.norm.weight": "model-00002-of-00002.safetensors",
  }
  (hf / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
  )


def write_compressed(workdir: pathlib.Path) -> None:
  (workdir / "compressed").mkdir()
  for kind, table in worker.compressed_tables().items():
    ne.save(table, workdir / "compressed" / f"{kind}.safetensors")


def hf_rows() -> np.ndarray:
  return np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs ``a`` then ``b`` (b reads a's save); their arrays and notes."""
  workdir = tmp_path_factory.mktemp("multihost")
  write_inputs(workdir)
  write_compressed(workdir)
  results = {}
  for scenario, processes, devices in (("a", 2, 4), ("b", 4, 2)):
    started = time.perf_counter()
    codes, texts = launch(scenario, processes, devices, workdir)
    check_run(codes, texts, f"scenario {scenario}")
    notes = [
      json.loads((workdir / f"{scenario}-{p}.json").read_text())
      for p in range(processes)
    ]
    arrays = dict(np.load(workdir / f"{scenario}.npz"))
    seconds = time.perf_counter() - started
    results[scenario] = types.SimpleNamespace(
      arrays=arrays, notes=notes, seconds=seconds
    )
  results["workdir"] = workdir
  return results


@pytest.fixture(scope="module")
def reference():
  """The same model on this process's one device."""
  kinds = {"a": AxisType.Auto, "b": AxisType.Explicit}
  found = {}
  for scenario, kind in kinds.items():
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(kind,) * 2)
    table = worker.build_table(mesh)
    values = worker.forward(table, *worker.batch(mesh))
    losses, trained = worker.train(
      table, mesh, steps=3 if kind is AxisType.Auto else 2
    )
    found[scenario] = {
      "init_rows": np.asarray(table.rows_array()),
      **{f"forward_{k}": np.asarray(v) for k, v in values.items()},
      "train_losses": np.asarray([float(x) for x in losses]),
      "trained_rows": np.asarray(trained.rows_array()),
    }
  return found


@pytest.mark.parametrize("scenario", ["a", "b"])
def test_sharded_init_equals_the_single_process_table(
  runs, reference, scenario
):
  got = runs[scenario].arrays
  np.testing.assert_array_equal(
    got["init_rows"], reference[scenario]["init_rows"]
  )
  if scenario == "a":  # rows split over both processes' 8 devices
    np.testing.assert_array_equal(
      got["init_rows_model8"], reference["a"]["init_rows"]
    )
  assert not got["init_rows"][0].any()  # the pad token's row
  assert not got["init_rows"][61:].any()  # alignment rows


@pytest.mark.parametrize("scenario", ["a", "b"])
def test_lookup_decode_loss_and_gradients_equal_one_process(
  runs, reference, scenario
):
  got, want = runs[scenario].arrays, reference[scenario]
  np.testing.assert_array_equal(got["forward_rows"], want["forward_rows"])
  np.testing.assert_allclose(
    got["forward_logits"], want["forward_logits"], rtol=1e-6, atol=1e-6
  )
  assert np.isneginf(got["forward_logits"][..., 61:]).all()
  np.testing.assert_allclose(
    got["forward_loss"], want["forward_loss"], rtol=1e-6
  )
  np.testing.assert_allclose(
    got["forward_grad"], want["forward_grad"], rtol=1e-5, atol=1e-7
  )
  assert not got["forward_grad"][61:].any()  # alignment rows: no gradient
  if scenario == "b":  # an eager lookup under "error", ids on 4 processes
    np.testing.assert_array_equal(got["strict_rows"], want["forward_rows"])


@pytest.mark.parametrize("scenario", ["a", "b"])
def test_adam_steps_across_processes_equal_one_process(
  runs, reference, scenario
):
  got, want = runs[scenario].arrays, reference[scenario]
  np.testing.assert_allclose(
    got["train_losses"], want["train_losses"], rtol=1e-5
  )
  np.testing.assert_allclose(
    got["trained_rows"], want["trained_rows"], rtol=1e-4, atol=1e-6
  )
  assert got["train_losses"][-1] < got["train_losses"][0]


def test_saves_across_processes_read_back_bit_exact(runs):
  workdir = runs["workdir"]
  a, b = runs["a"], runs["b"]
  index = "model.safetensors.index.json"
  # a: mesh (data=2, model=4) on 2 processes: each process holds all four
  # row blocks, and writes two of them. b: the same mesh on 4 processes:
  # each row block is on two processes, and each process writes one.
  assert a.notes[0]["a_out_files"] == [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    index,
  ]
  assert b.notes[0]["b_out_files"] == [
    *(f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)),
    index,
  ]
  for scenario, out in (("a", "a_out"), ("b", "b_out")):
    trained = runs[scenario].arrays["trained_rows"]
    loaded = ne.load(workdir / out)  # one process, no mesh
    assert loaded.rows_array().tobytes() == trained.tobytes()
    assert (loaded.vocab_size, loaded.num_rows) == (61, 64)
    assert (loaded.padding_index, loaded.embeddings.label) == (
      0,
      "embed.embeddings",
    )
    one = jax.make_mesh((1,), ("model",))  # a mesh again, one device
    placed = ne.load(workdir / out, mesh=one, rules={"vocabulary": "model"})
    assert np.asarray(placed.rows_array()).tobytes() == trained.tobytes()
    spec = json.loads((workdir / out / index).read_text())
    assert spec["metadata"]["named_embed"] == "1"
    assert all(k.startswith("embeddings[") for k in spec["weight_map"])
  # reloaded on other meshes by the processes themselves
  assert a.arrays["reloaded_model8"].tobytes() == (
    a.arrays["trained_rows"].tobytes()
  )
  assert a.notes[0]["reloaded_spec"] == "P('model', None)"
  assert b.arrays["reloaded_from_a"].tobytes() == (
    a.arrays["trained_rows"].tobytes()
  )


def test_loading_with_a_mesh_holds_the_process_share_only(runs):
  notes = runs["a"].notes
  table = worker.BIG_ROWS * worker.BIG_DIM * 4  # 64 MiB, half per process
  share = table // 2
  for process, note in enumerate(notes):
    for load in ("file_load", "directory_load"):
      grew = note[load]
      assert 0.8 * share < grew["grew"] < share + 2 * MiB, (process, load, grew)
      # At the peak, all resident memory (the kernel's high-water mark,
      # file pages mapped included): the share itself, no second copy of
      # it, nor of one device's rows, nor of the file.
      assert grew["resident_at_peak"] < share + 4 * MiB, (process, load, grew)
      assert grew["grew_at_peak"] < share + 4 * MiB, (process, load, grew)
    # saving writes the shards where they are: no copy of the table, not
    # even of the process's share (on CPU devices; see docs/sharding.md)
    saved = note["directory_save"]
    assert saved["resident_at_peak"] < share / 4, (process, saved)
    # the control: without a mesh, each process reads the whole table
    assert note["whole_load"]["grew"] > 0.9 * table, note["whole_load"]
    # ... once: read into one buffer that the CPU device adopts
    assert note["whole_load"]["resident_at_peak"] < table + 4 * MiB, note
    assert note["file_load_files"] == ["big.safetensors"]
    # the directory holds one file per process: each reads its own only
    assert note["big_out_files"] == [
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
    ]
    own = f"model-0000{process + 1}-of-00002.safetensors"
    assert note["directory_load_files"] == [own]


def test_loading_on_four_processes_holds_a_quarter_at_the_peak(runs):
  table = worker.BIG_ROWS * worker.BIG_DIM * 4  # 64 MiB
  share = table // 4  # the rows of this process's 2 of the 8 devices
  for process, note in enumerate(runs["b"].notes):
    grew = note["file_load"]
    assert 0.8 * share < grew["grew"] < share + 2 * MiB, (process, grew)
    assert grew["resident_at_peak"] < share + 4 * MiB, (process, grew)


def rows_read(lines: list[str], tensor: str) -> list[tuple[int, int]]:
  """The row ranges of ``tensor`` (in the whole tensor) that the debug
  lines "reading [a:b,...] of <file>, tensor 'name'" say were read."""
  found = []
  for line in lines:
    local, name = line.split("[", 1)[1].split("]")[0], line.split("'")[-2]
    key, start, _ = stored_tensors.parse_block_name(name)
    if key == tensor:
      first, last = (int(x) for x in local.split(",")[0].split(":"))
      offset = start[0] if start else 0
      found.append((first + offset, last + offset))
  return sorted(found)


def merged_ranges(ranges):
  merged = []
  for a, b in sorted(ranges):
    if merged and merged[-1][1] == a:
      merged[-1] = (merged[-1][0], b)
    else:
      merged.append((a, b))
  return merged


ROW_ALIGNED = {"embeddings", "codes", "scales", "lora_a"}


@pytest.mark.parametrize("kind", list(worker.compressed_tables()))
def test_compressed_and_adapted_tables_across_processes(runs, kind):
  """Loaded on 2 processes (8 devices, Auto) from one file, saved as a
  directory, loaded from it on 4 processes (Explicit, (data=2, model=4)),
  saved again: each save reads back on one process bit for bit (so the
  processes held the right values), each process read its rows only."""
  want = worker.compressed_tables()[kind]
  want_leaves = [np.asarray(leaf) for leaf in worker.leaves(want)]
  workdir = runs["workdir"]
  for scenario in ("a", "b"):
    run = runs[scenario]
    dtypes = [str(x.dtype) for x in want_leaves]
    assert all(note[f"{kind}_dtypes"] == dtypes for note in run.notes)
    assert run.notes[0][f"{kind}_type"] == type(want).__name__
    again = ne.load(workdir / f"{scenario}_{kind}")  # one process, no mesh
    assert type(again) is type(want)
    for x, y in zip(want_leaves, worker.leaves(again)):
      assert x.dtype == y.dtype and x.tobytes() == np.asarray(y).tobytes()
    assert (again.vocab_size, again.num_rows) == (want.vocab_size, 64)
    assert again.padding_index == want.padding_index
    assert [p.label for p in pz.unbind_params(again)[1]] == [
      p.label for p in pz.unbind_params(want)[1]
    ]
  # Which rows each process read: of the tensors that lead with the
  # vocabulary, only its own devices' rows; the small ones whole.
  tensors = {
    line.split("'")[-2].split("[")[0]
    for line in runs["a"].notes[0][f"{kind}_read"]
  }
  assert ROW_ALIGNED & tensors
  per_process = {"a": 32, "b": 32}  # a: 4 of 8 devices; b: 2 of 4 blocks
  for scenario, rows in per_process.items():
    for process, note in enumerate(runs[scenario].notes):
      own = process if scenario == "a" else process % 2
      for tensor in tensors:
        read = merged_ranges(rows_read(note[f"{kind}_read"], tensor))
        if tensor in ROW_ALIGNED:
          assert read == [(own * rows, own * rows + rows)], (
            scenario,
            process,
            tensor,
            read,
          )
        else:  # B {rank, embedding}, trained rows {rows, embedding}
          assert len(read) == 1 and read[0][0] == 0, (scenario, tensor, read)
  # placed as `ne.shard` places them
  meshes = {
    "a": (jax.make_mesh((1,), ("model",)), worker.ROW_RULES),
    "b": (jax.make_mesh((1, 1), ("data", "model")), worker.RULES),
  }
  for scenario, (mesh, rules) in meshes.items():
    placed = worker.leaves(ne.shard(want, mesh, rules))
    specs = [str(leaf.sharding.spec) for leaf in placed]
    assert "P('model', None)" in specs or "P('model',)" in specs, specs
    for note in runs[scenario].notes:
      assert note[f"{kind}_specs"] == specs, (scenario, note[f"{kind}_specs"])


def test_failures_raise_on_every_process(runs):
  notes = runs["a"].notes
  for process, note in enumerate(notes):
    missing = note["missing_file"]
    assert missing["type"] == "FileNotFoundError", missing
    if process == 0:  # told by process 1, which has no such file
      assert "failed on process 1 of 2" in missing["message"], missing
    assert "missing.safetensors" in missing["message"]
    mismatch = note["mesh_mismatch"]
    assert mismatch["type"] == "ValueError"
    assert (
      "{'vocabulary': 61, 'embedding': 4} does not fit mesh"
      in (mismatch["message"])
    )
    assert "{'model': 8}" in mismatch["message"]
    one_file = note["one_file"]
    assert one_file["type"] == "ValueError"
    assert "spread over 2 processes" in one_file["message"]
  diverged = notes[0]["diverged"]
  assert diverged["type"] == "TimeoutError", diverged
  assert "waited 3 s for the other 1 processes" in diverged["message"]
  assert 2.5 < notes[0]["diverged_seconds"] < 20


def test_hugging_face_checkpoint_reads_one_file_across_processes(runs):
  b = runs["b"]
  np.testing.assert_array_equal(b.arrays["hf_rows"], hf_rows())
  for note in b.notes:
    assert note["hf_files"] == ["model-00002-of-00002.safetensors"]
    assert note["hf_spec"] == "P('model', None)"
    assert note["hf_padding_index"] == 0
  assert b.notes[0]["process_grid"] == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_runs_stay_within_their_time_budget(runs):
  assert runs["a"].seconds < TIMEOUT_SECONDS
  assert runs["b"].seconds < TIMEOUT_SECONDS


def test_an_unreachable_coordinator_fails_in_seconds(tmp_path):
  started = time.perf_counter()
  codes, texts = launch(
    "join", 1, 1, tmp_path, timeout=60, process_id=1, num_processes=2,
    init_timeout=3,
  )  # fmt: skip
  seconds = time.perf_counter() - started
  assert codes[0] not in (0, None), texts[0]
  assert "process 1 of 2 could not reach the coordinator" in texts[0]
  assert seconds < 30, seconds
