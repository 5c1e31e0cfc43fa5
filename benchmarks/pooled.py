"""Pooled lookups: take-then-reduce (raw JAX, flax, penzai) vs named_embed.

  python benchmarks/pooled.py --quick        # 64 bags x 512 ids x 1024, V 50k
  python benchmarks/pooled.py                # more shapes and ragged bags
  python benchmarks/pooled.py --rounds 11 --json pooled.json

For each shape and mode (sum, mean, max), forwards and the gradient with
respect to the table (of ``sum(pooled * cotangent)``): the compiled
temporary memory of every implementation
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``)
and its time, measured with `_harness` (outputs checked against raw JAX
first, then every implementation interleaved in one process, the order
changing every round; ``ratio`` is the median over rounds of ``t / t_raw``
of the same round). ``raw_take_AA`` is a second copy of the baseline: its
ratio is the noise band. Tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from penzai import pz  # noqa: E402

import named_embed as ne  # noqa: E402

MODES = ("sum", "mean", "max")
QUICK = dict(fixed=((64, 512, 1024, 50_000),), ragged=(), rounds=5)
FULL = dict(
  fixed=(
    (64, 512, 1024, 50_000),  # the acceptance shape
    (64, 32, 1024, 50_000),  # short bags
    (1024, 16, 256, 50_000),  # many small bags (recommender features)
    (8, 4096, 512, 50_000),  # long bags (document vectors)
  ),
  ragged=((64, 32_768, 1024, 50_000),),  # bags, ids, D, V
  rounds=9,
)
CHUNK = 16  # the hand-written scan's members per step


# ------------------------------------------------------------------ inputs


def make_inputs(bags, members, d, v, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((v, d), np.float32) / np.float32(np.sqrt(d))
  ids = rng.integers(0, v, (bags, members), dtype=np.int32)
  cot = rng.standard_normal((bags, d), np.float32)
  return jnp.asarray(w), jnp.asarray(ids), jnp.asarray(cot)


def reduce(rows, mode, axis):
  return getattr(jnp, mode)(rows, axis=axis)


# ------------------------------------------------------ fixed-size bags


def raw_take(mode):
  def f(w, ids):
    return reduce(jnp.take(w, ids, axis=0), mode, 1)

  return f


def raw_scan(mode):
  """The hand-written alternative: a `lax.scan` over chunks of members."""

  def f(w, ids):
    b, members = ids.shape
    chunks = ids.reshape(b, members // CHUNK, CHUNK).transpose(1, 0, 2)
    op = jnp.maximum if mode == "max" else jnp.add
    start = jnp.full((b, w.shape[1]), -jnp.inf if mode == "max" else 0.0)

    def body(acc, chunk):
      return op(
        acc, reduce(w[chunk], "max" if mode == "max" else "sum", 1)
      ), None

    out = jax.lax.scan(body, start, chunks)[0]
    return out / members if mode == "mean" else out

  return f


def flax_style(mode, module):
  def f(variables, ids):
    return reduce(module.apply(variables, ids), mode, 1)

  return f


def penzai_style(mode):
  def f(table, tokens):
    rows = pz.nn.EmbeddingLookup(table)(tokens)
    pooled = pz.nx.nmap(lambda x: reduce(x, mode, 0))(rows.untag("member"))
    return pooled.untag("batch", "embedding").unwrap()

  return f


def named_embed(mode):
  def f(table, tokens):
    out = ne.pooled_lookup(table, tokens, over="member", mode=mode)
    return out.untag("batch", "embedding").unwrap()

  return f


def fixed_functions(w, ids, mode):
  """``{name: (fn, args, to_numpy of a gradient)}``, raw first."""
  module = nn.Embed(w.shape[0], w.shape[1])
  pz_table = pz.nn.EmbeddingTable(
    embeddings=pz.ParameterValue(
      value=pz.nx.wrap(w).tag("vocabulary", "embedding"), label="e"
    ),
    vocabulary_axis="vocabulary",
  )
  table = pz.freeze_params(ne.EmbeddingTable.from_pretrained(w, freeze=False))
  tokens = pz.nx.wrap(ids).tag("batch", "member")
  raw = (w, ids)
  return {
    "raw_take": (raw_take(mode), raw, np.asarray),
    "raw_take_AA": (raw_take(mode), raw, np.asarray),
    "raw_scan_16": (raw_scan(mode), raw, np.asarray),
    "flax_embed": (
      flax_style(mode, module),
      ({"params": {"embedding": w}}, ids),
      lambda g: np.asarray(g["params"]["embedding"]),
    ),
    "penzai": (
      penzai_style(mode),
      (pz_table, tokens),
      lambda g: np.asarray(
        g.embeddings.value.unwrap("vocabulary", "embedding")
      ),
    ),
    "named_embed": (
      named_embed(mode),
      (table, tokens),
      lambda g: np.asarray(g.rows_array()),
    ),
  }


# ----------------------------------------------------------- ragged bags


def ragged_inputs(bags, n, d, v, seed=1):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((v, d), np.float32) / np.float32(np.sqrt(d))
  ids = rng.integers(0, v, (n,), dtype=np.int32)
  offsets = np.sort(rng.integers(0, n, bags - 1)).astype(np.int32)
  offsets = np.concatenate([[0], offsets]).astype(np.int32)
  cot = rng.standard_normal((bags, d), np.float32)
  return jnp.asarray(w), jnp.asarray(ids), jnp.asarray(offsets), cot


def raw_segments(mode, bags):
  """Take, then ``jax.ops.segment_*`` (empty bags masked to zeros)."""

  def f(w, ids, offsets):
    marks = jnp.zeros(ids.shape[0] + 1, jnp.int32).at[offsets].add(1)
    bag = jnp.cumsum(marks[:-1]) - 1
    rows = jnp.take(w, ids, axis=0)
    count = jax.ops.segment_sum(jnp.ones_like(ids), bag, bags)[:, None]
    if mode == "max":
      out = jax.ops.segment_max(rows, bag, bags, indices_are_sorted=True)
      return jnp.where(count > 0, out, 0.0)
    out = jax.ops.segment_sum(rows, bag, bags, indices_are_sorted=True)
    if mode == "mean":
      out = out / jnp.maximum(count, 1).astype(out.dtype)
    return out

  return f


def named_embed_ragged(mode):
  def f(table, ids, offsets):
    out = ne.pooled_lookup(table, ids, offsets=offsets, mode=mode)
    return out.untag("bag", "embedding").unwrap()

  return f


def ragged_functions(w, ids, offsets, mode):
  table = pz.freeze_params(ne.EmbeddingTable.from_pretrained(w, freeze=False))
  bags = offsets.shape[0]
  raw = (w, ids, offsets)
  return {
    "raw_take_segment": (raw_segments(mode, bags), raw, np.asarray),
    "raw_take_segment_AA": (raw_segments(mode, bags), raw, np.asarray),
    "named_embed": (
      named_embed_ragged(mode),
      (table, ids, offsets),
      lambda g: np.asarray(g.rows_array()),
    ),
  }


# ---------------------------------------------------------- measurement


def gradient(fn, cot):
  """d/d(first argument) of ``sum(fn(...) * cot)``."""
  return jax.grad(lambda first, *rest: jnp.sum(fn(first, *rest) * cot))


def compiled(fn, args):
  """``(thunk, temp bytes)`` of ``jax.jit(fn)`` compiled for ``args``."""
  executable = jax.jit(fn).lower(*args).compile()
  temp = int(executable.memory_analysis().temp_size_in_bytes)
  return (lambda: executable(*args)), temp


def measure(label, functions, cot, rounds, cold):
  """Forward and gradient rows of one case, with temp memory."""
  rows = []
  for kind in ("forward", "gradient"):
    impls, temps = [], {}
    for name, (fn, args, grad_to_numpy) in functions.items():
      f = fn if kind == "forward" else gradient(fn, cot)
      thunk, temps[name] = compiled(f, args)
      to_numpy = np.asarray if kind == "forward" else grad_to_numpy
      impls.append(H.Impl(name, thunk, to_numpy=to_numpy))
    case = H.Case(f"{label} {kind}", impls, tol=1e-4)
    for row in H.run_case(case, rounds, cold):
      row.update(kind=kind, temp_bytes=temps[row["impl"]])
      rows.append(row)
    del impls
  return rows


def print_rows(title, rows):
  cells = []
  for row in rows:
    base = next(
      r["temp_bytes"]
      for r in rows
      if r["case"] == row["case"] and r["impl"].startswith("raw_take")
    )
    mib = row["temp_bytes"] / 2**20
    ratio = row["temp_bytes"] / base if base else float("nan")
    cells.append(
      [
        *H.timing_cells(row),
        f"{mib:,.1f} MiB",
        f"{ratio:.3f}x",
        H.fmt_diff(row),
      ]
    )
  headers = [*H.TIMING_HEADERS, "temp", "temp / raw", "max|diff|"]
  H.print_table(title, headers, cells)


def run(config, args) -> list[dict]:
  rounds = args.rounds or config["rounds"]
  results = []
  for bags, members, d, v in config["fixed"]:
    w, ids, cot = make_inputs(bags, members, d, v)
    label = f"{bags}x{members} D={d} V={v // 1000}k"
    rows = []
    for mode in MODES:
      H.log(f"{label} {mode}")
      functions = fixed_functions(w, ids, mode)
      rows += measure(f"{label} {mode}", functions, cot, rounds, args.cold)
    print_rows(f"fixed-size bags {label}, f32, jit", rows)
    results += rows
  for bags, n, d, v in config["ragged"]:
    w, ids, offsets, cot = ragged_inputs(bags, n, d, v)
    label = f"ragged {bags} bags / {n} ids D={d} V={v // 1000}k"
    rows = []
    for mode in MODES:
      H.log(f"{label} {mode}")
      functions = ragged_functions(w, ids, offsets, mode)
      rows += measure(f"{label} {mode}", functions, cot, rounds, args.cold)
    print_rows(f"{label}, f32, jit", rows)
    results += rows
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="one shape")
  parser.add_argument("--rounds", type=int, help="timing rounds per case")
  parser.add_argument("--cold", action="store_true", help="flush caches")
  parser.add_argument("--json", help="write every row (and time) here")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f"# pooled lookups ({'quick' if args.quick else 'full'} mode,")
  print(f"# jax {jax.__version__}, load average {os.getloadavg()[0]:.2f})")
  rows = run(QUICK if args.quick else FULL, args)
  elapsed = time.perf_counter() - start
  print(f"\n# total {elapsed:.1f} s, load average {os.getloadavg()[0]:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
  main()
