"""Training the demo model with optax, evaluating it, and sampling from it.

Training follows penzai's way with optax: `pz.unbind_params` splits the
model into its structure and its parameter values, `jax.grad` differentiates
the loss with respect to the values, and an optax optimiser updates them.
Progress is shown with `tqdm.auto.tqdm` (a widget in a notebook), and only
on a terminal or in a notebook: written to a file or a pipe, training
prints plain evaluation lines and no bar.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm.auto
from penzai import pz

import named_embed as ne
from named_embed.demo.model import model_loss
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
from named_embed.demo.text import decode, encode, windows_at


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


@functools.cache
def make_optimizer(
  learning_rate: float = DEFAULT_LEARNING_RATE, total_steps: int = 1
) -> optax.GradientTransformation:
  """Adam whose learning rate follows a cosine from ``learning_rate`` to 0.

  ``optax.adam`` with ``optax.cosine_decay_schedule`` over ``total_steps``.
  The same arguments give the same object, so the jitted training step
  (which takes the optimiser as a static argument) compiles once per
  process for them. optax mixes Python floats with its int32 step count,
  so its ``update`` needs JAX's standard dtype promotion (the default);
  `make_train_step` asks for it.

  Example:

  >>> import optax
  >>> optimizer = make_optimizer(0.1, total_steps=4)
  >>> params = {"x": jnp.array(1.0)}
  >>> state = optimizer.init(params)
  >>> with jax.numpy_dtype_promotion("standard"):  # as in the training step
  ...   updates, state = optimizer.update({"x": jnp.array(2.0)}, state, params)
  >>> round(float(optax.apply_updates(params, updates)["x"]), 4)  # first step
  0.9
  >>> make_optimizer(0.1, total_steps=4) is optimizer
  True
  """
  schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  return optax.adam(schedule)


def make_train_step(
  unbound: Any,
  optimizer: optax.GradientTransformation,
  *,
  batch_size: int,
  context: int,
) -> Callable[..., tuple[Any, Any, jax.Array, jax.Array]]:
  """A jitted ``step(values, opt_state, key, ids)``.

  The step splits ``key``, draws ``batch_size`` random windows of ``ids``
  with one half, takes ``jax.value_and_grad`` of `model_loss` with respect
  to the parameter values, and applies ``optimizer``. It returns
  ``(values, opt_state, key, loss)``, ``key`` being the other half for the
  next step: everything stays on the device, so steps are dispatched
  without waiting for one another. Steps of the same model structure,
  optimiser and shapes share one compilation.

  Args:
    unbound: The model with its parameters unbound (`pz.unbind_params`).
    optimizer: An optax optimiser, e.g. from `make_optimizer`.
    batch_size: Windows per step.
    context: Window length of the model.

  Returns:
    The jitted step function.

  Example:

  >>> from named_embed.demo.model import ModelConfig, init_model
  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> unbound, values = pz.unbind_params(model, freeze=True)
  >>> optimizer = make_optimizer(0.01, total_steps=3)
  >>> step = make_train_step(unbound, optimizer, batch_size=4, context=2)
  >>> ids = jnp.arange(40, dtype=jnp.int32) % 5
  >>> opt_state = jax.jit(optimizer.init)(values)
  >>> values, opt_state, key, loss = step(values, opt_state,
  ...                                     jax.random.key(0), ids)
  >>> loss.shape, [v.label for v in values][0]
  ((), 'embed.embeddings')
  """
  return functools.partial(
    _train_step,
    unbound,
    optimizer=optimizer,
    batch_size=batch_size,
    context=context,
  )


def _loss(unbound, values, tokens, targets):
  return model_loss(pz.bind_variables(unbound, values), tokens, targets)


_loss_jit = jax.jit(_loss, compiler_options=FAST_COMPILE)


@functools.partial(
  jax.jit, static_argnames=("optimizer", "batch_size", "context")
)
def _train_step(
  unbound, values, opt_state, key, ids, *, optimizer, batch_size, context
):
  key, batch_key = jax.random.split(key)
  high = ids.shape[0] - context
  starts = jax.random.randint(batch_key, (batch_size,), 0, high, jnp.int32)
  tokens, targets = windows_at(ids, starts, context)
  loss, grads = jax.value_and_grad(_loss, argnums=1)(
    unbound, values, tokens, targets
  )
  # optax mixes Python floats with its int32 step count (Adam's bias
  # correction, the schedule), which strict dtype promotion rejects.
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = optimizer.update(grads, opt_state, values)
  values = optax.apply_updates(values, updates)
  return values, opt_state, key, loss


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


def progress_bar(total: int, file: TextIO | None = None) -> Any:
  """A `tqdm.auto.tqdm` bar of ``total`` steps, off outside terminals.

  In a notebook the bar is a widget. Elsewhere it is drawn on ``file``
  (default ``sys.stderr``) if that is a terminal (``file.isatty()``), and
  disabled otherwise (tqdm's ``disable=None``): a log file or a pipe then
  receives no bar and no carriage returns.

  Example (a `io.StringIO` is not a terminal):

  >>> import io
  >>> out = io.StringIO()
  >>> with progress_bar(3, out) as bar:
  ...   bar.update(3)
  >>> bar.disable, out.getvalue()
  (True, '')
  """
  return tqdm.auto.tqdm(
    total=total,
    desc="train",
    unit="step",
    file=file,
    disable=None,
    leave=False,
    dynamic_ncols=True,
  )


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
  """Trains ``model`` with optax Adam, printing the loss as it falls.

  Args:
    model: A model with `pz.Parameter` objects, from `build_model`.
    train_ids: Token ids to train on.
    valid_ids: Held-out token ids, only evaluated.
    context: Window length of the model.
    steps: Number of optimiser steps.
    batch_size: Windows per step.
    learning_rate: Initial Adam step size (cosine-decayed to 0, see
      `make_optimizer`).
    seed: Seed of the batches.
    log_every: Print the losses every this many steps (default: steps // 6).
    stream: Where the loss lines go (default ``sys.stdout``).
    progress: Where the progress bar goes (default ``sys.stderr``); no bar
      is drawn unless it is a terminal (see `progress_bar`).

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
  optimizer = make_optimizer(learning_rate, steps)
  step = make_train_step(
    unbound, optimizer, batch_size=batch_size, context=context
  )
  evaluate = make_evaluator(
    unbound, [train_ids, valid_ids], context=context, seed=seed
  )
  stream = sys.stdout if stream is None else stream
  log_every = log_every or max(1, steps // 6)
  log = TrainingLog()

  def record(i, values, bar):
    train_loss, valid_loss = evaluate(values)
    log.evals.append((i, train_loss, valid_loss))
    bar.write(
      f"step {i:>4}/{steps}  train loss {train_loss:.3f}"
      f"  valid loss {valid_loss:.3f}",
      file=stream,
    )
    stream.flush()

  ids, key = jnp.asarray(train_ids), jax.random.key(seed)
  opt_state = jax.jit(optimizer.init)(values)  # one compile for all params
  losses = []
  with progress_bar(steps, progress) as bar:
    record(0, values, bar)
    for i in range(1, steps + 1):
      values, opt_state, key, loss = step(values, opt_state, key, ids)
      losses.append(loss)
      bar.update()
      if not bar.disable and i % 10 == 0:  # waits for the step: only if shown
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
      if i % log_every == 0 or i == steps:
        record(i, values, bar)
  log.losses = [float(loss) for loss in jax.device_get(losses)]
  return pz.bind_variables(unbound, values, unfreeze_as_copy=True), log


def generate(
  model: pz.nn.Sequential,
  vocab: ne.Vocabulary,
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
    vocab: Its `named_embed.Vocabulary` of characters; ``prompt`` and a
      space must be in it (a short prompt is padded with spaces on the
      left).
    prompt: The start of the text.
    context: Window length of the model.
    length: Number of characters to add.
    seed: Seed of the sampling.
    temperature: Divides the logits; lower is greedier.

  Returns:
    ``prompt`` followed by ``length`` sampled characters.

  Example:

  >>> from named_embed.demo.model import ModelConfig, init_model
  >>> from named_embed.demo.text import char_vocabulary
  >>> vocab = char_vocabulary("abcd ")
  >>> model = init_model(ModelConfig(vocab_size=5, context=2, embedding=4,
  ...                                hidden=6))
  >>> text = generate(model, vocab, "ab", context=2, length=5)
  >>> len(text), set(text) <= set("abcd ")
  (7, True)
  """
  unbound, values = pz.unbind_params(model, freeze=True)
  window = jnp.asarray(encode(vocab, prompt.rjust(context)[-context:]))
  key = jax.random.key(seed)
  ids = _sample(unbound, values, window, key, temperature, length=length)
  return prompt + decode(vocab, np.asarray(ids))


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
