"""The outer (meta-training) step of a learned optimiser on a task family."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn.learned_optimizers._base import LearnedOptimizer
from metalearn.learned_optimizers._estimators import GradientEstimator

PyTree = Any


class OuterState(NamedTuple):
  """Everything that changes during meta-training; arrays only.

  Attributes:
    step: outer steps taken (int32 scalar).
    theta: the learned optimiser's meta-parameters.
    opt_state: the meta-optimiser's state.
    estimator_state: the estimator's particles (inner runs carried across
      truncations).
  """

  step: jax.Array
  theta: PyTree
  opt_state: PyTree
  estimator_state: PyTree


def init_outer_state(
    learned_optimizer: LearnedOptimizer,
    estimator: GradientEstimator,
    meta_optimizer: optax.GradientTransformation,
    key: jax.Array,
    data: PyTree = None,
) -> OuterState:
  """Initialises theta, the meta-optimiser and the estimator's particles.

  Args:
    learned_optimizer: what is learned.
    estimator: how its meta-gradient is estimated.
    meta_optimizer: the outer optax optimiser.
    key: ``fold_in(key, 0)`` draws theta, ``fold_in(key, 1)`` the
      particles.
    data: the task family's data.

  Returns:
    The initial :class:`OuterState`.
  """
  theta = learned_optimizer.init(jax.random.fold_in(key, 0))
  particles = estimator.init(theta, jax.random.fold_in(key, 1), data)
  return OuterState(
      jnp.zeros((), jnp.int32), theta, meta_optimizer.init(theta), particles
  )


def make_outer_step(
    estimator: GradientEstimator,
    meta_optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int = 1,
):
  """Builds the jitted outer step: estimate the meta-gradient, apply it.

  Step ``t`` draws its randomness from ``jax.random.fold_in(key, t)``, so a
  resumed run continues exactly as an uninterrupted one.

  Args:
    estimator: a :class:`GradientEstimator` (e.g. :func:`pes` or
      :func:`truncated_backprop` of a :func:`truncated_unroll`).
    meta_optimizer: the outer optimiser (clip the meta-gradient, as ES
      estimates can be heavy-tailed: ``optax.chain(
      optax.clip_by_global_norm(1.0), optax.adam(1e-3))``).
    steps_per_call: outer steps per call, in a ``lax.scan``.

  Returns:
    ``step(state, data, key) -> (state, metrics)``, jitted with ``state``
    donated; ``metrics`` (``meta_loss``, ``grad_norm``) are those of the
    last step.

  Examples:
    >>> import jax, optax
    >>> from metalearn import models, tasks
    >>> from metalearn import learned_optimizers as lo
    >>> family = lo.model_task_family(
    ...     models.mlp(hidden=(8,)), tasks.sinusoid_sampler(num_shots=10))
    >>> lopt = lo.learnable_sgd(0.01)
    >>> unroll = lo.truncated_unroll(family, lopt, truncation_length=2,
    ...                              horizon=4)
    >>> estimator = lo.pes(unroll, num_pairs=2)
    >>> tx = optax.adam(1e-2)
    >>> state = lo.init_outer_state(lopt, estimator, tx, jax.random.key(0))
    >>> step = lo.make_outer_step(estimator, tx)
    >>> state, metrics = step(state, family.data, jax.random.key(1))
    >>> int(state.step), sorted(metrics)
    (1, ['grad_norm', 'meta_loss', 'nonfinite'])
  """
  if not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call!r}")

  def one_step(state: OuterState, data, key):
    step_key = jax.random.fold_in(key, state.step)
    grads, particles, metrics = estimator.grad(
        state.theta, state.estimator_state, step_key, data
    )
    updates, opt_state = meta_optimizer.update(
        grads, state.opt_state, state.theta
    )
    theta = optax.apply_updates(state.theta, updates)
    grad_norm = jnp.sqrt(
        sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    )
    metrics = {**metrics, "grad_norm": grad_norm}
    return OuterState(state.step + 1, theta, opt_state, particles), metrics

  def step(state, data, key):
    if steps_per_call == 1:
      return one_step(state, data, key)
    state, metrics = jax.lax.scan(
        lambda s, _: one_step(s, data, key), state, None,
        length=steps_per_call,
    )
    return state, jax.tree.map(lambda m: m[-1], metrics)

  return jax.jit(step, donate_argnums=(0,))


def outer_train(
    step: Callable[..., tuple[OuterState, dict[str, jax.Array]]],
    state: OuterState,
    *,
    key: jax.Array,
    num_steps: int,
    data: PyTree = None,
) -> tuple[OuterState, list[dict[str, float]]]:
  """Runs outer steps until ``state.step`` reaches ``num_steps``.

  Building ``step`` once (:func:`make_outer_step`) and calling this for
  several runs compiles once.

  Args:
    step: from :func:`make_outer_step`.
    state: from :func:`init_outer_state`, or a saved state to resume (the
      run stops at the same total, with the same result).
    key: the run's key, passed to every ``step``.
    num_steps: the total number of outer steps; with ``steps_per_call``
      steps per call, a multiple of it.
    data: the task family's data.

  Returns:
    The final state and, per call, the metrics of its last step with its
    ``step``.

  Raises:
    FloatingPointError: if theta becomes non-finite.

  Examples:
    >>> import jax, optax
    >>> from metalearn import models, tasks
    >>> from metalearn import learned_optimizers as lo
    >>> family = lo.model_task_family(
    ...     models.mlp(hidden=(8,)), tasks.sinusoid_sampler(num_shots=10))
    >>> lopt = lo.learnable_sgd(0.01)
    >>> unroll = lo.truncated_unroll(family, lopt, truncation_length=2,
    ...                              horizon=4)
    >>> estimator = lo.truncated_backprop(unroll, num_particles=2)
    >>> tx = optax.adam(1e-2)
    >>> state = lo.init_outer_state(lopt, estimator, tx, jax.random.key(0))
    >>> step = lo.make_outer_step(estimator, tx)
    >>> state, history = lo.outer_train(step, state, key=jax.random.key(1),
    ...                                 num_steps=3)
    >>> [h["step"] for h in history]
    [1, 2, 3]
  """
  history = []
  while int(state.step) < num_steps:
    state, metrics = step(state, data, key)
    record = {k: float(v) for k, v in metrics.items()}
    history.append({"step": int(state.step), **record})
    if not all(bool(jnp.all(jnp.isfinite(x)))
               for x in jax.tree.leaves(state.theta)):
      raise FloatingPointError(f"theta is not finite at step {state.step}")
  return state, history
