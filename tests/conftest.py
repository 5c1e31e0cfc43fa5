"""Suite-wide settings and shared helpers.

Strict dtype and rank promotion (as in equinox's suite): a silent promotion
inside named_embed fails a test instead of costing users later.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest
from penzai import pz

# tests/multidevice needs 8 CPU devices before the backend starts: it runs
# in its own process (tests/sharding_test.py starts it).
collect_ignore = (
  [] if os.environ.get("NAMED_EMBED_MULTIDEVICE") else ["multidevice"]
)

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
