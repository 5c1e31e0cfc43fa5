"""The demo model: a tied-embedding character n-gram MLP, and its loss."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from penzai import pz

import named_embed as ne
from named_embed.demo.settings import DEFAULT_SEED, FAST_COMPILE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes of the demo model.

  Example:

  >>> ModelConfig(vocab_size=56)
  ModelConfig(vocab_size=56, context=8, embedding=32, hidden=256)

  Attributes:
    vocab_size: Number of tokens.
    context: Number of previous characters the model sees.
    embedding: Size of the ``"embedding"`` axis of the tied table.
    hidden: Size of the ``"hidden"`` axis of the MLP.
  """

  vocab_size: int
  context: int = 8
  embedding: int = 32
  hidden: int = 256


def build_model(config: ModelConfig, seed: int | None = 0) -> pz.nn.Sequential:
  """Builds the tied-embedding n-gram MLP.

  Args:
    config: The sizes.
    seed: Seed of the parameter initialisation, or None for unfilled
      `pz.ParameterSlot` objects (bind values later, as in penzai).

  Returns:
    A `pz.nn.Sequential` taking tokens ``{"batch", "context"}`` to logits
    ``{"batch", "vocabulary"}``, whose first and last layers share one
    `named_embed.EmbeddingTable`. Running the initialisers eagerly compiles
    each op on its own; `init_model` runs them in one `jax.jit` call.

  Example:

  >>> model = build_model(ModelConfig(vocab_size=5), seed=None)  # no arrays
  >>> [type(layer).__name__ for layer in model.sublayers]
  ['EmbeddingLookup', 'Affine', 'Elementwise', 'Linear', 'EmbeddingDecode']
  >>> model.sublayers[0].table is model.sublayers[-1].table  # tied
  True
  """
  key = None if seed is None else jax.random.key(seed)
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=key,
    vocab_size=config.vocab_size,
    embedding_axes={"embedding": config.embedding},
  )
  return pz.nn.Sequential(
    [
      ne.EmbeddingLookup(table),
      pz.nn.Affine.from_config(
        name="hidden",
        init_base_rng=key,
        input_axes={"context": config.context, "embedding": config.embedding},
        output_axes={"hidden": config.hidden},
      ),
      pz.nn.Elementwise(jax.nn.gelu),
      pz.nn.Linear.from_config(
        name="unembed",
        init_base_rng=key,
        input_axes={"hidden": config.hidden},
        output_axes={"embedding": config.embedding},
      ),
      ne.EmbeddingDecode(table),
    ]
  )


def init_model(
  config: ModelConfig, seed: int = DEFAULT_SEED
) -> pz.nn.Sequential:
  """`build_model`, with all initialisers run in a single `jax.jit` call.

  Run eagerly, every initialiser op is compiled on its own; under `jax.jit`
  the initialisation is one XLA computation, which is ready sooner.

  Example:

  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> [p.label for p in pz.unbind_params(model)[1]]
  ['embed.embeddings', 'hidden/Linear.weights', 'hidden/AddBias.bias',
   'unembed.weights']
  >>> ids = pz.nx.wrap(jnp.array([[1, 2]])).tag("batch", "context")
  >>> model(ids).named_shape
  {'batch': 1, 'vocabulary': 5}
  """
  unbound, values = _initial_values(config, seed)
  return pz.bind_variables(unbound, values, unfreeze_as_copy=True)


@functools.partial(
  jax.jit, static_argnames=("config", "seed"), compiler_options=FAST_COMPILE
)
def _initial_values(config: ModelConfig, seed: int):
  return pz.unbind_params(build_model(config, seed), freeze=True)


def embedding_table(model: pz.nn.Sequential) -> ne.EmbeddingTable:
  """The table of the model's `EmbeddingLookup` (the tied table).

  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> embedding_table(model).value.named_shape
  {'vocabulary': 5, 'embedding': 4}
  """
  for layer in model.sublayers:
    if isinstance(layer, ne.EmbeddingLookup):
      return layer.table
  raise ValueError("the model has no EmbeddingLookup layer")


def cross_entropy(
  logits: pz.nx.NamedArray, targets: pz.nx.NamedArray
) -> jax.Array:
  """Mean cross-entropy of ``{..., "vocabulary"}`` logits against token ids.

  Args:
    logits: Logits with a ``"vocabulary"`` axis and named batch axes.
    targets: Integer ids with the batch axes of ``logits``.

  Returns:
    A float scalar, in nats.

  Example:

  >>> logits = pz.nx.wrap(jnp.zeros((2, 4))).tag("batch", "vocabulary")
  >>> targets = pz.nx.wrap(jnp.array([0, 3])).tag("batch")
  >>> round(float(jax.jit(cross_entropy)(logits, targets)), 4)  # log(4)
  1.3863
  """
  per_token = pz.nx.nmap(lambda row, t: jax.nn.logsumexp(row) - row[t])(
    logits.untag("vocabulary"), targets
  )
  return jnp.mean(per_token.unwrap(*per_token.named_shape))
