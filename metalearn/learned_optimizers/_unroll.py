"""Inner problems for meta-training learned optimisers: task families and
truncated unrolls of training on them."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn.learned_optimizers._base import LearnedOptimizer
from metalearn.metalearners import task_loss
from metalearn.models import Model
from metalearn.tasks import TaskSampler
from metalearn.types import Episode

PyTree = Any
OBJECTIVES = ("train", "eval")
_TINY = 1e-10


class TaskFamily(NamedTuple):
  """A distribution over training problems, as pure functions.

  Attributes:
    sample: ``sample(key, data) -> task``, a pytree fixed for one inner
      training run (for example an :class:`~metalearn.types.Episode`).
    init: ``init(key, task) -> params``.
    loss: ``loss(params, task, key) -> scalar``, the training loss the
      inner optimiser minimises (``key`` draws a minibatch; ``None``
      means the whole training set).
    eval_loss: ``eval_loss(params, task) -> scalar``, a held-out loss.
    data: the arrays ``sample`` reads (``None`` for synthetic families),
      passed in rather than closed over, as in
      :class:`~metalearn.tasks.TaskSampler`.
  """

  sample: Callable[[jax.Array, PyTree], PyTree]
  init: Callable[[jax.Array, PyTree], PyTree]
  loss: Callable[[PyTree, PyTree, jax.Array], jax.Array]
  eval_loss: Callable[[PyTree, PyTree], jax.Array]
  data: PyTree


def model_task_family(
    model: Model, sampler: TaskSampler, *, batch_size: int | None = None
) -> TaskFamily:
  """Training ``model`` on the support set of episodes from ``sampler``.

  Every task is one episode: the inner optimiser trains a freshly
  initialised ``model`` on its support set (minibatches of ``batch_size``
  drawn without replacement, or the full set), and its query set is the
  held-out data of ``eval_loss``. Cross-entropy for labels, mean squared
  error for regression (:func:`metalearn.metalearners.task_loss`).

  Args:
    model: the network trained in the inner loop.
    sampler: the episodes, e.g. ``tasks.sinusoid_sampler(num_shots=100)``
      or an Omniglot ``tasks.episode_sampler``.
    batch_size: minibatch size, or ``None`` for full-batch training.

  Returns:
    A :class:`TaskFamily` whose tasks are episodes.

  Examples:
    >>> import jax
    >>> from metalearn import models, tasks
    >>> family = model_task_family(
    ...     models.mlp(), tasks.sinusoid_sampler(num_shots=20), batch_size=5)
    >>> task = family.sample(jax.random.key(0), family.data)
    >>> params = family.init(jax.random.key(1), task)
    >>> family.loss(params, task, jax.random.key(2)).shape
    ()
  """
  if batch_size is not None and (
      not isinstance(batch_size, int) or batch_size < 1
  ):
    raise ValueError(f"batch_size must be an int >= 1 or None, got "
                     f"{batch_size!r}")

  def init(key, task: Episode):
    return model.init(key, task.support_x)

  def loss(params, task: Episode, key):
    x, y = task.support_x, task.support_y
    if batch_size is not None and key is not None:
      if batch_size > x.shape[0]:
        raise ValueError(f"batch_size={batch_size} exceeds the "
                         f"{x.shape[0]} support examples of a task")
      idx = jax.random.choice(key, x.shape[0], (batch_size,), replace=False)
      x, y = x[idx], y[idx]
    return task_loss(model.apply(params, x), y)[0]

  def eval_loss(params, task: Episode):
    return task_loss(model.apply(params, task.query_x), task.query_y)[0]

  return TaskFamily(sampler.sample, init, loss, eval_loss, sampler.data)


class InnerState(NamedTuple):
  """The state of one inner training run, carried across truncations.

  Attributes:
    params: the inner model's parameters.
    opt_state: the inner optimiser's state.
    step: inner steps taken on this task (int32 scalar).
    task: the task being trained on (fixed until the run is reset).
  """

  params: PyTree
  opt_state: PyTree
  step: jax.Array
  task: PyTree


class TruncatedUnroll(NamedTuple):
  """What is learned: a learned optimiser training on a task family, cut
  into truncations. Gradient estimators see only this.

  Attributes:
    init: ``init(theta, key, data) -> InnerState``, a fresh inner run.
    unroll: ``unroll(theta, state, key, data) -> (state, meta_loss)``:
      resets the run first if it has reached the horizon, then takes
      ``truncation_length`` steps. ``meta_loss`` is the mean over those
      steps of the objective after each step.
    truncation_length: inner steps per truncation.
    horizon: inner steps per task before a reset (a multiple of
      ``truncation_length``, so resets fall between truncations).
    advance: ``advance(theta, state, key, data, num_steps) -> (state,
      losses)``: takes ``num_steps`` (static) further steps of the same
      step as ``unroll``, never resetting (past the horizon it keeps
      training the task); ``losses`` ``[num_steps]`` is the objective
      after each step. Bootstrapped targets (:func:`bootstrapped`) are
      built with it; ``None`` for unrolls that cannot advance.
    meta_loss: ``meta_loss(params, task, key) -> scalar``, the objective
      ``unroll`` measures after each step (``None`` if unknown).
  """

  init: Callable[[PyTree, jax.Array, PyTree], InnerState]
  unroll: Callable[..., tuple[InnerState, jax.Array]]
  truncation_length: int
  horizon: int
  advance: Callable[..., tuple[InnerState, jax.Array]] | None = None
  meta_loss: Callable[[PyTree, PyTree, jax.Array], jax.Array] | None = None


def truncated_unroll(
    task_family: TaskFamily,
    learned_optimizer: LearnedOptimizer,
    *,
    truncation_length: int,
    horizon: int,
    objective: str = "train",
    log_loss: bool = False,
) -> TruncatedUnroll:
  """Builds the truncated unroll of ``learned_optimizer`` on a task family.

  At each inner step the optimiser takes one step on the training loss of
  a minibatch; the meta-objective is then measured on the new parameters:
  the training loss of another minibatch (``"train"``, as
  ``learned_optimization`` does by default) or the held-out loss
  (``"eval"``).

  Args:
    task_family: the inner problems.
    learned_optimizer: the update rule being meta-learned.
    truncation_length: inner steps per truncation.
    horizon: inner steps per task (a multiple of ``truncation_length``).
    objective: ``"train"`` or ``"eval"``.
    log_loss: average the logarithm of the objective instead, so that
      tasks whose losses differ in scale (sinusoids of different
      amplitudes) weigh alike and diverging runs do not swamp the
      meta-gradient.

  Returns:
    A :class:`TruncatedUnroll`.
  """
  for name, value in (("truncation_length", truncation_length),
                      ("horizon", horizon)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if horizon % truncation_length:
    raise ValueError(f"horizon={horizon} must be a multiple of "
                     f"truncation_length={truncation_length}")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got "
                     f"{objective!r}")

  def init(theta, key, data):
    task_key, params_key = jax.random.split(key)
    task = task_family.sample(task_key, data)
    params = task_family.init(params_key, task)
    opt_state = learned_optimizer.opt_fn(theta).init(params)
    return InnerState(params, opt_state, jnp.zeros((), jnp.int32), task)

  def meta_loss(params, task, key):
    if objective == "train":
      loss = task_family.loss(params, task, key)
    else:
      loss = task_family.eval_loss(params, task)
    if log_loss:
      loss = jnp.log(jnp.maximum(loss, _TINY))
    return loss

  def advance(theta, state: InnerState, key, data, num_steps):
    del data  # The task is in the state.
    tx = optax.with_extra_args_support(learned_optimizer.opt_fn(theta))

    def step(s: InnerState, k):
      grad_key, meta_key = jax.random.split(k)
      loss, grads = jax.value_and_grad(task_family.loss)(
          s.params, s.task, grad_key
      )
      updates, opt_state = tx.update(grads, s.opt_state, s.params,
                                     value=loss)
      params = optax.apply_updates(s.params, updates)
      return (InnerState(params, opt_state, s.step + 1, s.task),
              meta_loss(params, s.task, meta_key))

    return jax.lax.scan(step, state, jax.random.split(key, num_steps))

  def unroll(theta, state: InnerState, key, data):
    reset_key, steps_key = jax.random.split(key)
    reset = state.step >= horizon
    fresh = init(theta, reset_key, data)
    state = jax.tree.map(lambda a, b: jnp.where(reset, a, b), fresh, state)
    state, losses = advance(theta, state, steps_key, data, truncation_length)
    return state, jnp.mean(losses)

  return TruncatedUnroll(init, unroll, truncation_length, horizon, advance,
                         meta_loss)


def training_curves(
    task_family: TaskFamily,
    tx: optax.GradientTransformation,
    key: jax.Array,
    *,
    num_steps: int,
    data: PyTree = None,
) -> tuple[jax.Array, jax.Array]:
  """Trains one fresh task of the family with any optax transformation.

  Used to compare a learned optimiser (``lopt.opt_fn(theta)``) with
  hand-designed ones on the same task: the task and its initialisation
  depend only on ``key``. ``vmap`` it over keys for many tasks.

  Args:
    task_family: the inner problems.
    tx: the optimiser.
    key: selects the task, the initialisation and the minibatches.
    num_steps: inner steps (static).
    data: the family's data (default: ``task_family.data``).

  Returns:
    ``(train_loss, eval_loss)``, each ``[num_steps + 1]``: the training
    loss (full support set) and the held-out loss before the first step
    and after every step.
  """
  data = task_family.data if data is None else data
  tx = optax.with_extra_args_support(tx)
  task_key, init_key, steps_key = jax.random.split(key, 3)
  task = task_family.sample(task_key, data)
  params = task_family.init(init_key, task)

  def full_losses(params):
    return (task_family.loss(params, task, None),
            task_family.eval_loss(params, task))

  def step(carry, k):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(task_family.loss)(params, task, k)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), full_losses(params)

  keys = jax.random.split(steps_key, num_steps)
  _, (train, held_out) = jax.lax.scan(step, (params, tx.init(params)), keys)
  first_train, first_eval = full_losses(params)
  return (jnp.concatenate([first_train[None], train]),
          jnp.concatenate([first_eval[None], held_out]))
