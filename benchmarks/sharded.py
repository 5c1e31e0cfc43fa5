"""Communication and memory of a vocabulary-sharded table vs a replicated one.

  python benchmarks/sharded.py --quick      # V=16000, D=128, tokens [8, 256]
  python benchmarks/sharded.py              # V=32000, D=512, tokens [8, 512]
  python benchmarks/sharded.py --steps 5 --axis-types auto --json out.json

The script gives itself 8 CPU devices (``jax_num_cpu_devices``, set before
JAX's backend starts) and a ``(data=2, model=4)`` mesh, once with Explicit
and once with Auto axes. On each it compiles one training step of a tied
embedding: lookup, then ``ne.decode_cross_entropy`` through the same table,
``jax.value_and_grad`` with respect to the table. Three layouts:

- ``vocab-parallel``: ``{"vocabulary": "model", "batch": "data"}``, the
  table's rows split over ``model``, the tokens over ``data``;
- ``replicated``: ``{"batch": "data"}``, the same tokens, a whole table on
  every device;
- ``replicated-dp8``: ``{"batch": ("data", "model")}``, pure data
  parallelism, the tokens over all 8 devices.

The vocabulary is padded to a multiple of ``128 * 4`` rows (Megatron's
rule), the same table in every layout. Per layout the script reports:

- every collective of the compiled HLO (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute): result shapes, the mesh
  axes it runs over (decoded from its replica groups), which part of the
  step emitted it (from the HLO metadata), the payload in bytes (the data
  entering the collective on each device: the all-reduce buffer, the
  all-gather result, the reduce-scatter operand) and the ring estimate of
  the bytes each device sends (``2(M-1)/M`` of the payload for an
  all-reduce over ``M`` devices, ``(M-1)/M`` for the others). Collectives
  inside a while loop are counted once per iteration (XLA's
  ``known_trip_count``); none are expected there;
- ``compiled.memory_analysis()``: per-device argument, output and temporary
  bytes, and their sum less aliased bytes (``peak``);
- after running one step, the per-device bytes of the table and of its
  gradient (the largest of their ``addressable_shards``), with their specs;
- the median wall time of ``--steps N`` more steps (default 2 with
  ``--quick``, else 1; 0 reports the first step's time). Fake CPU devices
  share the host's cores and "communicate" by memcpy: the times show
  redundant compute, and say nothing about a real interconnect.

Tables go to stdout, progress to stderr, everything to ``--json`` (default
``benchmarks/sharded_results.json``; do not commit it). A layout that fails
to compile is reported with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before the backend starts

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from penzai import pz  # noqa: E402

import named_embed as ne  # noqa: E402

MESH_SHAPE = (2, 4)
MESH_AXES = ("data", "model")
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
LAYOUTS = {
  "vocab-parallel": {"vocabulary": "model", "batch": "data"},
  "replicated": {"batch": "data"},
  "replicated-dp8": {"batch": ("data", "model")},
}
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
)
DEFAULT_JSON = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "sharded_results.json"
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of a run."""

  vocab: int  # real tokens
  embed: int  # D
  batch: int  # B
  seq: int  # T
  pad_to: int  # rows are padded to a multiple of this
  steps: int  # timed steps after the first


QUICK = Config(vocab=16000, embed=128, batch=8, seq=256, pad_to=512, steps=2)
FULL = Config(vocab=32000, embed=512, batch=8, seq=512, pad_to=512, steps=1)


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------- HLO parsing

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z\-]*)\((.*)$"
)
_CALLEES = re.compile(
  r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
  r"=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(dtype, dims)`` of every array type in an HLO shape string."""
  shapes = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _DTYPE_BYTES:
      shapes.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return shapes


def shape_bytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
  return int(sum(_DTYPE_BYTES[t] * math.prod(d) for t, d in shapes))


def _iota_groups(dims, perm, shape):
  ids = np.arange(math.prod(dims)).reshape(dims)
  if perm is not None:
    ids = ids.transpose(perm)
  return ids.reshape(shape)


def replica_groups(line: str, num_devices: int) -> np.ndarray | None:
  """The device groups of a collective, ``[groups, group size]``, or None.

  Understands the three forms XLA prints: explicit lists
  (``{{0,1},{2,3}}``), iota (``[2,4]<=[4,2]T(1,0)``) and mesh
  (``mesh['axis_0'=2,'axis_1'=4], device_ids=(...) {'axis_0'}``).
  """
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]", line)
  if match:
    axes = re.findall(r"'([^']+)'=(\d+)", match.group(1))
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    rest = line[match.end() :]
    ids = np.arange(math.prod(sizes))
    device_ids = re.match(
      r",\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)", rest
    )
    if device_ids:
      dims = [int(d) for d in device_ids.group(1).split(",")]
      perm = device_ids.group(2)
      perm = [int(p) for p in perm.split(",")] if perm else None
      ids = _iota_groups(dims, perm, (-1,))
      rest = rest[device_ids.end() :]
    chosen = re.match(r"\s*\{([^}]*)\}", rest)
    if not chosen:
      return None
    over = re.findall(r"'([^']+)'", chosen.group(1))
    grid = ids.reshape(sizes)
    others = [i for i, n in enumerate(names) if n not in over]
    inside = [names.index(n) for n in over]
    grid = grid.transpose(others + inside)
    return grid.reshape(-1, math.prod(sizes[i] for i in inside) or 1)
  match = re.search(
    r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line
  )
  if match:
    shape = [int(d) for d in match.group(1).split(",")]
    dims = [int(d) for d in match.group(2).split(",")]
    perm = match.group(3)
    perm = [int(p) for p in perm.split(",")] if perm else None
    return _iota_groups(dims, perm, (-1, shape[-1]))
  match = re.search(r"replica_groups=\{(\{[\d,{} ]*\})?\}", line)
  if match:
    if not match.group(1):  # {}: one group of every device
      return np.arange(num_devices)[None, :]
    groups = [
      [int(i) for i in g.split(",") if i.strip()]
      for g in re.findall(r"\{([\d, ]*)\}", match.group(1))
    ]
    if len({len(g) for g in groups}) == 1:
      return np.array(groups)
  return None


def axes_of_groups(groups: np.ndarray | None, mesh) -> str:
  """Names of the mesh axes along which a group's devices differ."""
  if groups is None:
    return "?"
  shape = tuple(mesh.devices.shape)
  coords = np.unravel_index(groups[0], shape)
  varying = [
    name
    for name, c in zip(mesh.axis_names, coords, strict=True)
    if len(set(c.tolist())) > 1
  ]
  return "x".join(varying) or "-"


def axes_of_pairs(pairs: list[tuple[str, str]], mesh) -> str:
  """Names of the mesh axes a collective-permute moves data along."""
  if not pairs:
    return "?"
  shape = tuple(mesh.devices.shape)
  varying = set()
  for source, target in pairs:
    a = np.unravel_index(int(source), shape)
    b = np.unravel_index(int(target), shape)
    varying |= {
      n for n, i, j in zip(mesh.axis_names, a, b, strict=True) if i != j
    }
  return "x".join(n for n in mesh.axis_names if n in varying) or "-"


def _origin(op_name: str) -> str:
  """Which part of the step an instruction comes from, from its metadata."""
  if "decode_cross_entropy" in op_name:
    part = "loss"
  elif "gather_rows_kernel" in op_name or "named_embed.lookup" in op_name:
    part = "lookup"
  elif "named_embed.decode" in op_name:
    part = "decode"
  else:
    part = "step"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  last = op_name.rsplit("/", 1)[-1] if op_name else "?"
  return f"{part} {direction} ({last})"


def _computations(text: str) -> dict[str, list[str]]:
  """HLO computation name -> its instruction lines."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if not line.startswith((" ", "\t", "}")) and line.strip():
      header = _HEADER.match(line)
      current = header.group(1) if header else None
      if current is not None:
        computations[current] = []
      continue
    if current is not None and line.startswith((" ", "\t")):
      computations[current].append(line)
  return computations


def _trip_counts(computations: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per call of the entry one.

  Loop bodies count ``known_trip_count`` times (0 marks an unknown count);
  everything else once per call of its caller.
  """
  calls: dict[str, list[tuple[str, int]]] = {name: [] for name in computations}
  for name, lines in computations.items():
    for line in lines:
      trip = 1
      if re.search(r"\bwhile\(", line):
        found = _TRIP_COUNT.search(line)
        trip = int(found.group(1)) if found else 0
      body = _BODY.search(line)
      for callee in _CALLEES.findall(line):
        if callee in calls[name] or callee not in computations:
          continue
        times = trip if body and callee == body.group(1) else 1
        calls[name].append((callee, times))
      for group in _BRANCHES.findall(line):
        for callee in re.findall(r"%?([\w.\-]+)", group):
          if callee in computations:
            calls[name].append((callee, 1))
  callees = {callee for edges in calls.values() for callee, _ in edges}
  counts: dict[str, int] = {}

  def visit(name: str, times: int, depth: int = 0) -> None:
    if depth > 50:
      return
    counts[name] = counts.get(name, 0) + times
    for callee, trip in calls[name]:
      visit(callee, times * trip, depth + 1)

  for root in computations:
    if root not in callees:
      visit(root, 1)
  return counts


def collectives(text: str, mesh) -> list[dict[str, Any]]:
  """Every collective of a compiled HLO module, with its bytes per step."""
  computations = _computations(text)
  counts = _trip_counts(computations)
  num_devices = mesh.devices.size
  found = []
  for name, lines in computations.items():
    elements: dict[str, dict[int, str]] = {}
    for line in lines:  # per-element origins of tuple-shaped collectives
      match = re.search(r"get-tuple-element\(%?([\w.\-]+)\), index=(\d+)", line)
      if match:
        op_name = _OP_NAME.search(line)
        elements.setdefault(match.group(1), {})[int(match.group(2))] = _origin(
          op_name.group(1) if op_name else ""
        )
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      result, shape_text, op = match.group(1), match.group(2), match.group(3)
      kind = op.removesuffix("-start")
      if kind not in COLLECTIVES or op.endswith("-done"):
        continue
      shapes = array_shapes(shape_text)
      if op.endswith("-start") and kind != "all-reduce":
        # async forms return (operand, result, ...): keep the result
        shapes = shapes[1:2]
      groups = replica_groups(line, num_devices)
      m = groups.shape[1] if groups is not None else num_devices
      over = axes_of_groups(groups, mesh)
      if kind == "collective-permute":
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
        pairs = re.findall(r"\{(\d+),(\d+)", pairs.group(1)) if pairs else []
        over = axes_of_pairs(pairs, mesh)
        m = 2
      result_bytes = shape_bytes(shapes)
      if kind == "reduce-scatter":
        payload = result_bytes * m
      else:
        payload = result_bytes
      if kind == "all-reduce":
        ring = 2 * (m - 1) / m * payload
      elif kind == "collective-permute":
        ring = payload
      else:
        ring = (m - 1) / m * payload
      times = counts.get(name, 1)
      op_name = _OP_NAME.search(line)
      origins = [_origin(op_name.group(1) if op_name else "")]
      if result in elements:
        origins = [elements[result][i] for i in sorted(elements[result])]
      found.append(
        dict(
          op=kind,
          shapes=[f"{t}[{','.join(map(str, d))}]" for t, d in shapes],
          group_size=int(m),
          over=over,
          computation=name,
          times=times,  # 0: inside a loop of unknown trip count
          payload_bytes=int(payload * max(times, 1)),
          ring_bytes=int(ring * max(times, 1)),
          origins=origins,
        )
      )
  return found


# ------------------------------------------------------------------ the step


def loss_fn(table, tokens, targets):
  hidden = ne.lookup(table, tokens)
  return ne.decode_cross_entropy(table, hidden, targets)


def shard_bytes(array: jax.Array) -> int:
  return max(s.data.nbytes for s in array.addressable_shards)


def run_case(config: Config, kind: str, layout: str) -> dict[str, Any]:
  """Compiles (and runs) one training step; returns what it measured."""
  rules = LAYOUTS[layout]
  mesh = jax.make_mesh(
    MESH_SHAPE, MESH_AXES, axis_types=(AXIS_TYPES[kind],) * len(MESH_AXES)
  )
  record: dict[str, Any] = dict(axis_types=kind, layout=layout, rules=rules)
  table = ne.sharded_init(
    ne.EmbeddingTable.from_config,
    mesh,
    rules,
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=config.vocab,
    embedding_axes={"embedding": config.embed},
    pad_to_multiple=config.pad_to,
  )
  table = pz.freeze_params(table)  # a ParameterValue: jax.grad reaches it
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab, (config.batch, config.seq + 1))
  ids = ids.astype(np.int32)
  tokens = ne.shard(pz.nx.wrap(ids[:, :-1]).tag("batch", "seq"), mesh, rules)
  targets = ne.shard(pz.nx.wrap(ids[:, 1:]).tag("batch", "seq"), mesh, rules)
  record["table_spec"] = str(table.rows_array().sharding.spec)
  record["tokens_spec"] = str(tokens.data_array.sharding.spec)
  step = jax.jit(jax.value_and_grad(loss_fn))
  try:
    started = time.perf_counter()
    lowered = step.lower(table, tokens, targets)
    record["lower_s"] = time.perf_counter() - started
    started = time.perf_counter()
    compiled = lowered.compile()
    record["compile_s"] = time.perf_counter() - started
  except Exception as error:  # reported, and the other layouts still run
    record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return record
  found = collectives(compiled.as_text(), mesh)
  record["collectives"] = found
  record["payload_bytes"] = sum(c["payload_bytes"] for c in found)
  record["ring_bytes"] = sum(c["ring_bytes"] for c in found)
  record["in_loops"] = sum(1 for c in found if c["times"] != 1)
  memory = compiled.memory_analysis()
  record["memory"] = {
    key: int(getattr(memory, f"{key}_size_in_bytes"))
    for key in ("argument", "output", "temp", "alias")
  }
  record["memory"]["peak"] = (
    record["memory"]["argument"]
    + record["memory"]["output"]
    + record["memory"]["temp"]
    - record["memory"]["alias"]
  )
  started = time.perf_counter()
  loss, grad = jax.block_until_ready(compiled(table, tokens, targets))
  record["first_step_s"] = time.perf_counter() - started
  loss = float(loss)
  rows = table.rows_array()
  grad_rows = grad.rows_array()
  record["loss"] = loss
  record["grad_norm"] = float(jnp.sqrt(jnp.sum(jnp.square(grad_rows))))
  record["table_bytes_per_device"] = shard_bytes(rows)
  record["grad_bytes_per_device"] = shard_bytes(grad_rows)
  record["grad_spec"] = str(grad_rows.sharding.spec)
  times = []
  for _ in range(config.steps):
    started = time.perf_counter()
    jax.block_until_ready(compiled(table, tokens, targets))
    times.append(time.perf_counter() - started)
  record["step_s"] = times
  return record


# ------------------------------------------------------------------- output


def fmt_bytes(n: float | None) -> str:
  if n is None:
    return "-"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def print_table(header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  for row in [header, ["-" * w for w in widths], *rows]:
    cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
    print("  ".join(cells).rstrip())


def print_case(record: dict[str, Any]) -> None:
  title = f"{record['layout']}, {record['axis_types']} axes"
  print(f"\n## {title}: rules {record['rules']}")
  print(f"table {record['table_spec']}, tokens {record['tokens_spec']}")
  if "error" in record:
    print(f"FAILED to compile: {record['error']}")
    return
  rows = []
  for c in record["collectives"]:
    times = {1: "1", 0: "loop x?"}.get(c["times"], f"loop x{c['times']}")
    rows.append(
      [
        c["op"],
        ", ".join(c["shapes"]),
        c["over"],
        str(c["group_size"]),
        times,
        fmt_bytes(c["payload_bytes"]),
        fmt_bytes(c["ring_bytes"]),
        "; ".join(dict.fromkeys(c["origins"])),
      ]
    )
  payload, ring = record["payload_bytes"], record["ring_bytes"]
  rows.append(["total", *[""] * 4, fmt_bytes(payload), fmt_bytes(ring), ""])
  header = ["collective", "shapes", "over", "M", "runs", "payload"]
  print_table([*header, "ring/device", "from"], rows)


def print_summary(records: list[dict[str, Any]]) -> None:
  print("\n## Summary (per device, per step)")
  rows = []
  for r in records:
    if "error" in r:
      rows.append([r["layout"], r["axis_types"], "FAILED", *["-"] * 11])
      continue
    memory = r["memory"]
    step = np.median(r["step_s"]) if r["step_s"] else r["first_step_s"]
    rows.append(
      [
        r["layout"],
        r["axis_types"],
        str(len(r["collectives"])),
        fmt_bytes(r["payload_bytes"]),
        fmt_bytes(r["ring_bytes"]),
        fmt_bytes(memory["argument"]),
        fmt_bytes(memory["output"]),
        fmt_bytes(memory["temp"]),
        fmt_bytes(memory["peak"]),
        fmt_bytes(r["table_bytes_per_device"]),
        fmt_bytes(r["grad_bytes_per_device"]),
        f"{r['loss']:.5f}",
        f"{r['compile_s']:.1f} s",
        f"{step:.2f} s",
      ]
    )
  header = ["layout", "axes", "colls", "payload", "ring/device", "args"]
  header += ["outputs", "temp", "peak", "table", "grad", "loss", "compile"]
  header += ["step"]
  print_table(header, rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes")
  parser.add_argument(
    "--steps", type=int, default=None, help="timed steps after the first"
  )
  parser.add_argument(
    "--axis-types",
    default="explicit,auto",
    help="comma-separated: explicit, auto",
  )
  parser.add_argument(
    "--layouts",
    default=",".join(LAYOUTS),
    help=f"comma-separated: {', '.join(LAYOUTS)}",
  )
  parser.add_argument("--json", default=DEFAULT_JSON, help="results file")
  args = parser.parse_args()
  config = QUICK if args.quick else FULL
  if args.steps is not None:
    if args.steps < 0:
      parser.error("--steps must be non-negative")
    config = dataclasses.replace(config, steps=args.steps)
  kinds = [k.strip() for k in args.axis_types.split(",") if k.strip()]
  layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
  for kind in kinds:
    if kind not in AXIS_TYPES:
      parser.error(f"unknown axis type {kind!r}")
  for layout in layouts:
    if layout not in LAYOUTS:
      parser.error(f"unknown layout {layout!r}")
  if jax.device_count() != 8:
    sys.exit(f"expected 8 CPU devices, got {jax.devices()}")

  rows = -config.vocab % config.pad_to + config.vocab
  tokens = config.batch * config.seq
  print(
    f"# Vocabulary-sharded vs replicated table: mesh {MESH_SHAPE} "
    f"{MESH_AXES} on {jax.device_count()} CPU devices"
  )
  print(
    f"V={config.vocab} (padded to {rows} rows), D={config.embed}, tokens"
    f" [{config.batch}, {config.seq}] = {tokens}, float32; step = lookup +"
    " decode_cross_entropy, value_and_grad w.r.t. the tied table"
  )
  started = time.perf_counter()
  records = []
  for kind in kinds:
    for layout in layouts:
      log(f"{layout}, {kind} axes ...")
      record = run_case(config, kind, layout)
      records.append(record)
      print_case(record)
  print_summary(records)
  losses = [r["loss"] for r in records if "loss" in r]
  if losses:
    spread = (max(losses) - min(losses)) / abs(np.mean(losses))
    print(f"\nloss spread across layouts: {spread:.1e} (relative)")
  seconds = time.perf_counter() - started
  print(f"total time {seconds:.1f} s")
  result = dict(
    config=dataclasses.asdict(config),
    padded_rows=rows,
    mesh=dict(zip(MESH_AXES, MESH_SHAPE, strict=True)),
    environment=dict(
      jax=jax.__version__,
      named_embed=ne.__version__,
      python=platform.python_version(),
      machine=platform.machine(),
      cpus=os.cpu_count(),
    ),
    seconds=seconds,
    cases=records,
  )
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  log(f"wrote {args.json}")


if __name__ == "__main__":
  main()
