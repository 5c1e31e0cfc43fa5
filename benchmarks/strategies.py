"""gather vs one_hot lookup strategies (value and gradient), jit, CPU."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

import named_embed as ne

rng = np.random.default_rng(0)
print(
  "| V | D | tokens | gather fwd | one_hot fwd | ratio | gather grad | one_hot grad | ratio |"
)
print("|---|---|---|---|---|---|---|---|---|")
for V in (256, 2048, 32768):
  D = 256
  table = pz.freeze_params(
    ne.EmbeddingTable.from_pretrained(
      rng.normal(size=(V, D)).astype(np.float32), freeze=False
    )
  )
  ids = pz.nx.wrap(jnp.asarray(rng.integers(0, V, size=(8, 512)))).tag("b", "s")
  fns = {}
  for s in ("gather", "one_hot"):
    fns[s + "_fwd"] = jax.jit(
      lambda t, i, s=s: ne.lookup(t, i, strategy=s).data_array
    )
    fns[s + "_grad"] = jax.jit(
      jax.grad(
        lambda t, i, s=s: jnp.sum(ne.lookup(t, i, strategy=s).data_array)
      )
    )
  for f in fns.values():
    jax.block_until_ready(f(table, ids))
  times = {k: [] for k in fns}
  for r in range(7):
    for k, f in list(fns.items())[::-1] if r % 2 else fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(table, ids))
      times[k].append(time.perf_counter() - t0)
  m = {k: np.median(v) * 1e3 for k, v in times.items()}
  print(
    f"| {V} | {D} | 8x512 | {m['gather_fwd']:.2f} ms | {m['one_hot_fwd']:.2f} ms | {m['one_hot_fwd'] / m['gather_fwd']:.1f}x | {m['gather_grad']:.2f} ms | {m['one_hot_grad']:.2f} ms | {m['one_hot_grad'] / m['gather_grad']:.1f}x |"
  )
