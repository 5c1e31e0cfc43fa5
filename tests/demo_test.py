"""Tests of the ``python -m named_embed`` demo (`named_embed.demo`)."""

from __future__ import annotations

import html
import importlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from penzai import pz

from named_embed import demo

STEPS = 40


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """One short run of the demo, shared by the tests of this module."""
  output = tmp_path_factory.mktemp("demo") / "page.html"
  stream, progress = io.StringIO(), io.StringIO()
  result = demo.run(
    steps=STEPS, output=output, stream=stream, progress=progress
  )
  return result, stream.getvalue(), progress.getvalue()


def test_loss_falls(demo_run):
  result, _, _ = demo_run
  evals = result["evals"]
  assert [step for step, _, _ in evals][0] == 0
  assert evals[-1][0] == STEPS
  (_, train_start, valid_start), (_, train_end, valid_end) = evals[0], evals[-1]
  vocab_size = len(result["vocabulary"])
  assert valid_start == pytest.approx(np.log(vocab_size), abs=0.3)
  assert train_end < train_start - 1.0
  assert valid_end < valid_start - 1.0
  losses = result["losses"]
  assert len(losses) == STEPS
  assert np.mean(losses[-5:]) < losses[0] - 1.0


def test_report_and_progress_bar(demo_run):
  result, stdout, progress = demo_run
  assert f"step    0/{STEPS}" in stdout
  assert f"step   {STEPS}/{STEPS}" in stdout
  assert "sample (temperature" in stdout
  assert f"wrote {result['output']}" in stdout
  assert f"] {STEPS}/{STEPS} loss" in progress
  assert "\r" in progress
  assert "step " not in progress  # loss lines go to the report stream


def test_sample(demo_run):
  result, _, _ = demo_run
  sample = result["sample"]
  assert sample.startswith(demo.DEFAULT_PROMPT)
  assert len(sample) == len(demo.DEFAULT_PROMPT) + demo.SAMPLE_LENGTH
  assert set(sample) <= set(result["vocabulary"].chars)


def test_html_page(demo_run):
  result, _, _ = demo_run
  path = result["output"]
  assert os.path.isabs(path) and os.path.exists(path)
  with open(path, encoding="utf-8") as f:
    page = f.read()
  assert page.startswith("<!DOCTYPE html>")
  assert "treescope-container" in page
  assert "EmbeddingTable" in page
  # The rows of the rendered array are labelled with their characters.
  letters = [c for c in result["vocabulary"].labels() if c.isalpha()]
  assert len(letters) > 40
  for label in letters:
    assert html.escape(json.dumps(label)) in page


def test_model_has_one_tied_embedding_parameter(demo_run):
  model = demo_run[0]["model"]
  _, params = pz.unbind_params(model)
  labels = [p.label for p in params]
  assert len(labels) == len(set(labels)) == 4
  assert [label for label in labels if label.endswith(".embeddings")] == [
    "embed.embeddings"
  ]
  lookup, decode = model.sublayers[0], model.sublayers[-1]
  assert lookup.table.embeddings is decode.table.embeddings
  assert isinstance(lookup.table.embeddings, pz.Parameter)


def test_main_in_process(demo_run, tmp_path, capsys):
  output = tmp_path / "main.html"
  assert demo.main(["--steps", "2", "--output", str(output)]) == 0
  stdout = capsys.readouterr().out
  assert f"wrote {output}" in stdout
  assert output.exists()


def test_importing_main_module_runs_nothing(capsys):
  importlib.import_module("named_embed.__main__")
  assert capsys.readouterr() == ("", "")


def test_help_subprocess():
  proc = subprocess.run(
    [sys.executable, "-m", "named_embed", "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  for flag in ("--steps", "--seed", "--output", "--batch-size"):
    assert flag in proc.stdout
  assert proc.stdout.startswith("usage: python -m named_embed")
