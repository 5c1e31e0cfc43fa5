"""Tests of the ``python -m named_embed`` demo (`named_embed.demo`)."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from penzai import pz

import named_embed as ne
from named_embed import demo

STEPS = 40
SUBPROCESS_STEPS = 6


class Terminal(io.StringIO):
  """A text stream that says it is a terminal."""

  def isatty(self) -> bool:
    return True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """One short run of the demo, shared by the tests of this module."""
  output = tmp_path_factory.mktemp("demo") / "page.html"
  stream, progress = io.StringIO(), io.StringIO()
  result = demo.run(
    steps=STEPS, output=output, stream=stream, progress=progress
  )
  return result, stream.getvalue(), progress.getvalue()


def tiny_model():
  config = demo.ModelConfig(vocab_size=5, context=2, embedding=4, hidden=6)
  return demo.init_model(config)


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
  assert all(isinstance(loss, float) for loss in losses)
  assert np.mean(losses[-5:]) < losses[0] - 1.0


def test_report_to_a_non_terminal_has_no_bar(demo_run):
  result, stdout, progress = demo_run
  assert f"step    0/{STEPS}" in stdout
  assert f"step   {STEPS}/{STEPS}" in stdout
  assert "sample (temperature" in stdout
  assert "nearest rows: a ~ " in stdout
  assert f"wrote {result['output']}" in stdout
  assert "\r" not in stdout
  assert progress == ""  # not a terminal: no progress bar at all


def test_progress_bar_only_on_a_terminal():
  ids = np.arange(40, dtype=np.int32) % 5
  terminal, stream = Terminal(), io.StringIO()
  demo.train(
    tiny_model(),
    ids,
    ids,
    context=2,
    steps=3,
    batch_size=4,
    stream=stream,
    progress=terminal,
  )
  assert "\r" in terminal.getvalue()  # tqdm redraws its bar in place
  assert "train:" in terminal.getvalue() and "/3 [" in terminal.getvalue()
  assert "\r" not in stream.getvalue()
  assert "step    3/3" in stream.getvalue()
  assert "step " not in terminal.getvalue()  # loss lines go to the stream


def test_subprocess_piped_to_a_file_has_no_carriage_return(tmp_path):
  page = tmp_path / "page.html"
  out, err = tmp_path / "out.txt", tmp_path / "err.txt"
  with open(out, "w") as stdout, open(err, "w") as stderr:
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "named_embed",
        "--steps",
        str(SUBPROCESS_STEPS),
        "--output",
        str(page),
      ],
      stdout=stdout,
      stderr=stderr,
      timeout=300,
      check=False,
    )
  text, errors = out.read_text(), err.read_text()
  assert proc.returncode == 0, errors
  assert "\r" not in text and "\r" not in errors
  assert text.startswith("named_embed demo: a tied-embedding character model")
  lines = text.splitlines()
  assert f"step    0/{SUBPROCESS_STEPS}  train loss" in text
  assert f"step    {SUBPROCESS_STEPS}/{SUBPROCESS_STEPS}  train loss" in text
  assert f"wrote {page}" in lines
  assert lines[-1].startswith("done in ")
  assert page.exists()


def test_sample(demo_run):
  result, _, _ = demo_run
  sample = result["sample"]
  assert sample.startswith(demo.DEFAULT_PROMPT)
  assert len(sample) == len(demo.DEFAULT_PROMPT) + demo.SAMPLE_LENGTH
  assert set(sample) <= set(result["vocabulary"].tokens)


def test_html_page_is_written_by_show(demo_run):
  result, stdout, _ = demo_run
  path = result["output"]
  assert os.path.isabs(path) and os.path.exists(path)
  with open(path, encoding="utf-8") as f:
    page = f.read()
  assert page.startswith("<!DOCTYPE html>")
  assert "treescope-container" in page
  assert "arrayviz" in page  # treescope's array view, drawn in the browser
  assert "TreescopeFigure(" not in page  # not the repr of a figure
  assert "EmbeddingTable" in page
  # The rows of the rendered array are labelled with their characters.
  letters = [c for c in result["vocabulary"].tokens if c.isalpha()]
  assert len(letters) > 40
  lower = [c for c in letters if c.islower()]  # consecutive rows
  assert ", ".join(json.dumps(c) for c in lower) in page
  # The notes: the losses, the sample and every character's neighbours.
  assert f"{STEPS} steps: valid loss" in page
  assert "sample (temperature" in page
  assert "nearest rows (cosine similarity, by ne.nearest):" in page
  assert "a ~ " in page and "␣ ~ " in page


def test_uses_the_library(demo_run, monkeypatch):
  result, _, _ = demo_run
  vocab = result["vocabulary"]
  assert isinstance(vocab, ne.Vocabulary)
  assert vocab.tokens == tuple(sorted(set(demo.load_text())))
  table = demo.embedding_table(result["model"])
  assert table.vocabulary == vocab
  assert isinstance(result["model"].sublayers[-1], ne.EmbeddingDecode)
  for gone in ("adam", "page", "progress"):
    assert importlib.util.find_spec(f"named_embed.demo.{gone}") is None
  # The loss is the fused one.
  calls = []
  fused = ne.decode_cross_entropy

  def counting(*args, **kwargs):
    calls.append(type(args[0]).__name__)
    return fused(*args, **kwargs)

  monkeypatch.setattr(ne, "decode_cross_entropy", counting)
  tokens = pz.nx.wrap(np.array([[1, 2]], np.int32)).tag("batch", "context")
  targets = pz.nx.wrap(np.array([3], np.int32)).tag("batch")
  loss = demo.model_loss(tiny_model(), tokens, targets)
  assert calls == ["EmbeddingDecode"]
  assert 1.0 < float(loss) < 2.5  # about log(5)


def test_nearest_chars_match_ne_nearest(demo_run):
  table = demo.embedding_table(demo_run[0]["model"])
  near = demo.nearest_chars(table, ["a", "T"], k=3)
  for char in ("a", "T"):
    ids, _ = ne.nearest(table, char, k=3)
    assert near[char] == table.vocabulary.decode(ids.unwrap("neighbor"))


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
  captured = capsys.readouterr()
  assert f"wrote {output}" in captured.out
  assert "\r" not in captured.out + captured.err  # captured: not a terminal
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


def _untrained(monkeypatch):
  """Makes training fail loudly: the output check must come first."""

  def train(*args, **kwargs):
    raise AssertionError("trained before checking --output")

  monkeypatch.setattr(demo.cli, "train", train)


@pytest.mark.parametrize(
  "where, problem",
  [
    ("missing/x.html", "its directory '{tmp}/missing' does not exist"),
    (".", "'{tmp}' is a directory"),
    ("file/x.html", "'{tmp}/file' is not a directory"),
  ],
  ids=["no-directory", "a-directory", "parent-is-a-file"],
)
def test_bad_output_path_exits_before_training(
  where, problem, tmp_path, monkeypatch, capsys
):
  (tmp_path / "file").write_text("")
  _untrained(monkeypatch)
  output = str(tmp_path) if where == "." else str(tmp_path / where)
  with pytest.raises(SystemExit) as info:
    demo.main(["--steps", "2", "--output", output])
  assert info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""  # not even the header: nothing ran
  expected = problem.format(tmp=tmp_path)
  assert f"error: --output {output}: cannot write the page:" in captured.err
  assert expected in captured.err
  with pytest.raises(ValueError, match="Cannot write the page to `output`"):
    demo.run(steps=2, output=output)


def test_unwritable_output_exits_before_training(tmp_path, monkeypatch, capsys):
  # Permission bits do not stop root: simulate what os.access would say.
  _untrained(monkeypatch)
  page = tmp_path / "page.html"
  page.write_text("")
  monkeypatch.setattr(
    demo.cli.os, "access", lambda path, mode: os.fspath(path) != str(page)
  )
  with pytest.raises(SystemExit):
    demo.main(["--output", str(page)])
  assert f"{str(page)!r} exists and is not writable" in capsys.readouterr().err
  monkeypatch.setattr(
    demo.cli.os, "access", lambda path, mode: os.fspath(path) != str(tmp_path)
  )
  with pytest.raises(SystemExit):
    demo.main(["--output", str(page)])
  assert f"{str(tmp_path)!r} is not writable" in capsys.readouterr().err


def test_bad_output_subprocess_fails_fast_with_a_usage_error():
  proc = subprocess.run(
    [sys.executable, "-m", "named_embed", "--output", "/nonexistent/x.html"],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert proc.stderr.startswith("usage: python -m named_embed")
  assert "its directory '/nonexistent' does not exist" in proc.stderr
  assert "Traceback" not in proc.stderr
