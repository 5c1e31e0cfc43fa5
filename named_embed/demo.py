"""The ``python -m named_embed`` demo: a tiny tied-embedding language model.

A character-level n-gram model in the style of Bengio et al. (2003), written
with penzai layers and named axes::

  tokens {"batch", "context"}
    -> EmbeddingLookup(table)           {"batch", "context", "embedding"}
    -> Affine(context x embedding -> hidden), gelu
    -> Linear(hidden -> embedding)      {"batch", "embedding"}
    -> EmbeddingDecode(table)           {"batch", "vocabulary"}

The lookup and the decode share one `EmbeddingTable`, so the model holds a
single embedding parameter (tied weights). It trains on a few fables shipped
in ``named_embed/data`` with a hand-written Adam, prints the loss as it
falls and a sample of generated text, and writes an HTML page showing the
trained table with treescope. Runtime dependencies are those of the
package: jax, penzai, treescope and numpy.

Example (from a shell)::

  python -m named_embed --steps 300 --output named_embed_demo.html
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.resources
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import treescope
from penzai import pz

import named_embed as ne

DEFAULT_STEPS = 300
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-2
DEFAULT_OUTPUT = "named_embed_demo.html"
DEFAULT_PROMPT = "Once upon a time"
EVAL_WINDOWS = 512
SAMPLE_LENGTH = 80
SAMPLE_TEMPERATURE = 0.6

# ---------------------------------------------------------------------- data


def load_text(name: str = "fables.txt") -> str:
  """Loads a text shipped in ``named_embed/data``, whitespace collapsed.

  Runs of spaces and newlines become single spaces, so the text is one long
  line of characters.

  Args:
    name: File name inside ``named_embed/data``.

  Returns:
    The text.

  Example:

  >>> text = load_text()
  >>> text[:24], len(text) > 20_000, "\\n" in text
  ('The Fox and the Well Onc', True, False)
  """
  resource = importlib.resources.files("named_embed") / "data" / name
  return " ".join(resource.read_text(encoding="utf-8").split())


@dataclasses.dataclass(frozen=True)
class CharVocabulary:
  """A character vocabulary: token id ``i`` is ``chars[i]``.

  Example:

  >>> vocab = CharVocabulary.from_text("abba cab")
  >>> vocab.chars, len(vocab)
  ((' ', 'a', 'b', 'c'), 4)
  >>> vocab.encode("cab").tolist()
  [3, 1, 2]
  >>> vocab.decode([2, 1, 0, 3])
  'ba c'
  >>> vocab.labels()
  ['␣', 'a', 'b', 'c']

  Attributes:
    chars: The distinct characters, sorted.
  """

  chars: tuple[str, ...]

  @classmethod
  def from_text(cls, text: str) -> CharVocabulary:
    """The sorted distinct characters of ``text``.

    >>> CharVocabulary.from_text("hello").chars
    ('e', 'h', 'l', 'o')
    """
    return cls(tuple(sorted(set(text))))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of ``text`` as an int32 array.

    Raises:
      ValueError: if ``text`` holds a character outside the vocabulary.

    >>> CharVocabulary.from_text("ab").encode("bab").tolist()
    [1, 0, 1]
    """
    index = {char: i for i, char in enumerate(self.chars)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
      raise ValueError(
        f"characters {unknown} are not in the vocabulary {''.join(self.chars)!r}"
      )
    return np.array([index[char] for char in text], dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of token ids.

    >>> CharVocabulary.from_text("ab").decode([1, 0])
    'ba'
    """
    return "".join(self.chars[int(i)] for i in ids)

  def labels(self) -> list[str]:
    """Printable labels of the tokens (a space shows as ``␣``).

    >>> CharVocabulary.from_text("a b").labels()
    ['␣', 'a', 'b']
    """
    return ["␣" if char == " " else char for char in self.chars]


def windows_at(
  ids: jax.Array, starts: jax.Array, context: int
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
  """Context windows of ``ids`` and the token that follows each.

  Args:
    ids: 1-D integer array of token ids.
    starts: 1-D integer array of window starts, each at most
      ``len(ids) - context - 1``.
    context: Window length.

  Returns:
    ``(tokens, targets)``: tokens ``{"batch", "context"}`` and next tokens
    ``{"batch"}``.

  Example:

  >>> tokens, targets = windows_at(jnp.arange(10), jnp.array([0, 5]), 3)
  >>> tokens.named_shape
  {'batch': 2, 'context': 3}
  >>> tokens.unwrap("batch", "context").tolist(), targets.unwrap("batch").tolist()
  ([[0, 1, 2], [5, 6, 7]], [3, 8])
  """
  offsets = jnp.arange(context + 1, dtype=starts.dtype)
  windows = jnp.take(ids, starts[:, None] + offsets[None, :], axis=0)
  tokens = pz.nx.wrap(windows[:, :context]).tag("batch", "context")
  targets = pz.nx.wrap(windows[:, context]).tag("batch")
  return tokens, targets


# --------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes of the demo model.

  Example:

  >>> ModelConfig(vocab_size=56)
  ModelConfig(vocab_size=56, context=8, embedding=32, hidden=128)

  Attributes:
    vocab_size: Number of tokens.
    context: Number of previous characters the model sees.
    embedding: Size of the ``"embedding"`` axis of the tied table.
    hidden: Size of the ``"hidden"`` axis of the MLP.
  """

  vocab_size: int
  context: int = 8
  embedding: int = 32
  hidden: int = 128


def build_model(config: ModelConfig, seed: int = 0) -> pz.nn.Sequential:
  """Builds the tied-embedding n-gram MLP.

  Args:
    config: The sizes.
    seed: Seed of the parameter initialisation.

  Returns:
    A `pz.nn.Sequential` taking tokens ``{"batch", "context"}`` to logits
    ``{"batch", "vocabulary"}``, whose first and last layers share one
    `named_embed.EmbeddingTable`.

  Example:

  >>> model = build_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                 hidden=6))
  >>> ids = pz.nx.wrap(jnp.array([[1, 2]])).tag("batch", "context")
  >>> model(ids).named_shape
  {'batch': 1, 'vocabulary': 5}
  >>> [p.label for p in pz.unbind_params(model)[1]]
  ['embed.embeddings', 'hidden/Linear.weights', 'hidden/AddBias.bias',
   'unembed.weights']
  """
  key = jax.random.key(seed)
  table = ne.EmbeddingTable.from_config(
    name="embed",
    init_base_rng=key,
    vocab_size=config.vocab_size,
    embedding_axes={"embedding": config.embedding},
  )
  return pz.nn.Sequential([
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
  ])


def embedding_table(model: pz.nn.Sequential) -> ne.EmbeddingTable:
  """The table of the model's `EmbeddingLookup` (the tied table).

  >>> model = build_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                 hidden=6))
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
  >>> round(float(cross_entropy(logits, targets)), 4)  # log(4)
  1.3863
  """
  per_token = pz.nx.nmap(lambda row, t: jax.nn.logsumexp(row) - row[t])(
    logits.untag("vocabulary"), targets
  )
  return jnp.mean(per_token.unwrap(*per_token.named_shape))


# ----------------------------------------------------------------- optimiser


class AdamState(NamedTuple):
  """State of `adam_update`: the step count and both moment estimates."""

  count: jax.Array
  mu: Any
  nu: Any


def adam_init(params: Any) -> AdamState:
  """Zero moments for a pytree of parameters.

  >>> adam_init({"w": jnp.ones(3)}).mu
  {'w': Array([0., 0., 0.], dtype=float32)}
  """
  zeros = jax.tree.map(jnp.zeros_like, params)
  return AdamState(jnp.zeros((), jnp.int32), zeros, zeros)


def adam_update(
  grads: Any,
  state: AdamState,
  params: Any,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> tuple[Any, AdamState]:
  """One Adam step (Kingma and Ba, 2015), for any pytree of float arrays.

  Args:
    grads: Gradients, with the structure of ``params``.
    state: From `adam_init` or the previous step.
    params: Current parameters.
    learning_rate: Step size.
    b1: Decay of the first-moment estimate.
    b2: Decay of the second-moment estimate.
    eps: Added to the root of the second moment.

  Returns:
    ``(new_params, new_state)``; each parameter keeps its dtype.

  Example (the first step moves each parameter by ``learning_rate``):

  >>> params = {"x": jnp.array(1.0)}
  >>> params, state = adam_update({"x": jnp.array(2.0)}, adam_init(params),
  ...                             params, learning_rate=0.1)
  >>> round(float(params["x"]), 4), int(state.count)
  (0.9, 1)
  """
  count = state.count + 1
  mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
  nu = jax.tree.map(
    lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, grads
  )
  mu_scale = 1 / (1 - b1**count)
  nu_scale = 1 / (1 - b2**count)

  def step(p, m, v):
    m_hat = m * mu_scale.astype(m.dtype)
    v_hat = v * nu_scale.astype(v.dtype)
    return (p - learning_rate * m_hat / (jnp.sqrt(v_hat) + eps)).astype(p.dtype)

  return jax.tree.map(step, params, mu, nu), AdamState(count, mu, nu)


# ------------------------------------------------------------------ progress


class ProgressBar:
  """A one-line text progress bar, redrawn in place with carriage returns.

  Example:

  >>> import io
  >>> out = io.StringIO()
  >>> bar = ProgressBar(4, out, width=8, min_interval=0.0)
  >>> for _ in range(4):
  ...   bar.update(loss=1.5)
  >>> bar.line()  # doctest: +ELLIPSIS
  'train [########] 4/4 loss 1.500 ...it/s'
  >>> bar.close()

  Args:
    total: Number of steps.
    stream: Where to draw (usually ``sys.stderr``).
    width: Number of cells of the bar.
    desc: Text in front of the bar.
    min_interval: Minimum seconds between redraws (the last step always
      draws).
  """

  def __init__(
    self,
    total: int,
    stream: TextIO,
    width: int = 30,
    desc: str = "train",
    min_interval: float = 0.1,
  ):
    self.total = total
    self.stream = stream
    self.width = width
    self.desc = desc
    self.min_interval = min_interval
    self.done = 0
    self.postfix: dict[str, float] = {}
    self._start = time.perf_counter()
    self._last_draw = -math.inf
    self._drawn = ""

  def line(self) -> str:
    """The current text of the bar."""
    fraction = self.done / self.total if self.total else 1.0
    filled = round(fraction * self.width)
    cells = "#" * filled + "." * (self.width - filled)
    stats = "".join(f" {k} {v:.3f}" for k, v in self.postfix.items())
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    rate = self.done / elapsed
    return f"{self.desc} [{cells}] {self.done}/{self.total}{stats} {rate:.0f}it/s"

  def update(self, n: int = 1, **postfix: float) -> None:
    """Advances by ``n`` steps and shows ``postfix`` values after the bar."""
    self.done += n
    self.postfix.update(postfix)
    now = time.perf_counter()
    if self.done >= self.total or now - self._last_draw >= self.min_interval:
      self._last_draw = now
      self._draw()

  def write(self, message: str, stream: TextIO) -> None:
    """Prints a line to ``stream`` without garbling the bar."""
    self._clear()
    print(message, file=stream, flush=True)
    self._draw()

  def close(self) -> None:
    """Erases the bar."""
    self._clear()

  def _draw(self) -> None:
    line = self.line()
    padding = " " * max(0, len(self._drawn) - len(line))
    self.stream.write("\r" + line + padding)
    self.stream.flush()
    self._drawn = line

  def _clear(self) -> None:
    if self._drawn:
      self.stream.write("\r" + " " * len(self._drawn) + "\r")
      self.stream.flush()
      self._drawn = ""
