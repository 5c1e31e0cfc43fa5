"""Runs examples/bag_of_words.py as a user would, in a subprocess."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "bag_of_words.py"


def test_bag_of_words_example_trains_and_both_forms_agree():
  env = dict(
    os.environ,
    JAX_NUMPY_DTYPE_PROMOTION="strict",
    JAX_NUMPY_RANK_PROMOTION="raise",
    # The checkout's named_embed first, as in tests/examples_test.py.
    PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  result = subprocess.run(
    [sys.executable, "-W", "error", str(SCRIPT), "--steps", "60"],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  out = result.stdout
  assert "2 parameters: words.embeddings, classify.weights" in out
  losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
  assert losses[0] > 1.2 and min(losses) < 0.3, out
  accuracy = float(re.search(r"fresh documents: ([\d.]+)%", out).group(1))
  assert accuracy > 85, out
  assert "padded and ragged (offsets) bags agree: True" in out
  docstring = SCRIPT.read_text(encoding="utf-8").split('"""')[1]
  assert "python examples/bag_of_words.py" in docstring
