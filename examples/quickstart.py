"""named_embed in one screen: build a table, look up, decode, tie, train.

Shows the three objects of named_embed on a toy vocabulary of 32 tokens:

1. an `EmbeddingTable` built from hyperparameters (`from_config`);
2. `EmbeddingLookup`, which turns named token ids into vectors, and
   `EmbeddingDecode`, which turns vectors into vocabulary logits;
3. weight tying (both layers share the table, so the model holds one
   parameter) and one step of plain `jax.grad` on the parameter values,
   with the loss computed by `ne.decode_cross_entropy`.

Run it from the repository root (it takes a few seconds, mostly imports)::

  python examples/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

import named_embed as ne


def main() -> None:
  # 1. A trainable table: 32 tokens, 16 embedding dimensions, row 0 padding.
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=jax.random.key(0),
    vocab_size=32,
    embedding_axes={"embedding": 16},
    padding_index=0,
  )
  print("table:", table.value.named_shape, table.dtype)

  # 2. Look up named token ids, and decode vectors into logits.
  tokens = pz.nx.wrap(jnp.array([[5, 9, 2, 0], [7, 7, 1, 0]])).tag(
    "batch", "seq"
  )
  vectors = ne.EmbeddingLookup(table)(tokens)
  print("lookup:", vectors.named_shape)
  logits = ne.EmbeddingDecode(table)(vectors)
  print("decode:", logits.named_shape)

  # 3. Tie: the same table in both layers gives a model with one parameter.
  model = pz.nn.Sequential(
    [ne.EmbeddingLookup(table), ne.EmbeddingDecode(table)]
  )
  model_def, values = pz.unbind_params(model, freeze=True)
  print("parameters:", [value.label for value in values])

  # One gradient step on the values: predict the next token of each row.
  targets = pz.nx.wrap(jnp.array([[9, 2, 3, 3], [7, 1, 4, 4]])).tag(
    "batch", "seq"
  )
  keep = tokens != 0  # no loss where the input is the padding token

  def loss_fn(values):
    lookup, decode = pz.bind_variables(model_def, values).sublayers
    return ne.decode_cross_entropy(decode, lookup(tokens), targets, where=keep)

  loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = loss_and_grads(values)
  print(f"loss before the step: {float(loss):.4f}")
  values = jax.tree.map(lambda v, g: v - 0.5 * g, values, grads)
  loss, _ = loss_and_grads(values)
  print(f"loss after the step:  {float(loss):.4f}")


if __name__ == "__main__":
  main()
