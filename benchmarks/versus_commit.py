"""The plain float table's hot paths: this working tree vs an older commit.

  python benchmarks/versus_commit.py --commit b0ae832
  python benchmarks/versus_commit.py --commit b0ae832 --rounds 11
  python benchmarks/versus_commit.py --commit b0ae832 --quick   # 7 rounds

The commit's ``named_embed/`` is extracted (``git archive <commit>
named_embed | tar -x``) into a temporary directory as ``named_embed_before``,
its absolute imports of ``named_embed`` rewritten to ``named_embed_before``,
and imported next to ``named_embed`` of the working tree (the repository
root goes first on ``sys.path``), so both run in one process and one run.

Cases (CPU shapes small enough for a 2-core machine), each timed for a
hand-written raw JAX reference, ``before`` (the commit) and ``now`` (the
working tree), on a plain ``EmbeddingTable``:

- jitted ``ne.lookup`` of ``[32, 128]`` ids in a ``[32768, 256]`` table, vs
  ``jnp.take``;
- jitted gradient of ``sum(lookup ** 2)`` w.r.t. a trainable table
  (``pz.unbind_params`` / ``pz.bind_variables``), vs the gradient of
  ``jnp.take``;
- jitted ``ne.decode`` of hidden ``{batch: 4, seq: 128, embedding: 256}``,
  vs ``jnp.einsum``;
- jitted ``ne.decode_cross_entropy`` over 2048 tokens, V=32768, D=256 (the
  value, and the value with gradients w.r.t. hidden and the table), vs the
  textbook ``log_softmax`` loss;
- eager ``ne.lookup`` and ``ne.EmbeddingLookup(table)`` of 4 tokens
  (``{batch: 1, seq: 4}``, V=1000, D=64), vs eager ``jnp.take``;
- eager ``ne.pooled_lookup(table, bags, over="member")`` of 1 bag of 4, vs
  eager take-then-mean (if the commit has ``pooled_lookup``).

Method: every implementation is run once first and its output checked
(``before`` against ``now`` tightly, ``now`` against raw JAX to float
tolerance); then all are warmed up and timed in R rounds (default 21), each
round calling every implementation once in a freshly shuffled order, with
``jax.block_until_ready``. A sample is a block of calls divided by its
length: 2000 calls for eager cases, enough calls for ~20 ms for jitted ones.
Cells are ``median (min)`` per call; ``now/before`` and ``now/raw`` are
ratios of the medians. The markdown table goes to stdout with a machine
line (load averages, jax version, commits) for ``docs/performance.md``;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

REPO = Path(__file__).resolve().parents[1]
BEFORE = "named_embed_before"
IMPLS = ("raw", "before", "now")

V, D = 32768, 256  # jitted cases
B, T = 32, 128  # jitted lookups
DECODE_B, DECODE_T = 4, 128  # decode: 512 tokens -> 64 MiB of logits
LOSS_B, LOSS_T = 16, 128  # fused loss: 2048 tokens
EAGER_V, EAGER_D, EAGER_TOKENS = 1000, 64, 4

_START = time.perf_counter()


def log(message: str) -> None:
  elapsed = time.perf_counter() - _START
  print(f"{elapsed:7.1f}s {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------ the two packages

_IMPORT = re.compile(r"^(\s*(?:from|import)\s+)named_embed(?=[\s.]|$)", re.M)


def git(*args: str, repo: Path = REPO) -> str:
  return subprocess.run(
    ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
  ).stdout.strip()


def extract_before(commit: str, into: Path, repo: Path = REPO) -> Path:
  """Writes ``<into>/named_embed_before``: the commit's package, with every
  absolute import of ``named_embed`` renamed. Returns its folder."""
  archive = subprocess.Popen(
    ["git", "-C", str(repo), "archive", commit, "named_embed"],
    stdout=subprocess.PIPE,
  )
  subprocess.run(
    ["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True
  )
  archive.stdout.close()
  if archive.wait():
    raise RuntimeError(f"git archive {commit} named_embed failed")
  package = into / BEFORE
  (into / "named_embed").rename(package)
  for path in package.rglob("*.py"):
    text = path.read_text()
    new = _IMPORT.sub(rf"\g<1>{BEFORE}", text)
    if new != text:
      path.write_text(new)
  left = [
    str(p) for p in package.rglob("*.py") if _IMPORT.search(p.read_text())
  ]
  if left:
    raise RuntimeError(f"imports of named_embed left in {left}")
  return package


def import_both(commit: str, tmp: Path) -> tuple[Any, Any]:
  """``(now, before)``: the working tree's package and the commit's."""
  sys.path.insert(0, str(REPO))
  now = importlib.import_module("named_embed")
  package = extract_before(commit, tmp)
  sys.path.insert(0, str(tmp))
  before = importlib.import_module(BEFORE)
  if Path(now.__file__).resolve().parent != REPO / "named_embed":
    raise RuntimeError(f"named_embed imported from {now.__file__}")
  for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    if name.startswith(BEFORE) and file:
      assert Path(file).resolve().is_relative_to(package.resolve()), name
    if name.split(".")[0] == "named_embed" and file:
      assert Path(file).resolve().is_relative_to(REPO / "named_embed"), name
  return now, before


# ----------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
  """One row: ``thunks[impl]()`` runs one call (unblocked);
  ``to_numpy[impl]`` maps its output to arrays in the raw layout."""

  name: str
  thunks: dict[str, Callable[[], Any]]
  to_numpy: dict[str, Callable[[Any], Any]]
  eager: bool = False
  tol: float = 1e-6  # now vs raw, relative to the largest |raw|


def _arrays(value: Any) -> tuple[np.ndarray, ...]:
  value = value if isinstance(value, tuple) else (value,)
  return tuple(np.asarray(v, np.float32) for v in value)


def _ident(x):
  return x


def _unwrapper(*axes: str) -> Callable[[Any], Any]:
  return lambda out: out.unwrap(*axes)


def _per_version(now, before, build: Callable[[Any], Any]) -> dict[str, Any]:
  return {"before": build(before), "now": build(now)}


def jit_lookup(now, before, w, ids) -> Case:
  tokens = pz.nx.wrap(ids).tag("batch", "seq")
  raw = jax.jit(lambda w, ids: jnp.take(w, ids, axis=0))

  def build(ne):
    table = ne.EmbeddingTable.from_pretrained(w)
    fn = jax.jit(lambda table, tokens: ne.lookup(table, tokens))
    return lambda: fn(table, tokens)

  unwrap = _unwrapper("batch", "seq", "embedding")
  return Case(
    f"jit lookup [{B}x{T}] V={V} D={D}",
    {"raw": lambda: raw(w, ids), **_per_version(now, before, build)},
    {"raw": _ident, "before": unwrap, "now": unwrap},
  )


def jit_lookup_grad(now, before, w, ids) -> Case:
  tokens = pz.nx.wrap(ids).tag("batch", "seq")
  raw = jax.jit(jax.grad(lambda w, ids: jnp.sum(jnp.take(w, ids, axis=0) ** 2)))

  def build(ne):
    table = ne.EmbeddingTable.from_pretrained(w, freeze=False, name="e")
    table_def, values = pz.unbind_params(table, freeze=True)

    def loss(values, tokens):
      out = ne.lookup(pz.bind_variables(table_def, values), tokens)
      return jnp.sum(jnp.square(out.data_array))

    fn = jax.jit(jax.grad(loss))
    return lambda: fn(values, tokens)

  rows = lambda g: g[0].value.unwrap("vocabulary", "embedding")  # noqa: E731
  return Case(
    f"jit grad of sum(lookup**2) [{B}x{T}] V={V} D={D}",
    {"raw": lambda: raw(w, ids), **_per_version(now, before, build)},
    {"raw": _ident, "before": rows, "now": rows},
  )


def jit_decode(now, before, w, h) -> Case:
  hidden = pz.nx.wrap(h).tag("batch", "seq", "embedding")
  raw = jax.jit(lambda h, w: jnp.einsum("btd,vd->btv", h, w))

  def build(ne):
    table = ne.EmbeddingTable.from_pretrained(w)
    fn = jax.jit(lambda table, hidden: ne.decode(table, hidden))
    return lambda: fn(table, hidden)

  unwrap = _unwrapper("batch", "seq", "vocabulary")
  return Case(
    f"jit decode [{DECODE_B}x{DECODE_T}] V={V} D={D}",
    {"raw": lambda: raw(h, w), **_per_version(now, before, build)},
    {"raw": _ident, "before": unwrap, "now": unwrap},
    tol=1e-5,
  )


def _textbook_loss(h, w, targets):
  logits = jnp.einsum("nd,vd->nv", h.reshape(-1, h.shape[-1]), w)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_p, targets.reshape(-1, 1), axis=1)
  return -jnp.mean(picked)


def jit_loss(now, before, w, h, targets, with_grad: bool) -> Case:
  hidden = pz.nx.wrap(h).tag("batch", "seq", "embedding")
  named_targets = pz.nx.wrap(targets).tag("batch", "seq")
  n = LOSS_B * LOSS_T
  if with_grad:
    raw = jax.jit(jax.value_and_grad(_textbook_loss, argnums=(0, 1)))
  else:
    raw = jax.jit(_textbook_loss)

  def build(ne):
    table = ne.EmbeddingTable.from_pretrained(w, freeze=False, name="e")
    table_def, values = pz.unbind_params(table, freeze=True)

    def loss(values, hidden, targets):
      bound = pz.bind_variables(table_def, values)
      return ne.decode_cross_entropy(bound, hidden, targets)

    if with_grad:
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    else:
      fn = jax.jit(loss)
    return lambda: fn(values, hidden, named_targets)

  def ne_grads(out):
    value, (table_grad, hidden_grad) = out
    return (
      value,
      hidden_grad.unwrap("batch", "seq", "embedding"),
      table_grad[0].value.unwrap("vocabulary", "embedding"),
    )

  raw_grads = lambda out: (out[0], *out[1])  # noqa: E731
  what = "value_and_grad(h, table)" if with_grad else "value"
  return Case(
    f"jit decode_cross_entropy {what} N={n} V={V} D={D}",
    {"raw": lambda: raw(h, w, targets), **_per_version(now, before, build)},
    {
      "raw": raw_grads if with_grad else _ident,
      "before": ne_grads if with_grad else _ident,
      "now": ne_grads if with_grad else _ident,
    },
    tol=1e-4,
  )


def eager_lookup(now, before, w, ids, layer: bool) -> Case:
  tokens = pz.nx.wrap(ids).tag("batch", "seq")

  def build(ne):
    table = ne.EmbeddingTable.from_pretrained(w)
    if layer:
      module = ne.EmbeddingLookup(table)
      return lambda: module(tokens)
    return lambda: ne.lookup(table, tokens)

  unwrap = _unwrapper("batch", "seq", "embedding")
  what = "ne.EmbeddingLookup(table)(tokens)" if layer else "ne.lookup"
  return Case(
    f"eager {what}, {EAGER_TOKENS} tokens V={EAGER_V} D={EAGER_D}",
    {
      "raw": lambda: jnp.take(w, ids, axis=0),
      **_per_version(now, before, build),
    },
    {"raw": _ident, "before": unwrap, "now": unwrap},
    eager=True,
  )


def eager_pooled(now, before, w, ids) -> Case:
  bags = pz.nx.wrap(ids).tag("batch", "member")

  def build(ne):
    table = ne.EmbeddingTable.from_pretrained(w)
    return lambda: ne.pooled_lookup(table, bags, over="member")

  unwrap = _unwrapper("batch", "embedding")
  return Case(
    f"eager ne.pooled_lookup (mean), 1 bag of {EAGER_TOKENS}"
    f" V={EAGER_V} D={EAGER_D}",
    {
      "raw": lambda: jnp.take(w, ids, axis=0).mean(axis=1),
      **_per_version(now, before, build),
    },
    {"raw": _ident, "before": unwrap, "now": unwrap},
    eager=True,
  )


def build_cases(now, before, eager_only: bool = False) -> list[Case]:
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((V, D), np.float32) * 0.05)
  ids = jnp.asarray(rng.integers(0, V, (B, T), np.int32))
  h_decode = jnp.asarray(
    rng.standard_normal((DECODE_B, DECODE_T, D), np.float32)
  )
  h_loss = jnp.asarray(rng.standard_normal((LOSS_B, LOSS_T, D), np.float32))
  targets = jnp.asarray(rng.integers(0, V, (LOSS_B, LOSS_T), np.int32))
  small_w = jnp.asarray(rng.standard_normal((EAGER_V, EAGER_D), np.float32))
  small_ids = jnp.asarray(rng.integers(0, EAGER_V, (1, EAGER_TOKENS), np.int32))
  cases = (
    []
    if eager_only
    else [
      jit_lookup(now, before, w, ids),
      jit_lookup_grad(now, before, w, ids),
      jit_decode(now, before, w, h_decode),
      jit_loss(now, before, w, h_loss, targets, with_grad=False),
      jit_loss(now, before, w, h_loss, targets, with_grad=True),
    ]
  )
  cases += [
    eager_lookup(now, before, small_w, small_ids, layer=False),
    eager_lookup(now, before, small_w, small_ids, layer=True),
  ]
  if hasattr(before, "pooled_lookup"):
    cases.append(eager_pooled(now, before, small_w, small_ids))
  else:
    log("the commit has no pooled_lookup: that case is skipped")
  return cases


# ---------------------------------------------------------------- timing


def check(case: Case) -> None:
  """Runs every implementation once; ``before`` must equal ``now``, and
  ``now`` raw JAX to ``case.tol`` (of the largest raw magnitude)."""
  out = {}
  for name in IMPLS:
    value = jax.block_until_ready(case.thunks[name]())
    out[name] = _arrays(case.to_numpy[name](value))
  for got, want in zip(out["before"], out["now"]):
    scale = float(np.max(np.abs(want))) or 1.0
    np.testing.assert_allclose(
      got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=f"{case.name}: before"
    )
  for got, want in zip(out["now"], out["raw"]):
    scale = float(np.max(np.abs(want))) or 1.0
    np.testing.assert_allclose(
      got, want, rtol=case.tol, atol=case.tol * scale, err_msg=case.name
    )


def _time_block(thunk: Callable[[], Any], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(thunk())
  return (time.perf_counter() - start) / calls


def time_case(
  case: Case, rounds: int, eager_calls: int, target: float, seed: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
  """Seconds per call, one sample per round per implementation, the order
  shuffled every round; and the calls per sample."""
  blocks = {}
  for name in IMPLS:  # warm-up (compiled by `check`), then the block size
    thunk = case.thunks[name]
    _time_block(thunk, 3)
    once = min(_time_block(thunk, 1) for _ in range(3))
    blocks[name] = (
      eager_calls if case.eager else max(1, math.ceil(target / once))
    )
  order = list(IMPLS)
  shuffle = random.Random(seed).shuffle
  times = {name: [] for name in IMPLS}
  for _ in range(rounds):
    shuffle(order)
    for name in order:
      times[name].append(_time_block(case.thunks[name], blocks[name]))
  return times, blocks


# ---------------------------------------------------------------- report


def _duration(seconds: float, unit: str) -> str:
  value = seconds * {"us": 1e6, "ms": 1e3}[unit]
  return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _cell(samples: list[float]) -> str:
  median, low = statistics.median(samples), min(samples)
  unit = "us" if median < 1e-3 else "ms"
  return f"{_duration(median, unit)} {unit} ({_duration(low, unit)})"


def table(rows: list[tuple[Case, dict[str, list[float]]]]) -> str:
  lines = [
    "| case | raw | before | now | now/before | now/raw |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for case, times in rows:
    median = {name: statistics.median(times[name]) for name in IMPLS}
    lines.append(
      f"| {case.name} | {_cell(times['raw'])} | {_cell(times['before'])}"
      f" | {_cell(times['now'])} | {median['now'] / median['before']:.2f}x"
      f" | {median['now'] / median['raw']:.2f}x |"
    )
  return "\n".join(lines)


def commits(commit: str) -> str:
  """``now = <HEAD>[ + working tree], before = <commit>``, read before the
  imports (a commit made during the run would not be what was timed)."""
  head = git("rev-parse", "--short", "HEAD")
  dirty = git("status", "--porcelain", "--", "named_embed")
  before = git("rev-parse", "--short", f"{commit}^{{commit}}")
  return f"now = {head}{' + working tree' if dirty else ''}, before = {before}"


def machine_line(versions: str, load: tuple[float, ...], rounds: int) -> str:
  end = os.getloadavg()
  return (
    f"Machine: {os.cpu_count()} CPUs ({jax.devices()[0].platform}), load"
    f" averages {', '.join(f'{x:.2f}' for x in load)} at start,"
    f" {', '.join(f'{x:.2f}' for x in end)} at end; jax {jax.__version__};"
    f" {versions};"
    f" {rounds} interleaved rounds, cells are median (min) per call."
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--commit", required=True, help="the older commit")
  parser.add_argument("--rounds", type=int, help="default 21, --quick 7")
  parser.add_argument("--quick", action="store_true", help="7 rounds")
  parser.add_argument(
    "--eager-calls", type=int, default=2000, help="calls per eager sample"
  )
  parser.add_argument("--seed", type=int, default=0, help="round orders")
  parser.add_argument(
    "--eager-only", action="store_true", help="only the eager cases"
  )
  args = parser.parse_args()
  rounds = args.rounds or (7 if args.quick else 21)
  target = 0.02  # seconds per sample of a jitted case
  load = os.getloadavg()
  versions = commits(args.commit)
  with tempfile.TemporaryDirectory(prefix="versus_commit_") as tmp:
    now, before = import_both(args.commit, Path(tmp))
    log(f"imported named_embed ({REPO}) and {args.commit} as {BEFORE}")
    rows = []
    for index, case in enumerate(build_cases(now, before, args.eager_only)):
      log(f"{case.name}: checking")
      check(case)
      times, blocks = time_case(
        case, rounds, args.eager_calls, target, args.seed + index
      )
      log(f"  {rounds} rounds of {blocks} calls done")
      rows.append((case, times))
  print(table(rows))
  print()
  print(machine_line(versions, load, rounds))


if __name__ == "__main__":
  main()
