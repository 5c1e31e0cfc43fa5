"""Runs examples/word_vectors.py as a user would, in a subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "word_vectors.py"


def test_word_vectors_example(tmp_path):
  page = tmp_path / "words.html"
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
    [sys.executable, "-W", "error", str(SCRIPT), "--output", str(page)],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "vocabulary:56 × embedding:16 float32" in out
  for line in (
    "king - man + woman = queen ",
    "paris - france + germany = berlin ",
    "dogs - dog + cat = cats ",
    "swam - swim + walk = walked ",
    "  dog: dogs ",
  ):
    assert line in out, out
  assert f"Wrote {page}" in out
  html = page.read_text(encoding="utf-8")
  assert "<title>Word vectors</title>" in html
  assert '"queen"' in html and '"berlin"' in html
