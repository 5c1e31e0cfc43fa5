"""Timing harness: output checks, interleaved rounds, statistics, tables.

Method (../shared/research/perf.md, "Setup and method"): every
implementation of a case is built once and its output checked against the
baseline (the first implementation, raw JAX); then all implementations, and
any machine-limit reference, run interleaved round-robin in one process,
the order changing every round (`round_orders`), each call followed by
`jax.block_until_ready`. Times are medians; the ratio of an implementation
is the median over rounds of ``t_impl / t_baseline`` of the same round, so
background load on the shared host cancels.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

FLUSH_BYTES = 64 * 2**20
_flush = {"buffer": None, "count": 0}


def flush_cache() -> None:
  """Writes a 64 MiB buffer (2x L3) so the next call starts cache-cold."""
  if _flush["buffer"] is None:
    _flush["buffer"] = np.empty(FLUSH_BYTES, np.uint8)
  _flush["count"] = (_flush["count"] + 1) % 251
  _flush["buffer"].fill(_flush["count"])


_START = time.perf_counter()


def log(message: str) -> None:
  """Progress goes to stderr (with seconds since start); stdout holds only
  the tables."""
  elapsed = time.perf_counter() - _START
  print(f"{elapsed:7.1f}s {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Impl:
  """One implementation of a case.

  Attributes:
    name: Row label.
    thunk: Runs one call and returns its (unblocked) output.
    to_numpy: Output -> array or tuple of arrays in the baseline's layout.
    expected: Maps the baseline's output (as ``to_numpy`` gives it) to this
      implementation's reference output when the two differ (e.g.
      ``max_norm`` rows); None compares with the baseline's output.
    reference: A machine-limit reference: timed in the same rounds, never
      checked, no ratio.
    work: Bytes or FLOPs per call of a reference (for its rate).
  """

  name: str
  thunk: Callable[[], Any]
  to_numpy: Callable[[Any], Any] = np.asarray
  expected: Callable[[], Any] | None = None
  reference: bool = False
  work: float | None = None


@dataclasses.dataclass
class Case:
  """Implementations of one measurement; ``impls[0]`` is the baseline.

  Attributes:
    name: Case label (shape, dtype).
    impls: Implementations, baseline first, references anywhere.
    work: Bytes or FLOPs per call of every non-reference implementation.
    unit: ``"GB/s"`` or ``"GFLOP/s"`` for the rate column.
    tol: Relative tolerance (to the largest reference magnitude) of the
      check; larger differences are flagged ``MISMATCH``.
  """

  name: str
  impls: list[Impl]
  work: float | None = None
  unit: str = ""
  tol: float = 1e-5


def _as_arrays(value: Any) -> tuple[np.ndarray, ...]:
  if not isinstance(value, tuple):
    value = (value,)
  arrays = (np.asarray(v) for v in value)
  return tuple(
    a.astype(np.float64 if a.dtype == np.float64 else np.float32)
    for a in arrays
  )


def _compare(got: Any, want: Any, label: str) -> tuple[float, float]:
  """Max absolute difference, and that relative to the largest |want|."""
  got, want = _as_arrays(got), _as_arrays(want)
  if [g.shape for g in got] != [w.shape for w in want]:
    raise AssertionError(
      f"{label}: output shapes {[g.shape for g in got]} differ from the"
      f" reference's {[w.shape for w in want]}."
    )
  worst_abs, worst_rel = 0.0, 0.0
  for g, w in zip(got, want):
    diff = float(np.max(np.abs(g - w))) if g.size else 0.0
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    worst_abs = max(worst_abs, diff)
    worst_rel = max(worst_rel, diff / scale if scale else diff)
  return worst_abs, worst_rel


def check_case(case: Case) -> dict[str, tuple[float, float]]:
  """Runs every implementation once (compiling it) and compares outputs."""
  base = case.impls[0]
  want = base.to_numpy(jax.block_until_ready(base.thunk()))
  diffs = {base.name: (0.0, 0.0)}
  for impl in case.impls[1:]:
    out = jax.block_until_ready(impl.thunk())
    if impl.reference:
      continue
    ref = want if impl.expected is None else impl.expected(want)
    diffs[impl.name] = _compare(
      impl.to_numpy(out), ref, f"{case.name} / {impl.name}"
    )
    del out
  return diffs


def _time_block(thunk: Callable[[], Any], cold: bool, block: int) -> float:
  if cold:
    flush_cache()
  start = time.perf_counter()
  for _ in range(block):
    jax.block_until_ready(thunk())
  return (time.perf_counter() - start) / block


def time_rounds(
  thunks: dict[str, Callable[[], Any]],
  rounds: int,
  cold: bool = False,
  blocks: dict[str, int] | None = None,
  warmup: bool = False,
) -> dict[str, list[float]]:
  """Seconds per call of each thunk, one sample per round, in the orders
  of `round_orders`.

  An untimed warm-up round runs first if ``warmup``. ``blocks[name]``
  calls (default 1) are timed together and averaged, for calls too short
  for one clock reading.
  """
  names = list(thunks)
  blocks = blocks or {}
  times = {name: [] for name in names}
  for name in names if warmup else ():
    _time_block(thunks[name], False, 1)
  for order in round_orders(names, rounds):
    for name in order:
      block = blocks.get(name, 1)
      times[name].append(_time_block(thunks[name], cold, block))
  return times


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
  """Call order of each round: the rows of a balanced Latin square
  (Williams design), cycled. Every ``len(names)`` rounds each
  implementation takes every position once and follows every other
  implementation once (for an odd count, over twice as many rounds). A
  plain rotation would give each implementation the same predecessor in
  every round, which biases warm-cache runs (a call right after the 256
  MiB memcpy, or after penzai's transposes, starts cold)."""
  n = len(names)
  first, low, high = [0], 1, n - 1
  while len(first) < n:
    first.append(low)
    low += 1
    if len(first) < n:
      first.append(high)
      high -= 1
  rows = [[(i + r) % n for i in first] for r in range(n)]
  if n % 2:
    rows += [row[::-1] for row in rows]
  return [[names[i] for i in rows[r % len(rows)]] for r in range(rounds)]


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
  p25, p50, p75 = np.percentile(np.asarray(values), [25, 50, 75])
  return float(p50), float(p25), float(p75)


def summarize(
  case: Case,
  times: dict[str, list[float]],
  diffs: dict[str, tuple[float, float]],
) -> list[dict[str, Any]]:
  """One row per implementation: quantiles, ratios, rates, check result."""
  base = np.asarray(times[case.impls[0].name])
  ref_rates = [
    impl.work / np.median(times[impl.name])
    for impl in case.impls
    if impl.reference and impl.work
  ]
  limit = max(ref_rates) if ref_rates else None
  rows = []
  for impl in case.impls:
    t = np.asarray(times[impl.name])
    median, p25, p75 = _quantiles(t)
    row = dict(case=case.name, impl=impl.name, reference=impl.reference)
    row.update(median=median, p25=p25, p75=p75, unit=case.unit)
    work = impl.work if impl.reference else case.work
    row["rate"] = work / median if work else None
    if not impl.reference:
      row["ratio"], row["ratio_p25"], row["ratio_p75"] = _quantiles(t / base)
      abs_diff, rel_diff = diffs.get(impl.name, (None, None))
      row.update(max_abs_diff=abs_diff, max_rel_diff=rel_diff)
      row["check_ok"] = rel_diff is None or rel_diff <= case.tol
      if not row["check_ok"]:
        log(f"  MISMATCH {case.name} / {impl.name}: max|diff| {abs_diff:.3g}")
      if limit and row["rate"]:
        row["pct_limit"] = 100.0 * row["rate"] / limit
    row["times"] = [float(x) for x in t]
    rows.append(row)
  return rows


def run_case(
  case: Case, rounds: int, cold: bool = False
) -> list[dict[str, Any]]:
  """Checks (which also compiles and warms up), times and summarizes."""
  log(f"  {case.name}: checking {len(case.impls)} implementations")
  diffs = check_case(case)
  log(f"  {case.name}: timing {rounds} rounds")
  thunks = {impl.name: impl.thunk for impl in case.impls}
  times = time_rounds(thunks, rounds, cold)
  return summarize(case, times, diffs)


# ------------------------------------------------------------- formatting


def fmt_time(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.1f} us"
  if seconds < 1.0:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds:.3f} s"


def fmt_rate(rate: float | None, unit: str) -> str:
  if not rate:
    return "-"
  return f"{rate / 1e9:.1f} {unit}"


def fmt_diff(row: dict[str, Any]) -> str:
  if row.get("reference") or row.get("max_abs_diff") is None:
    return "-"
  text = f"{row['max_abs_diff']:.2g}"
  return text if row["check_ok"] else f"{text} MISMATCH"


def timing_cells(row: dict[str, Any]) -> list[str]:
  """case, impl, median, ratio, ratio p25-p75, time p25-p75."""
  name = f"[ref] {row['impl']}" if row.get("reference") else row["impl"]
  ratio = row.get("ratio")
  return [
    row["case"],
    name,
    fmt_time(row["median"]),
    f"{ratio:.2f}x" if ratio is not None else "-",
    "-" if ratio is None else f"{row['ratio_p25']:.2f}-{row['ratio_p75']:.2f}",
    f"{fmt_time(row['p25'])} - {fmt_time(row['p75'])}",
  ]


TIMING_HEADERS = ["case", "impl", "median", "ratio", "ratio p25-p75", "p25-p75"]


def print_table(
  title: str, headers: Sequence[str], cells: Sequence[Sequence[str]]
) -> None:
  """Prints a markdown table, columns padded to equal width."""
  widths = [len(h) for h in headers]
  for row in cells:
    widths = [max(w, len(c)) for w, c in zip(widths, row)]
  line = lambda row: (
    "| "
    + " | ".join(  # noqa: E731
      c.ljust(w) for c, w in zip(row, widths)
    )
  )
  print(f"\n## {title}\n")
  print(line(headers) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  previous = None
  for row in cells:
    shown = list(row)
    if row[0] == previous:
      shown[0] = ""
    previous = row[0]
    print(line(shown) + " |")
  sys.stdout.flush()


def print_timing_table(
  title: str, rows: Sequence[dict[str, Any]], limit: bool = True
) -> None:
  """The standard table: timing cells, rate, % of limit, check."""
  headers = [*TIMING_HEADERS, "rate"]
  if limit:
    headers.append("% limit")
  headers.append("max|diff|")
  cells = []
  for row in rows:
    extra = [fmt_rate(row.get("rate"), row.get("unit", ""))]
    if limit:
      pct = row.get("pct_limit")
      extra.append(f"{pct:.0f}%" if pct is not None else "-")
    cells.append([*timing_cells(row), *extra, fmt_diff(row)])
  print_table(title, headers, cells)
