"""A hand-written Adam optimiser with a cosine learning-rate schedule."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from named_embed.demo.settings import DEFAULT_LEARNING_RATE


class AdamState(NamedTuple):
  """State of `adam_update`: the step count and both moment estimates.

  Example:

  >>> state = adam_init({"w": jnp.ones(2)})
  >>> int(state.count), state.nu["w"].tolist()
  (0, [0.0, 0.0])

  Attributes:
    count: Number of steps taken, an int32 scalar.
    mu: First-moment estimates, with the structure of the parameters.
    nu: Second-moment estimates, with the structure of the parameters.
  """

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
