"""Side-by-side implementations (raw JAX, named_embed, flax, penzai).

Every builder takes the same raw inputs and returns `Impl`s whose thunks
call a `jax.jit`-compiled function with the library's own pytrees as
arguments (the table is never closed over as a constant). Outputs are
converted to the raw layout only in ``to_numpy``, outside the timed call.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _harness import Impl
from flax import nnx
from penzai import pz

import named_embed as ne

TOKEN_AXES = ("batch", "seq")
TABLE_AXES = ("vocabulary", "embedding")


def jit_thunk(fn, *args):
  """A thunk calling a fresh ``jax.jit(fn)`` on ``args``."""
  jitted = jax.jit(fn)
  return lambda: jitted(*args)


def f32(x) -> np.ndarray:
  return np.asarray(x).astype(np.float32)


def first_id(ids) -> int:
  """The first token id: a padding index that does occur in ``ids``."""
  return int(np.asarray(ids).reshape(-1)[0])


# ----------------------------------------------------- library wrappers


def ne_table(w, trainable=False, **kwargs) -> ne.EmbeddingTable:
  """A frozen table, or a trainable one with `pz.ParameterValue` leaves."""
  table = ne.EmbeddingTable.from_pretrained(w, freeze=not trainable, **kwargs)
  return pz.freeze_params(table) if trainable else table


def pz_table(w) -> pz.nn.EmbeddingTable:
  value = pz.nx.wrap(w).tag(*TABLE_AXES)
  return pz.nn.EmbeddingTable(
    embeddings=pz.ParameterValue(value=value, label="embed.embeddings"),
    vocabulary_axis="vocabulary",
  )


def flax_embed(w):
  """``(module, variables)`` of a flax linen ``nn.Embed`` holding ``w``."""
  module = nn.Embed(w.shape[0], w.shape[1], dtype=w.dtype, param_dtype=w.dtype)
  return module, {"params": {"embedding": w}}


def nnx_embed(w):
  """A flax nnx ``nnx.Embed`` holding ``w`` (called eagerly, it is a plain
  function of its own state: no ``apply``)."""
  module = nnx.Embed(
    w.shape[0], w.shape[1], dtype=w.dtype, param_dtype=w.dtype,
    rngs=nnx.Rngs(0),
  )  # fmt: skip
  module.embedding.value = w
  return module


KINDS = ("float", "int8", "int4", "lora", "trainable_rows")
"""The kinds of named_embed table the eager section times."""


def ne_kind(w, kind: str):
  """A frozen table of ``w`` of ``kind`` (LoRA of rank 4 with a non-zero
  ``A``; rows 0-7 trainable), and its rows as read (numpy)."""
  base = ne_table(w)
  if kind == "float":
    table = base
  elif kind == "int8":
    table = base.quantized("int8")
  elif kind == "int4":
    table = base.quantized("int4", group_size=8)
  elif kind == "trainable_rows":
    table = base.with_trainable_rows(list(range(8)), name="r")
  else:
    table = base.with_lora(4, 4.0, name="e", init_base_rng=jax.random.key(0))
    a = np.random.default_rng(3).normal(size=(w.shape[0], 4)) / 8
    table.lora_a.value = named(jnp.asarray(a, w.dtype), "vocabulary", "rank")
  table = pz.freeze_params(table)
  if isinstance(table, ne.EmbeddingTable):
    rows = table.rows_array()
  else:
    rows = getattr(table, "merged", None) or table.dequantized
    rows = rows().rows_array()
  return table, np.asarray(rows, np.float32)


def named(x, *axes) -> pz.nx.NamedArray:
  return pz.nx.wrap(x).tag(*axes)


# --------------------------------------------------------------- lookup


def _ne_lookup_fn(**options):
  def fn(table, tokens):
    return ne.EmbeddingLookup(table, **options)(tokens).data_array

  return fn


def _renormed(rows, max_norm):
  rows = f32(rows)
  norms = np.linalg.norm(rows, axis=-1, keepdims=True)
  scale = np.where(norms > max_norm, max_norm / (norms + 1e-7), 1.0)
  return rows * scale


def raw_lookup_impls(w, ids) -> list[Impl]:
  return [
    Impl("raw_take", jit_thunk(lambda t, i: jnp.take(t, i, axis=0), w, ids)),
    Impl(
      "raw_at_get_pib",
      jit_thunk(lambda t, i: t.at[i].get(mode="promise_in_bounds"), w, ids),
    ),
    Impl("raw_take_AA", jit_thunk(lambda t, i: jnp.take(t, i, axis=0), w, ids)),
  ]


def ne_lookup_impls(w, ids, max_norm=1.0) -> list[Impl]:
  """named_embed: default, multi-axis table, padding, max_norm, freq."""
  v, d = w.shape
  tokens = named(ids, *TOKEN_AXES)
  table = ne_table(w)
  w3 = jnp.asarray(np.asarray(w).reshape(v, 8, d // 8))  # no eager jnp op
  heads = ne_table(w3, embedding_axes=("heads", "hd"))
  padded = ne_table(w, padding_index=first_id(ids))
  flat = lambda out: f32(out).reshape(*ids.shape, d)  # noqa: E731
  return [
    Impl("named_embed", jit_thunk(_ne_lookup_fn(), table, tokens)),
    Impl(
      "ne_multi_axis",
      jit_thunk(_ne_lookup_fn(), heads, tokens),
      to_numpy=flat,
    ),
    Impl("ne_padding_index", jit_thunk(_ne_lookup_fn(), padded, tokens)),
    Impl(
      "ne_max_norm",
      jit_thunk(_ne_lookup_fn(max_norm=max_norm), table, tokens),
      to_numpy=f32,
      expected=lambda rows: _renormed(rows, max_norm),
    ),
    Impl(
      "ne_scale_grad_freq",
      jit_thunk(_ne_lookup_fn(scale_grad_by_freq=True), table, tokens),
    ),
  ]


def other_lookup_impls(w, ids) -> list[Impl]:
  """flax ``nn.Embed.apply`` and penzai ``EmbeddingLookup``."""
  module, variables = flax_embed(w)
  layer = pz.nn.EmbeddingLookup(pz_table(w))
  tokens = named(ids, *TOKEN_AXES)
  return [
    Impl("flax", jit_thunk(module.apply, variables, ids)),
    Impl(
      "penzai",
      jit_thunk(lambda lay, tok: lay(tok), layer, tokens),
      to_numpy=lambda out: out.unwrap(*TOKEN_AXES, "embedding"),
    ),
  ]


def lookup_impls(w, ids) -> list[Impl]:
  return [
    *raw_lookup_impls(w, ids),
    *ne_lookup_impls(w, ids),
    *other_lookup_impls(w, ids),
  ]


# ------------------------------------------------------- lookup gradient


def _raw_grad(w, ids, cot):
  return jnp.take(w, ids, axis=0) * cot


def _grad_fn(forward):
  """``jax.grad`` w.r.t. the first argument of ``sum(forward(...))``."""
  return jax.grad(lambda *args: jnp.sum(forward(*args)))


def _ne_grad_forward(**options):
  def forward(table, tokens, cot):
    return ne.EmbeddingLookup(table, **options)(tokens).data_array * cot

  return forward


def _ne_grad_rows(grads) -> np.ndarray:
  return f32(grads.embeddings.value.unwrap(*TABLE_AXES))


def _freq_scaled_grad(vocab_size, ids, cot) -> np.ndarray:
  """The torch ``scale_grad_by_freq`` gradient, in numpy float32."""
  ids = np.asarray(ids).reshape(-1)
  cot = f32(cot).reshape(ids.size, -1)
  counts = np.bincount(ids, minlength=vocab_size).astype(np.float32)
  grad = np.zeros((vocab_size, cot.shape[1]), np.float32)
  np.add.at(grad, ids, cot / counts[ids][:, None])
  return grad


def _zero_row(grad, row) -> np.ndarray:
  grad = np.array(grad)
  grad[row] = 0
  return grad


def ne_grad_impls(w, ids, cot) -> list[Impl]:
  """named_embed on a trainable table: default, padding_index, freq."""
  tokens = named(ids, *TOKEN_AXES)
  pad = first_id(ids)
  return [
    Impl(
      "named_embed",
      jit_thunk(_grad_fn(_ne_grad_forward()), ne_table(w, True), tokens, cot),
      to_numpy=_ne_grad_rows,
    ),
    Impl(
      "ne_padding_index",
      jit_thunk(
        _grad_fn(_ne_grad_forward()),
        ne_table(w, True, padding_index=pad),
        tokens,
        cot,
      ),
      to_numpy=_ne_grad_rows,
      expected=lambda raw_grad: _zero_row(raw_grad, pad),
    ),
    Impl(
      "ne_scale_grad_freq",
      jit_thunk(
        _grad_fn(_ne_grad_forward(scale_grad_by_freq=True)),
        ne_table(w, True),
        tokens,
        cot,
      ),
      to_numpy=_ne_grad_rows,
      expected=lambda _: _freq_scaled_grad(w.shape[0], ids, cot),
    ),
  ]


def grad_impls(w, ids, cot) -> list[Impl]:
  """Gradient of ``sum(lookup * cot)`` w.r.t. the table, every library."""
  module, variables = flax_embed(w)
  layer = pz.nn.EmbeddingLookup(pz_table(w))
  tokens = named(ids, *TOKEN_AXES)
  cot_named = named(cot, *TOKEN_AXES, "embedding")
  flax_forward = lambda p, i, c: module.apply(p, i) * c  # noqa: E731
  pz_forward = lambda lay, tok, c: (lay(tok) * c).data_array  # noqa: E731
  return [
    Impl("raw_take", jit_thunk(_grad_fn(_raw_grad), w, ids, cot)),
    Impl("raw_take_AA", jit_thunk(_grad_fn(_raw_grad), w, ids, cot)),
    *ne_grad_impls(w, ids, cot),
    Impl(
      "flax",
      jit_thunk(_grad_fn(flax_forward), variables, ids, cot),
      to_numpy=lambda g: f32(g["params"]["embedding"]),
    ),
    Impl(
      "penzai",
      jit_thunk(_grad_fn(pz_forward), layer, tokens, cot_named),
      to_numpy=lambda g: f32(g.table.embeddings.value.unwrap(*TABLE_AXES)),
    ),
  ]


# --------------------------------------------------------------- decode


def decode_impls(h, w) -> list[Impl]:
  """hidden ``[N, D]`` x table ``[V, D]`` -> logits ``[N, V]``."""
  module, variables = flax_embed(w)
  hidden = named(h, "tokens", "embedding")
  ne_fn = lambda table, x: ne.decode(table, x).data_array  # noqa: E731
  flax_fn = lambda p, x: module.apply(p, x, method="attend")  # noqa: E731
  return [
    Impl(
      "raw_einsum",
      jit_thunk(lambda x, t: jnp.einsum("nd,vd->nv", x, t), h, w),
      to_numpy=f32,
    ),
    Impl("named_embed", jit_thunk(ne_fn, ne_table(w), hidden), to_numpy=f32),
    Impl("flax", jit_thunk(flax_fn, variables, h), to_numpy=f32),
    Impl(
      "penzai",
      jit_thunk(
        lambda lay, x: lay(x), pz.nn.EmbeddingDecode(pz_table(w)), hidden
      ),
      to_numpy=lambda out: f32(out.unwrap("tokens", "vocabulary")),
    ),
  ]


# ----------------------------------------------------------- fused loss


def _naive_loss(h, w, targets):
  logits = jnp.einsum("nd,vd->nv", h, w)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=1))


def _ne_loss(table, hidden, targets):
  return ne.decode_cross_entropy(table, hidden, targets)


def loss_functions(h, w, targets):
  """``{name: (value_and_grad function, args, to_numpy)}``, naive first."""
  naive = jax.value_and_grad(_naive_loss, argnums=(0, 1))
  fused = jax.value_and_grad(_ne_loss, argnums=(0, 1))
  naive_np = lambda out: (out[0], out[1][0], out[1][1])  # noqa: E731

  def fused_np(out):
    loss, (table_grad, hidden_grad) = out
    return (
      loss,
      hidden_grad.unwrap("tokens", "embedding"),
      _ne_grad_rows(table_grad),
    )

  fused_args = (
    ne_table(w, True),
    named(h, "tokens", "embedding"),
    named(targets, "tokens"),
  )
  return {
    "naive_log_softmax": (naive, (h, w, targets), naive_np),
    "named_embed": (fused, fused_args, fused_np),
  }


def compile_with_temp(fn, args):
  """``(thunk, temp bytes)`` of ``jax.jit(fn)`` compiled ahead of time for
  ``args``: the memory is known without running, the thunk runs the same
  executable."""
  compiled = jax.jit(fn).lower(*args).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  return (lambda: compiled(*args)), temp


# ------------------------------------------------------------ references


_memcpy = {}


def memcpy_ref(mib: int = 256) -> Impl:
  """numpy copy of ``mib`` MiB into a pre-faulted buffer (1 thread)."""
  if mib not in _memcpy:
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.zeros_like(src)
    _memcpy[mib] = (src, dst)
  src, dst = _memcpy[mib]
  return Impl(
    f"numpy memcpy {mib} MiB",
    lambda: np.copyto(dst, src),
    reference=True,
    work=float(src.nbytes),
  )


def matmul_ref(size: int, dtype) -> Impl:
  """Square ``jnp.dot`` of ``size`` in ``dtype`` (2 size^3 FLOPs)."""
  rng = np.random.default_rng(1)
  a, b = (
    jnp.asarray(rng.standard_normal((size, size), np.float32).astype(dtype))
    for _ in range(2)
  )
  return Impl(
    f"jnp.dot {size}^3 {jnp.dtype(dtype).name}",
    jit_thunk(jnp.dot, a, b),
    reference=True,
    work=2.0 * size**3,
  )
