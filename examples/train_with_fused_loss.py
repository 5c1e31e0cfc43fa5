"""Train a small tied-embedding model with `ne.decode_cross_entropy`.

The data follow a deterministic next-token rule over a vocabulary of 512
tokens: token ``x`` (in ``1..511``) is always followed by
``1 + (5 * x + 3) % 511``. Sequences have random starts and random lengths;
the tail of a short sequence is padded with token 0 as input and ``-100``
as target (torch's ``ignore_index`` convention), and the loss leaves those
positions out with ``where=targets != -100``.

The model is a penzai ``Sequential``: an `EmbeddingLookup`, a residual MLP,
and an `EmbeddingDecode` of the *same* table (tied weights, one parameter).
The loss runs every layer but the last, then hands the decode layer to
`ne.decode_cross_entropy`, which computes the softmax cross-entropy without
building the ``[tokens, vocabulary]`` logits. Training is penzai's way with
optax: `pz.unbind_params` splits the model into its structure and its
parameter values, `jax.value_and_grad` differentiates the loss with respect
to the values, and ``optax.adam`` updates them.

The script prints the loss as it falls and, at the end, the next-token
accuracy on a fresh batch. Run it from the repository root::

  python examples/train_with_fused_loss.py              # 200 steps
  python examples/train_with_fused_loss.py --steps 50 --seed 1
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from penzai import pz

import named_embed as ne

VOCAB = 512  # token 0 is padding; tokens 1..511 follow the rule
EMBED = 64
MLP = 256
BATCH = 32
SEQ = 16
IGNORE = -100  # target of padded positions, as torch's ignore_index
LEARNING_RATE = 1e-3


def next_token(tokens: np.ndarray) -> np.ndarray:
  """The rule the model has to learn: a fixed permutation of 1..V-1."""
  return 1 + (5 * tokens + 3) % (VOCAB - 1)


def make_batch(
  rng: np.random.Generator,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
  """Input ids and targets, both ``{"batch": BATCH, "seq": SEQ}``."""
  chain = np.empty((BATCH, SEQ + 1), np.int32)
  chain[:, 0] = rng.integers(1, VOCAB, BATCH)
  for position in range(SEQ):
    chain[:, position + 1] = next_token(chain[:, position])
  lengths = rng.integers(SEQ // 2, SEQ + 1, (BATCH, 1))
  real = np.arange(SEQ)[None, :] < lengths
  inputs = np.where(real, chain[:, :-1], 0)
  targets = np.where(real, chain[:, 1:], IGNORE)
  return (
    pz.nx.wrap(jnp.asarray(inputs, jnp.int32)).tag("batch", "seq"),
    pz.nx.wrap(jnp.asarray(targets, jnp.int32)).tag("batch", "seq"),
  )


def build_model(key: jax.Array) -> pz.nn.Sequential:
  """Lookup, residual MLP, decode; the lookup and the decode share a table."""
  table_key, mlp_key = jax.random.split(key)
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=table_key,
    vocab_size=VOCAB,
    embedding_axes={"embedding": EMBED},
    padding_index=0,
  )
  mlp = pz.nn.Sequential(
    [
      pz.nn.Linear.from_config(
        name="mlp_in",
        init_base_rng=mlp_key,
        input_axes={"embedding": EMBED},
        output_axes={"mlp": MLP},
      ),
      pz.nn.Elementwise(jax.nn.gelu),
      pz.nn.Linear.from_config(
        name="mlp_out",
        init_base_rng=mlp_key,
        input_axes={"mlp": MLP},
        output_axes={"embedding": EMBED},
      ),
    ]
  )
  return pz.nn.Sequential(
    [ne.EmbeddingLookup(table), pz.nn.Residual(mlp), ne.EmbeddingDecode(table)]
  )


def _count(mask: pz.nx.NamedArray) -> jax.Array:
  """Number of True entries of a ``{"batch", "seq"}`` mask, as a float."""
  return jnp.sum(mask.unwrap("batch", "seq"), dtype=jnp.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="training steps")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be at least 1")

  rng = np.random.default_rng(args.seed)
  model = build_model(jax.random.key(args.seed))
  model_def, values = pz.unbind_params(model, freeze=True)
  print(
    f"{len(values)} parameters ({', '.join(v.label for v in values)});"
    f" the table is tied: {VOCAB} tokens x {EMBED} dims"
  )

  def loss_fn(values, inputs, targets):
    *trunk, decode = pz.bind_variables(model_def, values).sublayers
    hidden = pz.nn.Sequential(trunk)(inputs)
    return ne.decode_cross_entropy(
      decode, hidden, targets, where=targets != IGNORE
    )

  optimizer = optax.adam(LEARNING_RATE)

  @jax.jit
  def train_step(values, state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(values, inputs, targets)
    # optax mixes Python floats with its int32 step count, which JAX's
    # strict dtype promotion (if you enable it) rejects.
    with jax.numpy_dtype_promotion("standard"):
      updates, state = optimizer.update(grads, state, values)
    return optax.apply_updates(values, updates), state, loss

  @jax.jit
  def accuracy(values, inputs, targets):
    logits = pz.bind_variables(model_def, values)(inputs)
    predicted = pz.nx.nmap(jnp.argmax)(logits.untag("vocabulary"))
    real = targets != IGNORE
    hits = (predicted == targets) & real
    return _count(hits) / _count(real)

  state = jax.jit(optimizer.init)(values)  # one compile for all parameters
  log_every = max(1, args.steps // 10)
  first = final = None
  started = time.perf_counter()
  for step in range(args.steps):
    inputs, targets = make_batch(rng)
    values, state, loss = train_step(values, state, inputs, targets)
    loss = float(loss)
    first = loss if first is None else first
    final = loss
    if step % log_every == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {loss:.4f}")
  seconds = time.perf_counter() - started
  print(f"first loss {first:.4f}, final loss {final:.4f} ({seconds:.1f} s)")
  fresh = accuracy(values, *make_batch(rng))
  print(f"next-token accuracy on a fresh batch: {float(fresh):.1%}")


if __name__ == "__main__":
  main()
