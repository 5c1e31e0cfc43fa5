"""Running the whole demo, and its command line ``python -m named_embed``."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

import named_embed as ne
from named_embed.demo.model import ModelConfig, embedding_table, init_model
from named_embed.demo.settings import (
  DEFAULT_BATCH_SIZE,
  DEFAULT_LEARNING_RATE,
  DEFAULT_OUTPUT,
  DEFAULT_PROMPT,
  DEFAULT_SEED,
  DEFAULT_STEPS,
  FAST_COMPILE,
  SAMPLE_TEMPERATURE,
)
from named_embed.demo.text import char_vocabulary, encode, load_text
from named_embed.demo.training import TrainingLog, generate, train

PAGE_TITLE = "named_embed demo: a tied character embedding table"


def _describe(model: pz.nn.Sequential, config: ModelConfig, n: int) -> str:
  """The header printed before training."""
  _, params = pz.unbind_params(model)
  sizes = {p.label: math.prod(p.value.named_shape.values()) for p in params}
  return (
    f"named_embed demo: a tied-embedding character model on {n:,} characters"
    f" of fables\n  vocabulary {config.vocab_size}, context {config.context},"
    f" embedding {config.embedding}, hidden {config.hidden};"
    f" {sum(sizes.values()):,} parameters"
    f" ({', '.join(f'{k} {v:,}' for k, v in sizes.items())})\n"
    "  one EmbeddingTable shared by EmbeddingLookup and EmbeddingDecode;"
    " trained with ne.decode_cross_entropy and optax.adam"
  )


def _shown(char: str) -> str:
  """A character as printed in the neighbour lists (a space as ``␣``)."""
  return "␣" if char == " " else char


def nearest_chars(
  table: ne.EmbeddingTable, chars: Sequence[str], k: int = 3
) -> dict[str, list[str]]:
  """The ``k`` characters closest to each of ``chars``, by `ne.nearest`.

  Cosine similarity of the table's rows; a character is never its own
  neighbour. The table must carry its `ne.Vocabulary` of characters. All
  the characters form one batched query (a ``"query"`` axis of ids), run
  under one `jax.jit`.

  Example:

  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)).with_vocabulary(
  ...     ne.Vocabulary(["a", "b", "c"]))
  >>> nearest_chars(table, ["a", "c"], k=2)
  {'a': ['b', 'c'], 'c': ['b', 'a']}
  """
  query = jnp.asarray(table.vocabulary.encode(chars), jnp.int32)
  ids, _ = _nearest(pz.freeze_params(table), pz.nx.wrap(query).tag("query"), k)
  rows = np.asarray(ids.unwrap("query", "neighbor"))
  return {c: table.vocabulary.decode(row) for c, row in zip(chars, rows)}


@functools.partial(
  jax.jit, static_argnames=("k",), compiler_options=FAST_COMPILE
)
def _nearest(table, query, k):
  return ne.nearest(table, query, k=k)


def _neighbour_list(near: dict[str, list[str]]) -> str:
  return " | ".join(
    f"{_shown(c)} ~ {' '.join(map(_shown, n))}" for c, n in near.items()
  )


def _report(near: dict[str, list[str]], sample: str) -> list[str]:
  """The lines printed after training: the sample and some neighbours."""
  some = {c: near[c] for c in "aetAT," if c in near}
  return [
    f"sample (temperature {SAMPLE_TEMPERATURE}):\n  {sample}",
    "nearest rows: " + _neighbour_list(some),
  ]


def _losses(log: TrainingLog) -> str:
  """First and last evaluated losses, for the page."""
  (_, train0, valid0), (step, train1, valid1) = log.evals[0], log.evals[-1]
  return (
    f"{step} steps: valid loss {valid0:.3f} -> {valid1:.3f},"
    f" train loss {train0:.3f} -> {train1:.3f}"
  )


def run(
  steps: int = DEFAULT_STEPS,
  seed: int = DEFAULT_SEED,
  output: str | os.PathLike[str] = DEFAULT_OUTPUT,
  batch_size: int = DEFAULT_BATCH_SIZE,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  prompt: str = DEFAULT_PROMPT,
  stream: TextIO | None = None,
  progress: TextIO | None = None,
) -> dict[str, Any]:
  """Runs the whole demo: train, print a sample, write the HTML page.

  The page is written by `named_embed.show`: the trained table, its rows
  labelled by character, with the header, the losses, the sample and every
  character's nearest rows as notes.

  Args:
    steps: Number of training steps.
    seed: Seed of the initialisation, the batches and the sample.
    output: Path of the HTML page.
    batch_size: Windows per training step.
    learning_rate: Initial Adam step size (cosine-decayed to 0).
    prompt: Start of the generated sample.
    stream: Where the report goes (default ``sys.stdout``).
    progress: Where the progress bar goes (default ``sys.stderr``); it is
      drawn only on a terminal or as a notebook widget (see
      `named_embed.demo.training.progress_bar`).

  Raises:
    ValueError: if the page cannot be written to ``output`` (checked
      before training; see `output_problem`).

  Returns:
    A dict with ``"losses"`` (one per step), ``"evals"`` (``(step,
    train_loss, valid_loss)`` tuples), ``"sample"``, ``"output"`` (the
    absolute path of the page, written by `named_embed.show`), ``"model"``
    (trained) and ``"vocabulary"`` (the `named_embed.Vocabulary` of
    characters attached to the model's table).

  Example (a few seconds, mostly compilation; with the default batch size,
  the compiled functions are shared with other runs in the same process):

  >>> import io, tempfile
  >>> out = io.StringIO()
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   result = run(steps=2, output=f"{tmp}/demo.html", stream=out,
  ...                progress=io.StringIO())
  ...   print(os.path.exists(result["output"]))
  True
  >>> len(result["losses"]), [step for step, _, _ in result["evals"]]
  (2, [0, 1, 2])
  >>> result["sample"][:16], len(result["vocabulary"]) > 40
  ('Once upon a time', True)
  >>> result["model"].sublayers[0].table.vocabulary == result["vocabulary"]
  True
  >>> print(out.getvalue().splitlines()[0])  # doctest: +ELLIPSIS
  named_embed demo: a tied-embedding character model on ... of fables
  """
  problem = output_problem(output)
  if problem is not None:
    raise ValueError(
      f"Cannot write the page to `output`={output!r}: {problem}."
    )
  start = time.perf_counter()
  stream = sys.stdout if stream is None else stream
  vocab, ids = _fables()
  split = len(ids) * 9 // 10
  config = ModelConfig(vocab_size=len(vocab))
  model = init_model(config, seed, vocab)
  header = _describe(model, config, len(ids))
  print(header, file=stream, flush=True)
  model, log = train(
    model,
    ids[:split],
    ids[split:],
    context=config.context,
    steps=steps,
    batch_size=batch_size,
    learning_rate=learning_rate,
    seed=seed,
    stream=stream,
    progress=progress,
  )
  sample = generate(model, vocab, prompt, context=config.context, seed=seed)
  path = _publish(model, [header, _losses(log)], sample, output, stream)
  print(f"done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
  return {
    "losses": log.losses,
    "evals": log.evals,
    "sample": sample,
    "output": path,
    "model": model,
    "vocabulary": vocab,
  }


def _fables() -> tuple[ne.Vocabulary, np.ndarray]:
  """The vocabulary of the fables and the fables as token ids."""
  text = load_text()
  vocab = char_vocabulary(text)
  return vocab, encode(vocab, text)


def _publish(
  model: pz.nn.Sequential,
  summary: Sequence[str],
  sample: str,
  output: str | os.PathLike[str],
  stream: TextIO,
) -> str:
  """Prints the sample and neighbours, and writes the page; returns its path.

  The page, written by `named_embed.show`, has ``summary``, the sample and
  the nearest rows of every character as notes above the table.
  """
  table = embedding_table(model)
  near = nearest_chars(table, table.vocabulary.tokens)
  report = _report(near, sample)
  notes = [
    *summary,
    report[0],
    "nearest rows (cosine similarity, by ne.nearest):\n"
    + _neighbour_list(near),
  ]
  path = ne.show(table, output, title=PAGE_TITLE, notes=notes)
  for line in [*report, f"wrote {path}"]:
    print(line, file=stream, flush=True)
  return path


def output_problem(path: str | os.PathLike[str]) -> str | None:
  """Why the page cannot be written to ``path``, or None if it can.

  Checked before training, so a bad ``--output`` fails at once instead of
  after the run.

  >>> output_problem("/nonexistent/x.html")
  "its directory '/nonexistent' does not exist"
  >>> output_problem("named_embed_demo.html") is None
  True
  """
  path = os.fspath(path)
  if not path:
    return "the path is empty"
  if os.path.isdir(path):
    return f"{path!r} is a directory; give a file name, e.g. {os.path.join(path, DEFAULT_OUTPUT)!r}"
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.exists(directory):
    return f"its directory {directory!r} does not exist"
  if not os.path.isdir(directory):
    return f"{directory!r} is not a directory"
  if not os.access(directory, os.W_OK | os.X_OK):
    return f"its directory {directory!r} is not writable"
  if os.path.exists(path) and not os.access(path, os.W_OK):
    return f"{path!r} exists and is not writable"
  return None


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not (value > 0 and math.isfinite(value)):
    raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser of ``python -m named_embed``.

  >>> args = build_parser().parse_args(["--steps", "50", "--seed", "3"])
  >>> args.steps, args.seed, args.batch_size, args.output
  (50, 3, 256, 'named_embed_demo.html')
  """
  parser = argparse.ArgumentParser(
    prog="python -m named_embed",
    description=(
      "Train a tiny character-level language model whose input and output"
      " embeddings are one named_embed.EmbeddingTable (tied weights), print"
      " its falling loss and a generated sample, and write an HTML page of"
      " the trained table rendered with treescope."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  add = parser.add_argument
  add(
    "--steps",
    type=_non_negative_int,
    default=DEFAULT_STEPS,
    help="number of training steps",
  )
  add(
    "--seed",
    type=int,
    default=DEFAULT_SEED,
    help="random seed of initialisation, batches and sampling",
  )
  add("--output", default=DEFAULT_OUTPUT, help="path of the HTML page to write")
  add(
    "--batch-size",
    type=_positive_int,
    default=DEFAULT_BATCH_SIZE,
    help="training windows per step",
  )
  add(
    "--learning-rate",
    type=_positive_float,
    default=DEFAULT_LEARNING_RATE,
    help="initial Adam learning rate (cosine-decayed to 0)",
  )
  add(
    "--prompt",
    default=DEFAULT_PROMPT,
    help="start of the generated sample (characters of the fables only)",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m named_embed``.

  Args:
    argv: Command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The exit status, 0.

  Example (invalid arguments exit with status 2, as argparse does; an
  ``--output`` that cannot be written is found before training):

  >>> main(["--steps", "-1"])
  Traceback (most recent call last):
  ...
  SystemExit: 2
  >>> main(["--output", "/nonexistent/x.html"])
  Traceback (most recent call last):
  ...
  SystemExit: 2
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  problem = output_problem(args.output)
  if problem is not None:
    parser.error(f"--output {args.output}: cannot write the page: {problem}")
  unknown = set(args.prompt) - set(load_text())
  if unknown:
    parser.error(f"--prompt: {sorted(unknown)} do not occur in the fables")
  run(
    steps=args.steps,
    seed=args.seed,
    output=args.output,
    batch_size=args.batch_size,
    learning_rate=args.learning_rate,
    prompt=args.prompt,
  )
  return 0
