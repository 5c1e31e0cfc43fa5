"""Training the demo model, evaluating it, and sampling text from it."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from named_embed.demo.adam import (
  AdamState,
  adam_init,
  adam_update,
  cosine_decay,
)
from named_embed.demo.model import cross_entropy
from named_embed.demo.progress import ProgressBar, TrainingLog
from named_embed.demo.settings import (
  DEFAULT_BATCH_SIZE,
  DEFAULT_LEARNING_RATE,
  DEFAULT_PROMPT,
  DEFAULT_SEED,
  DEFAULT_STEPS,
  EVAL_WINDOWS,
  FAST_COMPILE,
  SAMPLE_LENGTH,
  SAMPLE_TEMPERATURE,
)
from named_embed.demo.text import CharVocabulary, windows_at


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

  >>> from named_embed.demo.model import ModelConfig, init_model
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


_loss_jit = jax.jit(_loss, compiler_options=FAST_COMPILE)


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

  >>> from named_embed.demo.model import ModelConfig, init_model
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
  >>> from named_embed.demo.model import ModelConfig, init_model
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
  values, log = _run_steps(
    step,
    evaluate,
    values,
    train_ids,
    seed=seed,
    log_every=log_every or max(1, steps // 6),
    bar=ProgressBar(steps, sys.stderr if progress is None else progress),
    stream=sys.stdout if stream is None else stream,
  )
  return pz.bind_variables(unbound, values, unfreeze_as_copy=True), log


def _run_steps(
  step: Callable[..., tuple[Any, AdamState, jax.Array]],
  evaluate: Callable[[Any], list[float]],
  values: Any,
  train_ids: np.ndarray,
  *,
  seed: int,
  log_every: int,
  bar: ProgressBar,
  stream: TextIO,
) -> tuple[Any, TrainingLog]:
  """The loop of `train`: ``bar.total`` steps of ``step`` from ``values``.

  The losses are evaluated, logged and printed at step 0, every
  ``log_every`` steps and at the last step.

  Returns:
    ``(final_values, log)``.
  """
  steps, log = bar.total, TrainingLog()

  def record(i, values):
    train_loss, valid_loss = evaluate(values)
    log.evals.append((i, train_loss, valid_loss))
    bar.write(
      f"step {i:>4}/{steps}  train loss {train_loss:.3f}"
      f"  valid loss {valid_loss:.3f}",
      stream,
    )

  record(0, values)
  ids, key = jnp.asarray(train_ids), jax.random.key(seed)
  state = jax.jit(adam_init)(values)  # one compile, not one per parameter
  for i in range(1, steps + 1):
    values, state, loss = step(values, state, key, ids)
    log.losses.append(float(loss))
    bar.update(loss=log.losses[-1])
    if i % log_every == 0 or i == steps:
      record(i, values)
  bar.close()
  return values, log


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

  >>> from named_embed.demo.model import ModelConfig, init_model
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
  jax.jit, static_argnames=("length",), compiler_options=FAST_COMPILE
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
