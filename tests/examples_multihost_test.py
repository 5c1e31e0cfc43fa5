"""Runs examples/multihost.py as a user would: its launcher starts local
processes joined by `jax.distributed`, then reads their save on one."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "multihost.py"
TIMEOUT_SECONDS = 180  # the launcher kills its processes after 4 x --timeout


def run_script(*args: str) -> subprocess.CompletedProcess:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_NUMPY_DTYPE_PROMOTION="strict",
    JAX_NUMPY_RANK_PROMOTION="raise",
    PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  return subprocess.run(
    [sys.executable, str(SCRIPT), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_SECONDS,
    check=False,
  )


def test_docstring_says_how_to_run_it():
  docstring = SCRIPT.read_text(encoding="utf-8").split('"""')[1]
  assert "python examples/multihost.py --processes 2 --devices 4" in docstring


def test_two_processes_train_save_and_reload(tmp_path):
  out = tmp_path / "checkpoint"
  result = run_script(
    "--processes", "2", "--devices", "2", "--steps", "8", "--timeout", "30",
    "--out", str(out),
  )  # fmt: skip
  shown = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
  assert result.returncode == 0, shown
  text = result.stdout
  assert "2 processes x 2 cpu devices; mesh {'data': 2, 'model': 2}" in text
  losses = [float(x) for x in re.findall(r"step +\d+  loss (\S+)", text)]
  assert len(losses) >= 2 and losses[-1] < losses[0], shown
  assert "model-00002-of-00002.safetensors" in text
  for process in (0, 1):  # the reload on (model=4): half the rows each
    assert (
      f"[process {process}] reloaded on mesh {{'model': 4}}: 64,256 of"
      " 128,512 bytes on this process" in text
    ), shown
    assert (
      f"[process {process}] reloaded rows equal the trained rows: True"
      in (text)
    )
  assert "[launcher] read" in text and "1001 tokens, 1004 rows" in text
  assert sorted(os.listdir(out))[-1] == "model.safetensors.index.json"


def test_a_process_without_its_coordinator_fails_fast():
  result = run_script(
    "--process-id", "1", "--processes", "2", "--devices", "1",
    "--coordinator", "localhost:9", "--out", "unused", "--timeout", "2",
  )  # fmt: skip
  assert result.returncode != 0
  assert "process 1 could not reach the coordinator at localhost:9" in (
    result.stderr
  )
