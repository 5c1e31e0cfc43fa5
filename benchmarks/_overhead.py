"""Per-call overheads: eager calls, jit dispatch on pytrees, compile time."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _harness import (
  Case,
  Impl,
  check_case,
  log,
  round_orders,
  summarize,
  time_rounds,
)
from _impls import (
  KINDS,
  TOKEN_AXES,
  f32,
  flax_embed,
  jit_thunk,
  named,
  ne_kind,
  ne_table,
  nnx_embed,
  pz_table,
)
from flax import nnx
from penzai import pz

import named_embed as ne

TINY_V, TINY_D, TINY_TOKENS = 1000, 16, 4


def tiny_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
  """Table ``[1000, 16]``, ids ``[1, 4]`` and hidden ``[4, 16]`` (f32)."""
  rng = np.random.default_rng(2)
  w = rng.standard_normal((TINY_V, TINY_D), np.float32)
  ids = rng.integers(0, TINY_V, (1, TINY_TOKENS), np.int32)
  h = rng.standard_normal((TINY_TOKENS, TINY_D), np.float32)
  return jnp.asarray(w), jnp.asarray(ids), jnp.asarray(h)


def eager_lookup_case(w, ids) -> Case:
  """Eager tiny lookups: raw JAX, every kind of named_embed table, flax
  (linen through ``Module.apply``, and nnx called as is) and penzai."""
  module, variables = flax_embed(w)
  nnx_module = nnx_embed(w)
  tokens = named(ids, *TOKEN_AXES)
  ne_layer = ne.EmbeddingLookup(ne_table(w))
  pz_layer = pz.nn.EmbeddingLookup(pz_table(w))
  unwrap = lambda out: out.unwrap(*TOKEN_AXES, "embedding")  # noqa: E731
  kinds = []
  for kind in KINDS[1:]:
    table, rows = ne_kind(w, kind)
    kinds.append(
      Impl(
        f"ne.lookup {kind}",
        lambda table=table: ne.lookup(table, tokens),
        to_numpy=unwrap,
        expected=lambda _, rows=rows: rows[np.asarray(ids)],
      )
    )
  return Case(
    f"lookup eager: {TINY_TOKENS} tokens, V={TINY_V} D={TINY_D}",
    [
      Impl("raw_take", lambda: jnp.take(w, ids, axis=0)),
      Impl("named_embed", lambda: ne_layer(tokens), to_numpy=unwrap),
      Impl("ne.lookup", lambda: ne.lookup(ne_layer.table, tokens), unwrap),
      *kinds,
      Impl("flax linen (Module.apply)", lambda: module.apply(variables, ids)),
      Impl("flax nnx (Embed)", lambda: nnx_module(ids)),
      Impl("penzai", lambda: pz_layer(tokens), to_numpy=unwrap),
      Impl("jitted raw_take (floor)", jit_thunk(_take, w, ids)),
    ],
  )


def eager_pooled_case(w, ids) -> Case:
  """Eager tiny pooled lookups (one bag of 4 ids, mean): raw take-then-mean
  and every kind of named_embed table."""
  bags = named(ids, "batch", "member")
  unwrap = lambda out: out.unwrap("batch", "embedding")  # noqa: E731
  table = ne_table(w)
  layer = ne.EmbeddingBag(table, over="member")
  kinds = []
  for kind in KINDS:
    table, rows = ne_kind(w, kind)
    kinds.append(
      Impl(
        f"ne.pooled_lookup {kind}",
        lambda table=table: ne.pooled_lookup(table, bags, over="member"),
        to_numpy=unwrap,
        expected=lambda _, rows=rows: rows[np.asarray(ids)].mean(axis=1),
      )
    )
  return Case(
    f"pooled lookup eager (mean): 1 bag of {TINY_TOKENS}, V={TINY_V}"
    f" D={TINY_D}",
    [
      Impl("raw_take_mean", lambda: _take_mean(w, ids)),
      Impl("ne.EmbeddingBag", lambda: layer(bags), to_numpy=unwrap),
      *kinds,
      Impl("jitted raw_take_mean (floor)", jit_thunk(_take_mean, w, ids)),
    ],
  )


def eager_decode_case(w, h) -> Case:
  module, variables = flax_embed(w)
  nnx_module = nnx_embed(w)
  hidden = named(h, "tokens", "embedding")
  ne_layer = ne.EmbeddingDecode(ne_table(w))
  pz_layer = pz.nn.EmbeddingDecode(pz_table(w))
  unwrap = lambda out: f32(out.unwrap("tokens", "vocabulary"))  # noqa: E731
  return Case(
    f"decode eager: {TINY_TOKENS} tokens, V={TINY_V} D={TINY_D}",
    [
      Impl("raw_einsum", lambda: jnp.einsum("nd,vd->nv", h, w), f32),
      Impl("named_embed", lambda: ne_layer(hidden), to_numpy=unwrap),
      Impl(
        "flax linen (Module.apply)",
        lambda: module.apply(variables, h, method="attend"),
        to_numpy=f32,
      ),
      Impl("flax nnx (Embed.attend)", lambda: nnx_module.attend(h), f32),
      Impl("penzai", lambda: pz_layer(hidden), to_numpy=unwrap),
      Impl("jitted raw_einsum (floor)", jit_thunk(_einsum, h, w), f32),
    ],
    tol=1e-5,
  )


def _take_mean(w, ids):
  return jnp.take(w, ids, axis=0).mean(axis=1)


def _nnx_call(graphdef, state, ids):
  """An nnx module called under `jax.jit` as nnx's docs show it: rebuilt
  from its graph definition and state."""
  return nnx.merge(graphdef, state)(ids)


def _take(w, ids):
  return jnp.take(w, ids, axis=0)


def _einsum(h, w):
  return jnp.einsum("nd,vd->nv", h, w)


def dispatch_case(w, ids) -> Case:
  """Jitted tiny lookups: raw arrays vs library pytrees as arguments."""
  module, variables = flax_embed(w)
  tokens = named(ids, *TOKEN_AXES)
  unwrap = lambda out: out.unwrap(*TOKEN_AXES, "embedding")  # noqa: E731
  ne_data = lambda t, tok: ne.EmbeddingLookup(t)(tok).data_array  # noqa: E731
  ne_named = lambda t, tok: ne.EmbeddingLookup(t)(tok)  # noqa: E731
  pz_fn = lambda lay, tok: lay(tok)  # noqa: E731
  return Case(
    f"jit dispatch: {TINY_TOKENS} tokens, V={TINY_V} D={TINY_D}",
    [
      Impl("raw_take (2 arrays)", jit_thunk(_take, w, ids)),
      Impl(
        "named_embed -> data_array", jit_thunk(ne_data, ne_table(w), tokens)
      ),
      Impl(
        "named_embed -> NamedArray",
        jit_thunk(ne_named, ne_table(w), tokens),
        to_numpy=unwrap,
      ),
      Impl("flax linen (apply)", jit_thunk(module.apply, variables, ids)),
      Impl(
        "flax nnx (split/merge)",
        jit_thunk(_nnx_call, *nnx.split(nnx_embed(w)), ids),
      ),
      Impl(
        "penzai -> NamedArray",
        jit_thunk(pz_fn, pz.nn.EmbeddingLookup(pz_table(w)), tokens),
        to_numpy=unwrap,
      ),
    ],
  )


# -------------------------------------------------------------- compile


def compile_factories(w, ids) -> dict[str, tuple[Any, tuple]]:
  """``{impl: (make_fn, args)}``; ``make_fn()`` returns a *new* function
  (lookup then tied decode), so every `jax.jit` of it traces and compiles."""
  module, variables = flax_embed(w)
  tokens = named(ids, *TOKEN_AXES)
  table = pz_table(w)
  model = pz.nn.Sequential(
    [pz.nn.EmbeddingLookup(table), pz.nn.EmbeddingDecode(table)]
  )

  def raw():
    return lambda t, i: jnp.einsum("btd,vd->btv", jnp.take(t, i, axis=0), t)

  def named_embed():
    def fn(t, tok):
      embedded = ne.EmbeddingLookup(t)(tok)
      return ne.EmbeddingDecode(t)(embedded).data_array

    return fn

  def flax():
    def fn(p, i):
      return module.apply(p, module.apply(p, i), method="attend")

    return fn

  def penzai():
    return lambda m, tok: m(tok)

  return {
    "raw": (raw, (w, ids)),
    "named_embed": (named_embed, (ne_table(w), tokens)),
    "flax": (flax, (variables, ids)),
    "penzai": (penzai, (model, tokens)),
  }


def _compile_once(make_fn, args, split: bool) -> tuple[float, ...]:
  """(first call[, trace+lower, XLA compile]) seconds, on fresh functions."""
  jitted = jax.jit(make_fn())
  start = time.perf_counter()
  jax.block_until_ready(jitted(*args))
  first = time.perf_counter() - start
  if not split:
    return (first,)
  jitted = jax.jit(make_fn())
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  middle = time.perf_counter()
  lowered.compile()
  return first, middle - start, time.perf_counter() - middle


def run_compile(w, ids, rounds: int, split: bool) -> list[dict[str, Any]]:
  """Interleaved, rotated rounds of fresh compiles; rows per phase (the
  first call, and if ``split`` trace+lower and XLA compile separately)."""
  factories = compile_factories(w, ids)
  names = list(factories)
  for name in names:  # warm-up: library-internal caches, first lowering
    _compile_once(*factories[name], split)
  phases = ("first call (trace+compile)", "trace+lower", "XLA compile")
  phases = phases if split else phases[:1]
  times = {(p, n): [] for p in phases for n in names}
  for order in round_orders(names, rounds):
    for name in order:
      for phase, t in zip(phases, _compile_once(*factories[name], split)):
        times[phase, name].append(t)
  log(f"  compile: {rounds} rounds done")
  rows = []
  for phase in phases:
    case = Case(phase, [Impl(n, lambda: None) for n in names])
    rows += summarize(case, {n: times[phase, n] for n in names}, {})
  return rows


def run_blocks(
  case: Case, rounds: int, max_block: int, target: float = 2e-3
) -> list[dict[str, Any]]:
  """Like `run_case`, without cache flush, timing blocks of calls: each
  sample is ``min(max_block, target / t)`` calls, ``t`` one call's time."""
  log(f"  {case.name}: checking, then {rounds} rounds of <= {max_block} calls")
  diffs = check_case(case)
  thunks = {impl.name: impl.thunk for impl in case.impls}
  blocks = {}
  for name, thunk in thunks.items():
    start = time.perf_counter()
    jax.block_until_ready(thunk())
    once = time.perf_counter() - start
    blocks[name] = max(1, min(max_block, int(target / max(once, 1e-9))))
  times = time_rounds(thunks, rounds, False, blocks, warmup=True)
  rows = summarize(case, times, diffs)
  for row in rows:
    row["calls_per_sample"] = blocks[row["impl"]]
  return rows
