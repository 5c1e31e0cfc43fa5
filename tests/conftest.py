"""Suite-wide settings and shared helpers.

Strict dtype and rank promotion (as in equinox's suite): a silent promotion
inside named_embed fails a test instead of costing users later.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from penzai import pz

# tests/multidevice needs 8 CPU devices before the backend starts: it runs
# in its own process (tests/sharding_test.py starts it).
collect_ignore = (
  [] if os.environ.get("NAMED_EMBED_MULTIDEVICE") else ["multidevice"]
)


# ------------------------------------------------- the 8-device subprocesses
# Each module of tests/multidevice runs in its own process. The suite is
# mostly single-threaded compiling, so on two cores they run one after the
# other in a background thread from the start of the session, beside the
# other tests; tests/sharding_test.py waits for each one's result.

_MULTIDEVICE_TEST = "test_multidevice_suite_passes_on_eight_cpu_devices"
_multidevice_runs: dict[str, dict] = {}
_multidevice_lock = threading.Lock()
_multidevice_processes: list[subprocess.Popen] = []


def _run_multidevice(module: str) -> dict:
  """Runs one module of tests/multidevice in a fresh process."""
  here = pathlib.Path(__file__).resolve().parent
  env = dict(os.environ, NAMED_EMBED_MULTIDEVICE="1")
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0"]
  process = subprocess.Popen(
    [*command, str(here / "multidevice" / module)],
    cwd=here.parent,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _multidevice_processes.append(process)
  try:
    stdout, stderr = process.communicate(timeout=900)
  except subprocess.TimeoutExpired:
    process.kill()
    stdout, stderr = process.communicate()
  return {"returncode": process.returncode, "stdout": stdout, "stderr": stderr}


def _start_multidevice(modules: list[str]) -> None:
  def run_all():
    for module in modules:
      with _multidevice_lock:
        entry = _multidevice_runs[module]
        if entry.get("taken"):
          continue
        entry["taken"] = True
      try:
        entry["result"] = _run_multidevice(module)
      except Exception as error:  # reported by the waiting test
        entry["result"] = {
          "returncode": -1,
          "stdout": "",
          "stderr": repr(error),
        }
      finally:
        entry["done"].set()

  for module in modules:
    _multidevice_runs[module] = {"done": threading.Event()}
  threading.Thread(target=run_all, daemon=True).start()


def multidevice_result(module: str) -> dict:
  """The finished run of ``module`` (started in the background at the
  start of the session, or now, if it was not)."""
  with _multidevice_lock:
    entry = _multidevice_runs.setdefault(module, {"done": threading.Event()})
    mine = not entry.get("taken")
    entry["taken"] = True
  if mine:
    entry["result"] = _run_multidevice(module)
    entry["done"].set()
  entry["done"].wait()
  return entry["result"]


def pytest_collection_finish(session):
  if os.environ.get("PYTEST_XDIST_WORKER"):
    return  # each worker runs its own share when it reaches them
  modules = [
    item.callspec.params["module"]
    for item in session.items
    if getattr(item, "originalname", None) == _MULTIDEVICE_TEST
  ]
  if modules:
    _start_multidevice(modules)


def pytest_sessionfinish(session):
  for process in _multidevice_processes:
    if process.poll() is None:
      process.kill()


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def data(named: pz.nx.NamedArrayBase, *order: str) -> jax.Array:
  """The data of ``named``: positional axes first, then the named ``order``."""
  return named.order_as(*order).data_array


def raw(named: pz.nx.NamedArrayBase, *order: str) -> np.ndarray:
  """`data` as a numpy array."""
  return np.asarray(data(named, *order))


def compiled_ops(f, *args) -> list[tuple[str, str]]:
  """``(op, result shape)`` of every instruction in the optimised HLO."""
  text = jax.jit(f).lower(*args).compile().as_text()
  found = []
  for line in text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%\S+ = (\S+) ([a-z][a-z0-9\-]*)\(", line)
    if match:
      found.append((match.group(2), match.group(1)))
  return found


@pytest.fixture(params=["eager", "jit"])
def run(request):
  """Calls a function eagerly or under `jax.jit` (the test runs twice)."""
  if request.param == "eager":
    return lambda f, *args: f(*args)
  return lambda f, *args: jax.jit(f)(*args)
