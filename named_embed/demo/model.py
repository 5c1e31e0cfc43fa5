"""The demo model: a tied-embedding character n-gram MLP, and its loss.

The loss runs every layer but the final `named_embed.EmbeddingDecode` and
hands that layer to `named_embed.decode_cross_entropy`, which never builds
the ``{"batch", "vocabulary"}`` logits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
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


def build_model(
  config: ModelConfig,
  seed: int | None = 0,
  vocabulary: ne.Vocabulary | None = None,
) -> pz.nn.Sequential:
  """Builds the tied-embedding n-gram MLP.

  Args:
    config: The sizes.
    seed: Seed of the parameter initialisation, or None for unfilled
      `pz.ParameterSlot` objects (bind values later, as in penzai).
    vocabulary: If given, attached to the table (`EmbeddingTable.
      with_vocabulary`): its ``config.vocab_size`` tokens label the rows,
      e.g. in `named_embed.show` and `named_embed.nearest`. It needs a
      seed: an unbound table has no rows to check it against.

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
  >>> vocab = ne.Vocabulary(["a", "b", "c", "d", "e"])
  >>> build_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                         hidden=6), 0, vocab).sublayers[
  ...     -1].table.vocabulary.token(2)
  'c'
  """
  key = None if seed is None else jax.random.key(seed)
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=key,
    vocab_size=config.vocab_size,
    embedding_axes={"embedding": config.embedding},
  ).with_vocabulary(vocabulary)
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
  config: ModelConfig,
  seed: int = DEFAULT_SEED,
  vocabulary: ne.Vocabulary | None = None,
) -> pz.nn.Sequential:
  """`build_model`, with all initialisers run in a single `jax.jit` call.

  Run eagerly, every initialiser op is compiled on its own; under `jax.jit`
  the initialisation is one XLA computation, which is ready sooner.

  Example:

  >>> import jax.numpy as jnp
  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> [p.label for p in pz.unbind_params(model)[1]]
  ['embed.embeddings', 'hidden/Linear.weights', 'hidden/AddBias.bias',
   'unembed.weights']
  >>> ids = pz.nx.wrap(jnp.array([[1, 2]])).tag("batch", "context")
  >>> model(ids).named_shape
  {'batch': 1, 'vocabulary': 5}
  """
  unbound, values = _initial_values(config, seed, vocabulary)
  return pz.bind_variables(unbound, values, unfreeze_as_copy=True)


@functools.partial(
  jax.jit,
  static_argnames=("config", "seed", "vocabulary"),
  compiler_options=FAST_COMPILE,
)
def _initial_values(
  config: ModelConfig, seed: int, vocabulary: ne.Vocabulary | None
):
  return pz.unbind_params(build_model(config, seed, vocabulary), freeze=True)


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


def model_loss(
  model: pz.nn.Sequential,
  tokens: pz.nx.NamedArray,
  targets: pz.nx.NamedArray,
) -> jax.Array:
  """Mean cross-entropy of the model's next-token predictions, fused.

  Runs every layer but the last (the `named_embed.EmbeddingDecode`) to get
  the hidden state ``{"batch", "embedding"}``, then calls
  `named_embed.decode_cross_entropy` with the decode layer: the loss (and
  its gradient, for both uses of the tied table) without materialising the
  ``{"batch", "vocabulary"}`` logits.

  Args:
    model: From `build_model` (bound, or with frozen values).
    tokens: Integer ids ``{"batch", "context"}``.
    targets: The next token of each window, ``{"batch"}``.

  Returns:
    A float scalar, in nats.

  Example (equal to the loss of the full logits):

  >>> import jax.numpy as jnp
  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> tokens = pz.nx.wrap(jnp.array([[1, 2], [3, 4]])).tag("batch", "context")
  >>> targets = pz.nx.wrap(jnp.array([0, 3])).tag("batch")
  >>> fused = model_loss(model, tokens, targets)
  >>> logits = model(tokens).unwrap("batch", "vocabulary")
  >>> full = -jax.nn.log_softmax(logits)[jnp.arange(2), jnp.array([0, 3])]
  >>> bool(jnp.isclose(fused, full.mean(), rtol=1e-5))
  True
  """
  *trunk, decode = model.sublayers
  hidden = pz.nn.Sequential(trunk)(tokens)
  return ne.decode_cross_entropy(decode, hidden, targets)
