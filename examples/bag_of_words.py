"""Train a bag-of-words topic classifier with `ne.EmbeddingBag` and optax.

The data are synthetic documents over a vocabulary of 1000 words (word 0
is padding). Each of four topics owns 25 words; a document mixes words of
its topic with words common to every topic, has 4 to 40 words, and is
padded with word 0 to 40. The model is a penzai ``Sequential``: an
`EmbeddingBag` that averages the word vectors of each document over the
``"word"`` axis (padding skipped, so a document's length does not matter)
and a `pz.nn.Linear` from the embedding to the four topics. The member
rows ``[batch, word, embedding]`` are never built, in either direction.

Training is penzai's way with optax: `pz.unbind_params` splits the model
into its structure and its parameter values, `jax.value_and_grad`
differentiates the softmax cross-entropy, ``optax.adam`` updates. At the
end the script classifies a fresh test set twice, from the padded batch
and from the same documents as flat word ids with offsets (torch's ragged
layout, `ne.pooled_lookup(..., offsets=...)`), and checks that both give
the same predictions. Run it from the repository root::

  python examples/bag_of_words.py                  # 300 steps
  python examples/bag_of_words.py --steps 60 --seed 1
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

VOCAB = 1000  # word 0 is padding
TOPICS = 4
TOPIC_WORDS = 25  # words 1..100 belong to a topic, the rest are common
MAX_WORDS = 40
EMBED = 32
LEARNING_RATE = 3e-2


def make_documents(rng: np.random.Generator, count: int):
  """``(words [count, MAX_WORDS] padded with 0, lengths, topics)``."""
  topics = rng.integers(0, TOPICS, count)
  lengths = rng.integers(4, MAX_WORDS + 1, count)
  first = 1 + topics[:, None] * TOPIC_WORDS
  own = first + rng.integers(0, TOPIC_WORDS, (count, MAX_WORDS))
  common = rng.integers(1 + TOPICS * TOPIC_WORDS, VOCAB, (count, MAX_WORDS))
  words = np.where(rng.random((count, MAX_WORDS)) < 0.3, own, common)
  words = np.where(np.arange(MAX_WORDS) < lengths[:, None], words, 0)
  return words.astype(np.int32), lengths, topics.astype(np.int32)


def build_model(key: jax.Array) -> pz.nn.Sequential:
  """Mean of the word vectors, then a linear layer to the topics."""
  table_key, linear_key = jax.random.split(key)
  table = ne.EmbeddingTable.from_config(
    name="words",
    init_base_rng=table_key,
    vocab_size=VOCAB,
    embedding_axes={"embedding": EMBED},
    padding_index=0,
  )
  return pz.nn.Sequential(
    [
      ne.EmbeddingBag(table, over="word", mode="mean"),
      pz.nn.Linear.from_config(
        name="classify",
        init_base_rng=linear_key,
        input_axes={"embedding": EMBED},
        output_axes={"topic": TOPICS},
      ),
    ]
  )


def named_batch(words: np.ndarray, topics: np.ndarray):
  return (
    pz.nx.wrap(jnp.asarray(words)).tag("doc", "word"),
    pz.nx.wrap(jnp.asarray(topics)).tag("doc"),
  )


def cross_entropy(logits: pz.nx.NamedArray, topics: pz.nx.NamedArray):
  log_probs = pz.nx.nmap(jax.nn.log_softmax)(logits.untag("topic"))
  picked = pz.nx.nmap(lambda lp, t: lp[t])(log_probs, topics)
  return -jnp.mean(picked.unwrap("doc"))


def ragged_predictions(model, words, lengths) -> np.ndarray:
  """The same classifier on flat word ids and offsets (no padding)."""
  bag, linear = model.sublayers
  flat = np.concatenate([w[:n] for w, n in zip(words, lengths)])
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  pooled = ne.pooled_lookup(
    bag.table, flat, offsets=offsets, mode="mean", bag_axis="doc"
  )
  logits = linear(pooled)
  return np.asarray(logits.unwrap("doc", "topic").argmax(axis=-1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="training steps")
  parser.add_argument("--batch", type=int, default=64, help="documents/step")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  args = parser.parse_args()
  if args.steps < 1 or args.batch < 1:
    parser.error("--steps and --batch must be at least 1")

  rng = np.random.default_rng(args.seed)
  model = build_model(jax.random.key(args.seed))
  model_def, values = pz.unbind_params(model, freeze=True)
  print(f"{len(values)} parameters: {', '.join(v.label for v in values)}")

  def loss_fn(values, words, topics):
    return cross_entropy(pz.bind_variables(model_def, values)(words), topics)

  optimizer = optax.adam(LEARNING_RATE)

  @jax.jit
  def train_step(values, state, words, topics):
    loss, grads = jax.value_and_grad(loss_fn)(values, words, topics)
    # optax mixes Python floats with its int32 step count, which JAX's
    # strict dtype promotion (if you enable it) rejects.
    with jax.numpy_dtype_promotion("standard"):
      updates, state = optimizer.update(grads, state, values)
    return optax.apply_updates(values, updates), state, loss

  state = jax.jit(optimizer.init)(values)
  log_every = max(1, args.steps // 6)
  started = time.perf_counter()
  for step in range(args.steps):
    words, _, topics = make_documents(rng, args.batch)
    values, state, loss = train_step(values, state, *named_batch(words, topics))
    if step % log_every == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")
  print(f"trained in {time.perf_counter() - started:.1f} s")

  model = pz.bind_variables(model_def, values)
  words, lengths, topics = make_documents(rng, 500)
  logits = jax.jit(lambda m, w: m(w))(model, named_batch(words, topics)[0])
  padded = np.asarray(logits.unwrap("doc", "topic").argmax(axis=-1))
  ragged = ragged_predictions(model, words, lengths)
  print(
    f"test accuracy on 500 fresh documents: {np.mean(padded == topics):.1%}"
  )
  same = bool(np.all(padded == ragged))
  print(f"padded and ragged (offsets) bags agree: {same}")
  if not same:
    raise SystemExit("the padded and the ragged forms disagree")


if __name__ == "__main__":
  main()
