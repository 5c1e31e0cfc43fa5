"""What crosses the network per step when a table spans processes.

Runs examples/multihost.py (N local processes x K CPU devices, gloo
collectives), which writes the compiled HLO of its jitted train step and
the step's per-device memory (`compiled.memory_analysis()`). This script
lists the step's collectives with their bytes, and marks those whose
device groups span several processes: on a cluster with one process per
host, those are the bytes that cross the network.

  python benchmarks/multihost.py                      # 2 processes x 4
  python benchmarks/multihost.py --processes 4 --devices 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "multihost.py"
sys.path.insert(0, str(HERE))

import sharded  # noqa: E402  (benchmarks/sharded.py: the HLO reader)


def processes_spanned(over: str, processes: int) -> int:
  """How many processes a collective's device groups span: the example's
  mesh puts process p's devices on row p of ``data``, so a group spans
  processes when it runs along ``data``."""
  return processes if "data" in over.split("x") else 1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=4)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    hlo = pathlib.Path(tmp) / "step.hlo"
    subprocess.run(
      [
        sys.executable,
        str(EXAMPLE),
        "--processes",
        str(args.processes),
        "--devices",
        str(args.devices),
        "--steps",
        "1",
        "--hlo",
        str(hlo),
      ],
      check=True,
      stdout=subprocess.DEVNULL,
    )
    text = hlo.read_text()
    memory = json.loads(pathlib.Path(str(hlo) + ".memory.json").read_text())
  shape = (args.processes, args.devices)
  mesh = types.SimpleNamespace(
    devices=np.arange(args.processes * args.devices).reshape(shape),
    axis_names=("data", "model"),
  )
  rows = []
  crossing = 0
  for found in sharded.collectives(text, mesh):
    spans = processes_spanned(found["over"], args.processes)
    if spans > 1:
      crossing += found["payload_bytes"]
    rows.append(
      [
        found["op"],
        ", ".join(found["shapes"]),
        found["over"],
        str(spans),
        f"{found['payload_bytes']:,}",
        "; ".join(found["origins"]),
      ]
    )
  print(
    f"mesh (data={args.processes}, model={args.devices}): one process per"
    " row of data; bytes per device per step\n"
  )
  sharded.print_table(
    ["collective", "shapes", "over", "processes", "bytes", "from"], rows
  )
  print(f"\ncrossing processes: {crossing:,} bytes per device per step")
  print("per-device memory of the step (bytes):", memory)


if __name__ == "__main__":
  main()
