"""Suite-wide settings and shared helpers.

Strict dtype and rank promotion (as in equinox's suite): a silent promotion
inside named_embed fails a test instead of costing users later.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from penzai import pz

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def raw(named: pz.nx.NamedArrayBase, *order: str) -> np.ndarray:
  """The data of ``named`` as numpy, positional axes first, then ``order``."""
  return np.asarray(named.untag(*order).unwrap()) if order else np.asarray(
    named.unwrap()
  )


@pytest.fixture(params=["eager", "jit"])
def run(request):
  """Calls a function eagerly or under `jax.jit` (the test runs twice)."""
  if request.param == "eager":
    return lambda f, *args: f(*args)
  return lambda f, *args: jax.jit(f)(*args)
