"""named_embed vs raw JAX, flax and penzai on CPU, side by side in one run.

  python benchmarks/run.py --quick              # subset, < 2 minutes
  python benchmarks/run.py                      # everything (long)
  python benchmarks/run.py --sections lookup,decode --rounds 21 --cold

Method: ../shared/research/perf.md ("Setup and method"); see
benchmarks/README.md. Tables go to stdout, progress to stderr, everything
(including every per-round time) to ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import _impls  # noqa: E402
import _overhead  # noqa: E402
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import penzai  # noqa: E402

import named_embed as ne  # noqa: E402

SECTIONS = (
  "lookup",
  "grad",
  "decode",
  "loss",
  "eager",
  "dispatch",
  "compile",
  "limits",
)
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
LOSS_MIN_AVAILABLE_GIB = 12.0


@dataclasses.dataclass(frozen=True)
class Config:
  """Shapes and rounds of a run (`QUICK` or `FULL`)."""

  tokens: tuple[tuple[int, int], ...]  # lookup / grad token shapes [B, T]
  tables: tuple[tuple[int, int], ...]  # lookup / grad tables [V, D]
  decode: tuple[tuple[int, int, int], ...]  # [N, V, D]
  loss: tuple[int, int, int]  # [N, V, D], float32
  matmul: int  # side of the square jnp.dot reference
  compile_shape: tuple[int, int, int, int]  # B, T, V, D
  block: int  # max calls per sample in eager / dispatch
  compile_split: bool  # also time trace+lower and XLA compile apart
  rounds: dict[str, int]


QUICK = Config(
  tokens=((8, 512),),
  tables=((32768, 512),),
  decode=((512, 32768, 512),),
  loss=(1024, 32768, 256),
  matmul=2048,
  compile_shape=(1, 16, 32768, 512),
  block=20,
  compile_split=False,
  rounds=dict(
    lookup=11, grad=4, decode=3, loss=3, eager=9, dispatch=9, compile=3,
    limits=3,
  ),
)  # fmt: skip
FULL = Config(
  tokens=((8, 512), (32, 2048)),
  tables=((32768, 512), (131072, 1024)),
  decode=((2048, 32768, 512),),
  loss=(8192, 131072, 1024),
  matmul=4096,
  compile_shape=(1, 16, 32768, 512),
  block=100,
  compile_split=True,
  rounds=dict(
    lookup=41, grad=21, decode=21, loss=5, eager=41, dispatch=41, compile=21,
    limits=21,
  ),
)  # fmt: skip


# ------------------------------------------------------------------ data


# numpy, not jax.random: no compilation per shape (seconds on a busy host).


def make_normal(shape, dtype, seed: int, scale: float = 1.0) -> jax.Array:
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  if scale != 1.0:
    x *= np.float32(scale)
  return jnp.asarray(x.astype(jnp.dtype(dtype)))


def make_table(v: int, d: int, dtype) -> jax.Array:
  return make_normal((v, d), dtype, seed=v + d, scale=1.0 / math.sqrt(d))


def make_ids(shape: tuple[int, ...], v: int, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, v, shape, dtype=np.int32))


def tol_for(dtype) -> float:
  return 2e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-5


def lookup_grid(cfg: Config):
  """``(label, B, T, V, D, dtype)`` for every lookup / grad case."""
  for b, t in cfg.tokens:
    for v, d in cfg.tables:
      for name, dtype in DTYPES.items():
        yield f"tok[{b},{t}] {v // 1024}k x {d} {name}", b, t, v, d, dtype


# -------------------------------------------------------------- sections


def section_lookup(cfg, args) -> list[dict]:
  rows = []
  for label, b, t, v, d, dtype in lookup_grid(cfg):
    w, ids = make_table(v, d, dtype), make_ids((b, t), v)
    impls = _impls.lookup_impls(w, ids)
    impls.append(_impls.memcpy_ref())
    work = b * t * d * jnp.dtype(dtype).itemsize
    case = H.Case(label, impls, work=work, unit="GB/s", tol=tol_for(dtype))
    rows += H.run_case(case, args.rounds_for("lookup"), args.cold)
  H.print_timing_table("1. lookup, jit (bytes gathered / time)", rows)
  return rows


def section_grad(cfg, args) -> list[dict]:
  rows = []
  for label, b, t, v, d, dtype in lookup_grid(cfg):
    w, ids = make_table(v, d, dtype), make_ids((b, t), v)
    cot = make_normal((b, t, d), dtype, seed=3)
    impls = _impls.grad_impls(w, ids, cot)
    impls.append(_impls.memcpy_ref())
    work = (b * t * d + v * d) * jnp.dtype(dtype).itemsize
    # bf16: the references round once, the libraries per token and per row.
    tol = 5e-2 if dtype == jnp.bfloat16 else tol_for(dtype)
    case = H.Case(label, impls, work=work, unit="GB/s", tol=tol)
    rows += H.run_case(case, args.rounds_for("grad"), args.cold)
  H.print_timing_table(
    "2. lookup gradient w.r.t. the table, jit ((B*T*D + V*D) bytes / time)",
    rows,
  )
  return rows


def section_decode(cfg, args) -> list[dict]:
  rows = []
  for n, v, d in cfg.decode:
    for name, dtype in DTYPES.items():
      w = make_table(v, d, dtype)
      h = make_normal((n, d), dtype, seed=4)
      impls = _impls.decode_impls(h, w)
      impls.append(_impls.matmul_ref(cfg.matmul, dtype))
      label = f"N={n} V={v // 1024}k D={d} {name}"
      tol = 2e-2 if name == "bf16" else 1e-4
      case = H.Case(label, impls, work=2.0 * n * v * d, unit="GFLOP/s", tol=tol)
      rows += H.run_case(case, args.rounds_for("decode"), args.cold)
  H.print_timing_table("3. decode, jit (2NVD FLOPs / time)", rows)
  return rows


def available_gib() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def section_loss(cfg, args) -> list[dict]:
  n, v, d = cfg.loss
  w = make_table(v, d, jnp.float32)
  h = make_normal((n, d), jnp.float32, seed=5)
  functions = _impls.loss_functions(h, w, make_ids((n,), v, seed=6))
  compiled = {
    k: _impls.compile_with_temp(fn, a) for k, (fn, a, _) in functions.items()
  }
  temp = {k: t for k, (_, t) in compiled.items()}
  label = f"N={n} V={v // 1024}k D={d} f32"
  free = available_gib()
  # The naive temp, plus the gradients and a margin for everything else.
  need = max(LOSS_MIN_AVAILABLE_GIB, max(temp.values()) / 2**30 + 2.0)
  need += 2 * (w.nbytes + h.nbytes) / 2**30
  if free < need:
    print(
      f"\nNOTE loss: {free:.1f} GiB available, {need:.1f} GiB needed: timing"
      " skipped; temp memory is from compilation only."
    )
    rows = [dict(case=label, impl=k, temp_bytes=b) for k, b in temp.items()]
  else:
    impls = [
      H.Impl(k, compiled[k][0], to_numpy=functions[k][2]) for k in functions
    ]
    case = H.Case(label, impls, work=6.0 * n * v * d, unit="GFLOP/s", tol=1e-3)
    rows = H.run_case(case, args.rounds_for("loss"), args.cold)
    for row in rows:
      row["temp_bytes"] = temp[row["impl"]]
  print_loss_table(rows)
  return rows


def print_loss_table(rows: list[dict]) -> None:
  naive = rows[0]["temp_bytes"]
  cells = []
  for row in rows:
    timing = H.timing_cells(row) if "median" in row else [
      row["case"], row["impl"], *["skipped"] * 4
    ]  # fmt: skip
    mib = row["temp_bytes"] / 2**20
    cells.append(
      [
        *timing,
        H.fmt_rate(row.get("rate"), row.get("unit", "")),
        f"{mib:,.0f} MiB",
        f"{row['temp_bytes'] / naive:.3f}x",
        H.fmt_diff(row) if "median" in row else "-",
      ]
    )
  headers = [*H.TIMING_HEADERS, "rate (6NVD)", "temp", "temp ratio"]
  H.print_table(
    "4. fused loss: value_and_grad w.r.t. hidden and table, jit",
    [*headers, "max|diff|"],
    cells,
  )


def section_eager(cfg, args) -> list[dict]:
  w, ids, h = _overhead.tiny_inputs()
  rows = []
  for case in (
    _overhead.eager_lookup_case(w, ids),
    _overhead.eager_pooled_case(w, ids),
    _overhead.eager_decode_case(w, h),
  ):
    rows += _overhead.run_blocks(case, args.rounds_for("eager"), cfg.block)
  H.print_timing_table(
    "5. eager (no jit) per-call time, tiny inputs", rows, limit=False
  )
  return rows


def section_dispatch(cfg, args) -> list[dict]:
  w, ids, _ = _overhead.tiny_inputs()
  case = _overhead.dispatch_case(w, ids)
  rows = _overhead.run_blocks(case, args.rounds_for("dispatch"), cfg.block)
  H.print_timing_table(
    "6. jit dispatch per call: raw arrays vs pytree arguments", rows, False
  )
  return rows


def section_compile(cfg, args) -> list[dict]:
  b, t, v, d = cfg.compile_shape
  w, ids = make_table(v, d, jnp.float32), make_ids((b, t), v)
  rounds = args.rounds_for("compile")
  rows = _overhead.run_compile(w, ids, rounds, cfg.compile_split)
  cells = [H.timing_cells(row) for row in rows]
  H.print_table(
    f"7. compile: fresh jitted lookup+decode, tokens [{b},{t}], {v} x {d} f32",
    H.TIMING_HEADERS,
    cells,
  )
  return rows


def section_limits(cfg, args) -> list[dict]:
  refs = [
    _impls.memcpy_ref(256),
    _impls.matmul_ref(cfg.matmul, jnp.float32),
    _impls.matmul_ref(cfg.matmul, jnp.bfloat16),
  ]
  for ref in refs:  # compile the matmuls before timing
    jax.block_until_ready(ref.thunk())
  rounds = args.rounds_for("limits")
  times = H.time_rounds({r.name: r.thunk for r in refs}, rounds, args.cold)
  case = H.Case("machine limits", refs)
  rows = H.summarize(case, times, {})
  cells = []
  for ref, row in zip(refs, rows):
    unit = "GB/s" if "memcpy" in ref.name else "GFLOP/s"
    row["unit"] = unit
    cells.append([*H.timing_cells(row)[1:3], H.timing_cells(row)[5]])
    cells[-1].append(H.fmt_rate(row["rate"], unit))
  H.print_table(
    "8. machine limits (interleaved; also inside sections 1-3 as [ref] rows)",
    ["measurement", "median", "p25-p75", "rate"],
    cells,
  )
  return rows


RUNNERS = {
  "lookup": section_lookup,
  "grad": section_grad,
  "decode": section_decode,
  "loss": section_loss,
  "eager": section_eager,
  "dispatch": section_dispatch,
  "compile": section_compile,
  "limits": section_limits,
}


# ------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small subset")
  parser.add_argument("--rounds", type=int, help="rounds for every section")
  parser.add_argument(
    "--sections",
    default=",".join(SECTIONS),
    help=f"comma-separated subset of {','.join(SECTIONS)}",
  )
  parser.add_argument(
    "--cold",
    action="store_true",
    help="write a 64 MiB buffer before each timed call (jit sections)",
  )
  parser.add_argument(
    "--json",
    default=os.path.join(os.path.dirname(__file__), "results.json"),
    help="where to write all results (default benchmarks/results.json)",
  )
  args = parser.parse_args(argv)
  args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = sorted(set(args.sections) - set(SECTIONS))
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
  cfg = QUICK if args.quick else FULL
  args.rounds_for = lambda section: args.rounds or cfg.rounds[section]
  return args


def metadata(args) -> dict[str, Any]:
  return dict(
    argv=sys.argv[1:],
    quick=args.quick,
    cold=args.cold,
    sections=args.sections,
    rounds={s: args.rounds_for(s) for s in args.sections},
    versions=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      flax=flax.__version__,
      penzai=penzai.__version__,
      numpy=np.__version__,
      named_embed=ne.__version__,
    ),
    machine=dict(
      cpus=os.cpu_count(),
      platform=platform.platform(),
      devices=[str(dv) for dv in jax.devices()],
      loadavg_start=os.getloadavg(),
      mem_available_gib_start=available_gib(),
    ),
    started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  )


def main(argv=None) -> None:
  args = parse_args(argv)
  cfg = QUICK if args.quick else FULL
  start = time.perf_counter()
  result = dict(meta=metadata(args), sections={})
  print(f"# named_embed benchmarks ({'quick' if args.quick else 'full'} mode,")
  print(f"# {'cold' if args.cold else 'warm'} cache, jax {jax.__version__},")
  print(f"# load average at start {os.getloadavg()[0]:.2f})")
  for section in SECTIONS:  # fixed order, whatever the flag's order
    if section not in args.sections:
      continue
    H.log(f"[{section}]")
    t0 = time.perf_counter()
    result["sections"][section] = RUNNERS[section](cfg, args)
    H.log(f"[{section}] {time.perf_counter() - t0:.1f} s")
  elapsed = time.perf_counter() - start
  result["meta"].update(elapsed_s=elapsed, loadavg_end=os.getloadavg())
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"\n# total {elapsed:.1f} s; results in {args.json}")


if __name__ == "__main__":
  main()
