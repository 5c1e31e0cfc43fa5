"""Runs the scripts in ``examples/`` as a user would, each in a subprocess.

Each script must exit with status 0 within a time limit and print what its
docstring promises. The checkout's ``named_embed`` comes first on the path,
so the scripts run against the code under test even if another copy is
installed.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_SECONDS = 300  # generous: a loaded CI machine compiles slowly


def _run(argv: list[str]) -> subprocess.CompletedProcess:
  """Runs ``examples/<argv[0]> argv[1:]`` with the checkout on the path."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
  )
  name, *args = argv
  return subprocess.run(
    [sys.executable, str(EXAMPLES / name), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_SECONDS,
    check=False,
  )


def run_example(name: str, *args: str) -> str:
  """Runs ``examples/<name>`` with ``args``; returns its stdout."""
  result = _run([name, *args])
  assert result.returncode == 0, (
    f"examples/{name} exited with {result.returncode}.\n"
    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  )
  return result.stdout


def test_examples_have_usage_docstrings():
  for name in ("quickstart.py", "train_with_fused_loss.py"):
    script = EXAMPLES / name
    text = script.read_text(encoding="utf-8")
    assert text.startswith('"""'), f"{script.name} has no module docstring"
    docstring = text.split('"""')[1]
    assert f"python examples/{script.name}" in docstring, (
      f"{script.name}'s docstring does not say how to run it"
    )


def test_quickstart():
  out = run_example("quickstart.py")
  assert "table: {'vocabulary': 32, 'embedding': 16} float32" in out
  assert "lookup: {'batch': 2, 'seq': 4, 'embedding': 16}" in out
  assert "decode: {'batch': 2, 'seq': 4, 'vocabulary': 32}" in out
  assert "parameters: ['embed.embeddings']" in out  # tied: one parameter
  before = float(re.search(r"loss before the step: (\S+)", out).group(1))
  after = float(re.search(r"loss after the step: +(\S+)", out).group(1))
  assert after < before


def test_train_with_fused_loss():
  out = run_example("train_with_fused_loss.py", "--steps", "20", "--seed", "0")
  assert "3 parameters (embed.embeddings, mlp_in.weights, mlp_out.weights)" in (
    out
  )
  steps = re.findall(r"^step +(\d+)  loss (\S+)$", out, re.M)
  assert [int(step) for step, _ in steps] == list(range(0, 20, 2)) + [19]
  match = re.search(r"first loss (\S+), final loss (\S+) \(", out)
  first, final = float(match.group(1)), float(match.group(2))
  assert first == float(steps[0][1]) and final == float(steps[-1][1])
  assert final < first
  assert re.search(r"next-token accuracy on a fresh batch: \d+\.\d%", out)


def test_train_with_fused_loss_rejects_bad_steps():
  result = _run(["train_with_fused_loss.py", "--steps=0"])
  assert result.returncode == 2
  assert "--steps must be at least 1" in result.stderr
