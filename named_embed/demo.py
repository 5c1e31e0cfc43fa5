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
import functools
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
DEFAULT_BATCH_SIZE = 256
DEFAULT_LEARNING_RATE = 1e-2
DEFAULT_OUTPUT = "named_embed_demo.html"
DEFAULT_PROMPT = "Once upon a time"
EVAL_WINDOWS = 512
SAMPLE_LENGTH = 80
SAMPLE_TEMPERATURE = 0.6
# For functions run only a few times (initialisation, evaluation, sampling):
# XLA compiles them about twice as fast, and they run slower but still in
# milliseconds. The training step keeps full optimisation.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}

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
        f"characters {unknown} are not in the vocabulary"
        f" {''.join(self.chars)!r}"
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
  ids: jax.Array | np.ndarray, starts: jax.Array | np.ndarray, context: int
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
  """Context windows of ``ids`` and the token that follows each.

  Works on numpy arrays (no compilation) and on jax arrays or tracers.

  Args:
    ids: 1-D int32 array of token ids.
    starts: 1-D int32 array of window starts, each at most
      ``len(ids) - context - 1``.
    context: Window length.

  Returns:
    ``(tokens, targets)``: tokens ``{"batch", "context"}`` and next tokens
    ``{"batch"}``.

  Example:

  >>> tokens, targets = windows_at(np.arange(10, dtype=np.int32),
  ...                              np.array([0, 5], np.int32), 3)
  >>> tokens.named_shape
  {'batch': 2, 'context': 3}
  >>> tokens.unwrap("batch", "context").tolist()
  [[0, 1, 2], [5, 6, 7]]
  >>> targets.unwrap("batch").tolist()
  [3, 8]
  """
  offsets = np.arange(context + 1, dtype=np.int32)
  windows = ids[starts[:, None] + offsets[None, :]]
  tokens = pz.nx.wrap(windows[:, :context]).tag("batch", "context")
  targets = pz.nx.wrap(windows[:, context]).tag("batch")
  return tokens, targets


# --------------------------------------------------------------------- model


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
  jax.jit, static_argnames=("config", "seed"), compiler_options=_FAST_COMPILE
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
  learning_rate: float | jax.Array = DEFAULT_LEARNING_RATE,
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
  exponent = count.astype(jnp.float32)  # strict promotion: no int ** float
  mu_scale = 1 / (1 - b1**exponent)
  nu_scale = 1 / (1 - b2**exponent)

  def step(p, m, v):
    m_hat = m * mu_scale.astype(m.dtype)
    v_hat = v * nu_scale.astype(v.dtype)
    return (p - learning_rate * m_hat / (jnp.sqrt(v_hat) + eps)).astype(p.dtype)

  return jax.tree.map(step, params, mu, nu), AdamState(count, mu, nu)


def cosine_decay(
  base: float | jax.Array, step: jax.Array, total: int | jax.Array
) -> jax.Array:
  """Learning rate ``base`` decayed along half a cosine to 0 at ``total``.

  >>> [round(float(cosine_decay(1.0, jnp.array(s), 4)), 3) for s in range(5)]
  [1.0, 0.854, 0.5, 0.146, 0.0]
  """
  fraction = jnp.minimum(step / jnp.maximum(total, 1), 1.0)
  return base * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))


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
    elapsed = time.perf_counter() - self._start
    rate = f" {(self.done - 1) / elapsed:.0f}it/s" if self.done > 1 else ""
    return f"{self.desc} [{cells}] {self.done}/{self.total}{stats}{rate}"

  def update(self, n: int = 1, **postfix: float) -> None:
    """Advances by ``n`` steps and shows ``postfix`` values after the bar."""
    now = time.perf_counter()
    if self.done == 0:  # the rate leaves out the first step (compilation)
      self._start = now
    self.done += n
    self.postfix.update(postfix)
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


# ------------------------------------------------------------------ training


@dataclasses.dataclass
class TrainingLog:
  """What `train` measured.

  Example:

  >>> TrainingLog().evals
  []

  Attributes:
    losses: Loss on each step's training batch, before that step's update.
    evals: ``(step, train_loss, valid_loss)`` on fixed batches of the two
      splits, at step 0, every ``log_every`` steps and at the last step.
  """

  losses: list[float] = dataclasses.field(default_factory=list)
  evals: list[tuple[int, float, float]] = dataclasses.field(
    default_factory=list
  )


def make_train_step(
  unbound: Any,
  *,
  batch_size: int,
  context: int,
  learning_rate: float,
  total_steps: int,
) -> Callable[..., tuple[Any, AdamState, jax.Array]]:
  """A jitted ``step(values, state, key, ids) -> (values, state, loss)``.

  The step draws ``batch_size`` random windows of ``ids`` (with ``key``
  folded with the step count, so one key serves every step), computes the
  loss and its gradient with respect to the parameter values, and applies
  `adam_update` with a `cosine_decay` learning rate. All step functions
  share one `jax.jit` cache, so models and batches of the same shapes
  compile once.

  Args:
    unbound: The model with its parameters unbound (`pz.unbind_params`).
    batch_size: Windows per step.
    context: Window length of the model.
    learning_rate: Adam step size at the start; it follows `cosine_decay`
      down to 0 at ``total_steps``.
    total_steps: Length of the schedule.

  Returns:
    The jitted step function.

  Example:

  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> unbound, values = pz.unbind_params(model, freeze=True)
  >>> step = make_train_step(unbound, batch_size=4, context=2,
  ...                        learning_rate=0.01, total_steps=3)
  >>> ids = jnp.arange(40, dtype=jnp.int32) % 5
  >>> state = jax.jit(adam_init)(values)
  >>> values, state, loss = step(values, state, jax.random.key(0), ids)
  >>> loss.shape, int(state.count)
  ((), 1)
  """

  return functools.partial(
    _train_step,
    unbound,
    learning_rate=learning_rate,
    total_steps=total_steps,
    batch_size=batch_size,
    context=context,
  )


def _loss(unbound, values, tokens, targets):
  return cross_entropy(pz.bind_variables(unbound, values)(tokens), targets)


_loss_jit = jax.jit(_loss, compiler_options=_FAST_COMPILE)


@functools.partial(jax.jit, static_argnames=("batch_size", "context"))
def _train_step(
  unbound, values, state, key, ids, *, learning_rate, total_steps, **static
):
  batch_size, context = static["batch_size"], static["context"]
  key = jax.random.fold_in(key, state.count)
  high = ids.shape[0] - context
  starts = jax.random.randint(key, (batch_size,), 0, high, jnp.int32)
  tokens, targets = windows_at(ids, starts, context)
  loss, grads = jax.value_and_grad(_loss, argnums=1)(
    unbound, values, tokens, targets
  )
  rate = cosine_decay(learning_rate, state.count, total_steps)
  values, state = adam_update(grads, state, values, rate)
  return values, state, loss


def make_evaluator(
  unbound: Any, splits: Sequence[np.ndarray], *, context: int, seed: int = 0
) -> Callable[[Any], list[float]]:
  """A function of parameter values giving the loss on each split.

  Each split is scored on the same ``EVAL_WINDOWS`` (or fewer) windows every
  time, so the numbers are comparable from step to step.

  Args:
    unbound: The model with its parameters unbound.
    splits: 1-D arrays of token ids, each longer than ``context``.
    context: Window length of the model.
    seed: Seed of the choice of windows.

  Returns:
    ``evaluate(values) -> [loss of each split]``.

  Example:

  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> unbound, values = pz.unbind_params(model, freeze=True)
  >>> evaluate = make_evaluator(unbound, [np.arange(9) % 5], context=2)
  >>> [1.0 < loss < 2.5 for loss in evaluate(values)]  # about log(5)
  [True]
  """
  rng = np.random.default_rng(seed)
  batches = []
  for ids in splits:
    count = min(EVAL_WINDOWS, len(ids) - context)
    starts = rng.integers(0, len(ids) - context, size=count, dtype=np.int32)
    batches.append(windows_at(np.asarray(ids, np.int32), starts, context))

  def evaluate(values):
    return [float(_loss_jit(unbound, values, *batch)) for batch in batches]

  return evaluate


def train(
  model: pz.nn.Sequential,
  train_ids: np.ndarray,
  valid_ids: np.ndarray,
  *,
  context: int,
  steps: int = DEFAULT_STEPS,
  batch_size: int = DEFAULT_BATCH_SIZE,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  seed: int = DEFAULT_SEED,
  log_every: int | None = None,
  stream: TextIO | None = None,
  progress: TextIO | None = None,
) -> tuple[pz.nn.Sequential, TrainingLog]:
  """Trains ``model`` with Adam, printing the loss and drawing a progress bar.

  Args:
    model: A model with `pz.Parameter` objects, from `build_model`.
    train_ids: Token ids to train on.
    valid_ids: Held-out token ids, only evaluated.
    context: Window length of the model.
    steps: Number of Adam steps.
    batch_size: Windows per step.
    learning_rate: Initial Adam step size (cosine-decayed to 0).
    seed: Seed of the batches.
    log_every: Print the losses every this many steps (default: steps // 6).
    stream: Where the loss lines go (default ``sys.stdout``).
    progress: Where the progress bar goes (default ``sys.stderr``).

  Returns:
    ``(trained_model, log)``; the trained model holds new `pz.Parameter`
    objects.

  Example:

  >>> import io
  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> ids = np.arange(40, dtype=np.int32) % 5
  >>> out = io.StringIO()
  >>> model, log = train(model, ids, ids, context=2, steps=3, batch_size=4,
  ...                    stream=out, progress=io.StringIO())
  >>> len(log.losses), [step for step, _, _ in log.evals]
  (3, [0, 1, 2, 3])
  >>> print(out.getvalue().splitlines()[0])  # doctest: +ELLIPSIS
  step    0/3  train loss ...  valid loss ...
  """
  stream = sys.stdout if stream is None else stream
  progress = sys.stderr if progress is None else progress
  unbound, values = pz.unbind_params(model, freeze=True)
  step = make_train_step(
    unbound,
    batch_size=batch_size,
    context=context,
    learning_rate=learning_rate,
    total_steps=steps,
  )
  evaluate = make_evaluator(
    unbound, [train_ids, valid_ids], context=context, seed=seed
  )
  log_every = log_every or max(1, steps // 6)
  log = TrainingLog()
  bar = ProgressBar(steps, progress)

  def record(i):
    train_loss, valid_loss = evaluate(values)
    log.evals.append((i, train_loss, valid_loss))
    bar.write(
      f"step {i:>4}/{steps}  train loss {train_loss:.3f}"
      f"  valid loss {valid_loss:.3f}",
      stream,
    )

  record(0)
  ids, key = jnp.asarray(train_ids), jax.random.key(seed)
  state = jax.jit(adam_init)(values)  # one compile, not one per parameter
  for i in range(1, steps + 1):
    values, state, loss = step(values, state, key, ids)
    log.losses.append(float(loss))
    bar.update(loss=log.losses[-1])
    if i % log_every == 0 or i == steps:
      record(i)
  bar.close()
  return pz.bind_variables(unbound, values, unfreeze_as_copy=True), log


# ---------------------------------------------------------------- generation


def generate(
  model: pz.nn.Sequential,
  vocab: CharVocabulary,
  prompt: str = DEFAULT_PROMPT,
  *,
  context: int,
  length: int = SAMPLE_LENGTH,
  seed: int = DEFAULT_SEED,
  temperature: float = SAMPLE_TEMPERATURE,
) -> str:
  """Continues ``prompt`` by sampling one character at a time.

  Args:
    model: The model (with `pz.Parameter` objects or frozen values).
    vocab: Its vocabulary; ``prompt`` and a space must be in it (a short
      prompt is padded with spaces on the left).
    prompt: The start of the text.
    context: Window length of the model.
    length: Number of characters to add.
    seed: Seed of the sampling.
    temperature: Divides the logits; lower is greedier.

  Returns:
    ``prompt`` followed by ``length`` sampled characters.

  Example:

  >>> vocab = CharVocabulary.from_text("abcd ")
  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> text = generate(model, vocab, "ab", context=2, length=5)
  >>> len(text), set(text) <= set("abcd ")
  (7, True)
  """
  unbound, values = pz.unbind_params(model, freeze=True)
  window = jnp.asarray(vocab.encode(prompt.rjust(context)[-context:]))
  key = jax.random.key(seed)
  ids = _sample(unbound, values, window, key, temperature, length=length)
  return prompt + vocab.decode(np.asarray(ids))


@functools.partial(
  jax.jit, static_argnames=("length",), compiler_options=_FAST_COMPILE
)
def _sample(unbound, values, window, key, temperature, *, length):
  model = pz.bind_variables(unbound, values)

  def body(window, key):
    tokens = pz.nx.wrap(window[None, :]).tag("batch", "context")
    logits = model(tokens).unwrap("batch", "vocabulary")[0]
    token = jax.random.categorical(key, logits / temperature)
    token = token.astype(window.dtype)
    return jnp.concatenate([window[1:], token[None]]), token

  return jax.lax.scan(body, window, jax.random.split(key, length))[1]


def nearest_chars(
  table: ne.EmbeddingTable, vocab: CharVocabulary, char: str, k: int = 3
) -> list[str]:
  """The ``k`` characters whose rows are closest to ``char``'s (cosine).

  Example:

  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32))
  >>> nearest_chars(table, CharVocabulary(("a", "b", "c")), "a", k=2)
  ['b', 'c']
  """
  rows = np.asarray(table.rows_array(), np.float64).reshape(len(vocab), -1)
  norms = np.linalg.norm(rows, axis=1, keepdims=True)
  unit = rows / np.maximum(norms, 1e-12)
  index = vocab.chars.index(char)
  similarity = unit @ unit[index]
  similarity[index] = -np.inf
  order = np.argsort(-similarity, kind="stable")[:k]
  return [vocab.chars[int(i)] for i in order]


# ---------------------------------------------------------------------- page

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
td, th {{ padding: 0 0.8em; font-family: monospace; }}
pre {{ background: #f4f4f4; padding: 0.5em; white-space: pre-wrap; }}</style>
</head><body>
<h1>{title}</h1>
{summary}
<h2>The trained embedding table</h2>
<p>One row per character (axis <code>vocabulary</code>), one column per
component (axis <code>embedding</code>). Hover over a cell to see its
character and value.</p>
{array}
<h2>The table as a penzai struct</h2>
{struct}
<h2>The whole model</h2>
<p>The <code>EmbeddingLookup</code> and the <code>EmbeddingDecode</code> hold
the same <code>EmbeddingTable</code>, hence one embedding parameter.</p>
{model}
<h2>Nearest characters (cosine similarity of rows)</h2>
<table><tr><th>row</th><th>character</th><th>nearest</th></tr>
{neighbours}
</table>
</body></html>
"""


def render_page(
  table: ne.EmbeddingTable,
  vocab: CharVocabulary,
  summary: Sequence[str] = (),
  model: Any = None,
) -> str:
  """An HTML page showing ``table`` with treescope.

  The page holds `treescope.render_array` of the table, its rows labelled
  with their characters, the treescope rendering of the `EmbeddingTable`
  struct (and of the whole model, if given), and each character's nearest
  neighbours.

  Args:
    table: A table whose vocabulary has ``len(vocab)`` rows.
    vocab: The characters of the rows.
    summary: Lines of text shown at the top (escaped).
    model: If given, rendered with treescope too.

  Returns:
    The HTML source.

  Example:

  >>> table = ne.EmbeddingTable.from_pretrained(np.eye(2, dtype=np.float32))
  >>> page = render_page(table, CharVocabulary(("x", "y")), ["hello"])
  >>> "treescope" in page, "&quot;x&quot;" in page, "<pre>hello</pre>" in page
  (True, True, True)
  """
  labels = vocab.labels()
  figure = treescope.render_array(
    table.value,
    rows=[table.vocabulary_axis],
    columns=list(table.embedding_axes),
    axis_item_labels={table.vocabulary_axis: labels},
  )
  neighbours = "\n".join(
    f"<tr><td>{i}</td><td>{html.escape(label)}</td>"
    f"<td>{html.escape(' '.join(nearest_chars(table, vocab, char)))}</td></tr>"
    for i, (char, label) in enumerate(zip(vocab.chars, labels))
  )
  return _PAGE.format(
    title="named_embed demo: a tied character embedding table",
    summary="".join(f"<pre>{html.escape(line)}</pre>" for line in summary),
    array=treescope.render_to_html(figure, compressed=False),
    struct=treescope.render_to_html(table, compressed=False),
    model="" if model is None else treescope.render_to_html(model),
    neighbours=neighbours,
  )


def write_page(page: str, output: str | os.PathLike[str]) -> str:
  """Writes ``page`` to ``output`` (UTF-8) and returns its absolute path.

  >>> import pathlib, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = write_page("<p>hi</p>", pathlib.Path(tmp) / "page.html")
  ...   print(os.path.isabs(path), pathlib.Path(path).read_text())
  True <p>hi</p>
  """
  path = os.path.abspath(os.fspath(output))
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


# ----------------------------------------------------------------------- run


def _describe(model: pz.nn.Sequential, config: ModelConfig, n: int) -> str:
  """The header printed before training."""
  _, params = pz.unbind_params(model)
  sizes = {p.label: math.prod(p.value.named_shape.values()) for p in params}
  return (
    f"named_embed demo: a tied-embedding character model on {n:,} characters"
    f" of fables\n  vocabulary {config.vocab_size}, context {config.context},"
    f" embedding {config.embedding}, hidden {config.hidden};"
    f" {sum(sizes.values()):,} parameters"
    f" ({', '.join(f'{k} {v:,}' for k, v in sizes.items())})\n"
    "  one EmbeddingTable shared by EmbeddingLookup and EmbeddingDecode"
  )


def _report(
  table: ne.EmbeddingTable, vocab: CharVocabulary, sample: str
) -> list[str]:
  """The lines printed after training: the sample and some neighbours."""
  near = {c: " ".join(nearest_chars(table, vocab, c)) for c in "aetAT,"}
  return [
    f"sample (temperature {SAMPLE_TEMPERATURE}):\n  {sample}",
    "nearest rows: " + " | ".join(f"{c} ~ {n}" for c, n in near.items()),
  ]


def _losses(log: TrainingLog) -> str:
  """First and last evaluated losses, for the page."""
  (_, train0, valid0), (step, train1, valid1) = log.evals[0], log.evals[-1]
  return (
    f"{step} steps: valid loss {valid0:.3f} -> {valid1:.3f},"
    f" train loss {train0:.3f} -> {train1:.3f}"
  )


def run(
  steps: int = DEFAULT_STEPS,
  seed: int = DEFAULT_SEED,
  output: str | os.PathLike[str] = DEFAULT_OUTPUT,
  batch_size: int = DEFAULT_BATCH_SIZE,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  prompt: str = DEFAULT_PROMPT,
  stream: TextIO | None = None,
  progress: TextIO | None = None,
) -> dict[str, Any]:
  """Runs the whole demo: train, print a sample, write the HTML page.

  Args:
    steps: Number of training steps.
    seed: Seed of the initialisation, the batches and the sample.
    output: Path of the HTML page.
    batch_size: Windows per training step.
    learning_rate: Initial Adam step size (cosine-decayed to 0).
    prompt: Start of the generated sample.
    stream: Where the report goes (default ``sys.stdout``).
    progress: Where the progress bar goes (default ``sys.stderr``).

  Returns:
    A dict with ``"losses"`` (one per step), ``"evals"`` (``(step,
    train_loss, valid_loss)`` tuples), ``"sample"``, ``"output"`` (the
    absolute path of the page), ``"model"`` (trained) and ``"vocabulary"``.

  Example:

  Skipped by the doctests because it takes a few seconds (compilation);
  ``tests/demo_test.py`` runs it.

  >>> import io, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
  ...   result = run(steps=1, output=f"{tmp}/demo.html", stream=io.StringIO(),
  ...                progress=io.StringIO())
  ...   print(len(result["losses"]), result["sample"][:16])
  1 Once upon a time
  """
  start = time.perf_counter()
  stream = sys.stdout if stream is None else stream
  text = load_text()
  vocab = CharVocabulary.from_text(text)
  ids = vocab.encode(text)
  split = len(ids) * 9 // 10
  config = ModelConfig(vocab_size=len(vocab))
  model = init_model(config, seed)
  header = _describe(model, config, len(ids))
  print(header, file=stream, flush=True)
  model, log = train(
    model,
    ids[:split],
    ids[split:],
    context=config.context,
    steps=steps,
    batch_size=batch_size,
    learning_rate=learning_rate,
    seed=seed,
    stream=stream,
    progress=progress,
  )
  sample = generate(model, vocab, prompt, context=config.context, seed=seed)
  table = embedding_table(model)
  report = _report(table, vocab, sample)
  page = render_page(table, vocab, [header, _losses(log), *report], model)
  path = write_page(page, output)
  for line in [*report, f"wrote {path}"]:
    print(line, file=stream)
  print(f"done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
  return {
    "losses": log.losses,
    "evals": log.evals,
    "sample": sample,
    "output": path,
    "model": model,
    "vocabulary": vocab,
  }


# ----------------------------------------------------------------------- CLI


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not (value > 0 and math.isfinite(value)):
    raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser of ``python -m named_embed``.

  >>> args = build_parser().parse_args(["--steps", "50", "--seed", "3"])
  >>> args.steps, args.seed, args.batch_size, args.output
  (50, 3, 256, 'named_embed_demo.html')
  """
  parser = argparse.ArgumentParser(
    prog="python -m named_embed",
    description=(
      "Train a tiny character-level language model whose input and output"
      " embeddings are one named_embed.EmbeddingTable (tied weights), print"
      " its falling loss and a generated sample, and write an HTML page of"
      " the trained table rendered with treescope."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  add = parser.add_argument
  add(
    "--steps",
    type=_non_negative_int,
    default=DEFAULT_STEPS,
    help="number of training steps",
  )
  add(
    "--seed",
    type=int,
    default=DEFAULT_SEED,
    help="random seed of initialisation, batches and sampling",
  )
  add("--output", default=DEFAULT_OUTPUT, help="path of the HTML page to write")
  add(
    "--batch-size",
    type=_positive_int,
    default=DEFAULT_BATCH_SIZE,
    help="training windows per step",
  )
  add(
    "--learning-rate",
    type=_positive_float,
    default=DEFAULT_LEARNING_RATE,
    help="initial Adam learning rate (cosine-decayed to 0)",
  )
  add(
    "--prompt",
    default=DEFAULT_PROMPT,
    help="start of the generated sample (characters of the fables only)",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m named_embed``.

  Args:
    argv: Command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The exit status, 0.

  Example (invalid arguments exit with status 2, as argparse does):

  >>> main(["--steps", "-1"])
  Traceback (most recent call last):
  ...
  SystemExit: 2
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  unknown = set(args.prompt) - set(load_text())
  if unknown:
    parser.error(f"--prompt: {sorted(unknown)} do not occur in the fables")
  run(
    steps=args.steps,
    seed=args.seed,
    output=args.output,
    batch_size=args.batch_size,
    learning_rate=args.learning_rate,
    prompt=args.prompt,
  )
  return 0
