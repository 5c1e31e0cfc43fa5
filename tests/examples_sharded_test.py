"""Runs examples/sharded_lm.py as a user would, in a subprocess.

The script configures 8 CPU devices before JAX's backend starts, which the
test process (one device, already started) cannot do: hence the subprocess.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "sharded_lm.py"
TIMEOUT_SECONDS = 300  # generous: a loaded CI machine compiles slowly


def run_script(*args: str) -> subprocess.CompletedProcess:
  env = dict(
    os.environ,
    JAX_NUMPY_DTYPE_PROMOTION="strict",
    JAX_NUMPY_RANK_PROMOTION="raise",
    # The checkout's named_embed first, as in tests/examples_test.py.
    PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  return subprocess.run(
    [sys.executable, "-W", "error", str(SCRIPT), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_SECONDS,
    check=False,
  )


def test_docstring_says_how_to_run_it():
  docstring = SCRIPT.read_text(encoding="utf-8").split('"""')[1]
  assert "python examples/sharded_lm.py" in docstring


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_sharded_lm_trains_on_eight_devices(axis_types):
  result = run_script("--steps", "10", "--axis-types", axis_types)
  assert result.returncode == 0, (
    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  )
  out = result.stdout
  assert f"mesh {{'data': 2, 'model': 4}} ({axis_types} axes) on 8 cpu" in out
  assert "table: 1001 tokens, 1004 rows x 64 dims" in out
  sharded = "P('model', None), [251, 64] = 64,256 bytes per device"
  assert f"table rows: {sharded}" in out
  assert f"table rows after training: {sharded}" in out
  assert f"Adam first moment of the table: {sharded}" in out
  assert "parameters: embed.embeddings, mlp_in.weights, mlp_out.weights" in out
  steps = re.findall(r"^step +(\d+)  loss (\S+)$", out, re.M)
  assert [int(step) for step, _ in steps] == list(range(10))
  losses = [float(loss) for _, loss in steps]
  match = re.search(r"first loss (\S+), final loss (\S+) \(", out)
  first, final = float(match.group(1)), float(match.group(2))
  assert (first, final) == (losses[0], losses[-1])
  assert final < 0.5 * first, losses


def test_sharded_lm_rejects_bad_steps():
  result = run_script("--steps=0")
  assert result.returncode == 2
  assert "--steps must be at least 1" in result.stderr
