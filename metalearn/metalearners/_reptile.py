"""Reptile: a first-order meta-learner that follows the adapted weights."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn import models
from metalearn.metalearners._base import (
    MetaLearner,
    WithModelState,
    adapted_model,
    make_learner,
    task_loss,
    with_model_state,
)
from metalearn.metalearners._inner import inner_optimize
from metalearn.metalearners._maml import check_inner
from metalearn.models import Model
from metalearn.types import Episode

PyTree = Any


class ReptileParams(NamedTuple):
  """Reptile's meta-state with ``carry_inner_state=True``: the initialisation
  (learned) and the inner optimiser's state (carried between tasks and
  meta-steps, not learned: :attr:`MetaLearner.carried`)."""

  model: PyTree
  inner_state: PyTree


def reptile(
    model: Model,
    inner_lr: float = 0.001,
    num_inner_steps: int = 5,
    *,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_batch_size: int | None = None,
    eval_inner_lr: float | None = None,
    eval_num_inner_steps: int | None = None,
    eval_inner_batch_size: int | None = None,
    carry_inner_state: bool = False,
) -> MetaLearner:
  r"""Reptile: move the initialisation towards the task-adapted weights.

  Its meta-gradient estimate for one task is :math:`\theta - \phi`, where
  :math:`\phi` is the result of ``num_inner_steps`` of the inner optimiser
  on the support set; averaged over tasks and applied with
  ``optax.sgd(epsilon)`` this is the batched Reptile update
  :math:`\theta \leftarrow \theta + \epsilon\,
  \mathrm{mean}_\tau(\phi_\tau - \theta)`. No gradient flows through the
  inner loop.

  Reptile learns from the differences between the inner steps' batches
  (Nichol et al.'s analysis: the gradient inner product between
  mini-batches): with every step on the same few examples (full batch on
  a 1-shot support set) it has little to learn from. Nichol et al.
  meta-train on more examples per class than the test shots
  (``task.train_num_shots``, 9-15 in their commands), in mini-batches
  (``inner_batch_size``), with Adam of ``b1=0`` as the inner optimiser
  (``inner_optimizer``); ``configs/experiment/*_reptile.yaml`` take each
  of their commands' values.

  Args:
    model: the network.
    inner_lr: inner SGD step size (when ``inner_optimizer`` is ``None``).
    num_inner_steps: inner steps during meta-training.
    inner_optimizer: an optax transformation for the inner loop, in
      meta-training and at test, with a fresh state per task unless
      ``carry_inner_state``; ``None`` is ``optax.sgd(inner_lr)``
      (``eval_inner_lr`` at test).
    inner_batch_size: examples per inner step in meta-training, drawn
      without replacement (reshuffled each pass); ``None`` uses the whole
      support set every step.
    eval_inner_lr: SGD step size at meta-test time (default ``inner_lr``);
      not with ``inner_optimizer``.
    eval_num_inner_steps: inner steps at meta-test time.
    eval_inner_batch_size: examples per inner step at meta-test time
      (default: the whole support set).
    carry_inner_state: keep one ``inner_optimizer`` state across tasks and
      meta-steps instead of a fresh one per task, as Nichol et al.'s code
      does (its Adam moments persist through meta-training and into the
      test). The meta-parameters become :class:`ReptileParams`; every task
      of a meta-batch starts from the carried state and the meta-step
      sets it to the tasks' mean final state (:attr:`MetaLearner.carried`),
      the batched form of their one-task-after-another loop. Meta-test
      adaptation starts from it and leaves it unchanged.

  With a model of ``norm="running"`` the meta-parameters are
  :class:`WithModelState`: the inner steps of meta-training use batch
  statistics and move the running statistics (the query set, scored only
  for the metrics, does not); meta-test adaptation and evaluation use the
  stored statistics alone. With ``norm="support"`` nothing is carried:
  every inner step uses the statistics of its own batch, and the queries
  are normalised with the support set's statistics under the adapted
  weights (task parameters :class:`WithModelState` ``(weights,
  statistics)``), in meta-training's metrics and at test alike.

  Returns:
    A :class:`MetaLearner`; its metrics score the adapted weights on the
    query set.

  References:
    Nichol, Achiam & Schulman, `On First-Order Meta-Learning Algorithms
    <https://arxiv.org/abs/1803.02999>`_, 2018.
  """
  check_inner(inner_lr, num_inner_steps)
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  if inner_optimizer is not None and eval_inner_lr is not None:
    raise ValueError(
        "eval_inner_lr applies to the inner SGD; with an inner_optimizer, "
        "test adaptation uses that optimiser (set its step size there)")
  eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
  check_inner(eval_inner_lr, eval_num_inner_steps, "eval_inner")
  for name, size in (("inner_batch_size", inner_batch_size),
                     ("eval_inner_batch_size", eval_inner_batch_size)):
    if size is not None and (not isinstance(size, int) or size < 1):
      raise ValueError(f"{name} must be an int >= 1 or None, got {size!r}")
  if carry_inner_state and inner_optimizer is None:
    raise ValueError(
        "carry_inner_state needs an inner_optimizer with state (plain SGD "
        "has none to carry), e.g. optax.adam(1e-3, b1=0.0)")
  train_tx, eval_tx = (
      (optax.sgd(inner_lr), optax.sgd(eval_inner_lr))
      if inner_optimizer is None else (inner_optimizer, inner_optimizer))

  support = models.uses_support_statistics(model)
  stateful = models.has_state(model) and not support

  def init(key, episode: Episode):
    params = model.init(key, episode.support_x)
    if carry_inner_state:
      params = ReptileParams(params, train_tx.init(params))
    if stateful:
      params = WithModelState(params,
                              model.init_state(key, episode.support_x))
    return params

  def split(meta_params):
    """(model params, inner optimiser state, model state)."""
    model_state = None
    if stateful:
      meta_params, model_state = meta_params
    if carry_inner_state:
      return meta_params.model, meta_params.inner_state, model_state
    return meta_params, None, model_state

  def inner(meta_params, episode: Episode, key, training: bool):
    params, opt_state, model_state = split(meta_params)
    return inner_optimize(
        model, train_tx if training else eval_tx, params,
        episode.support_x, episode.support_y,
        num_steps=num_inner_steps if training else eval_num_inner_steps,
        opt_state=opt_state, model_state=model_state, training=training,
        batch_size=inner_batch_size if training else eval_inner_batch_size,
        key=key)

  run = adapted_model(model)

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    return run.task(inner(meta_params, episode, key, training)[0],
                    episode.support_x)

  def predict(meta_params, task_params, x):
    return run.predict(split(meta_params)[2], task_params, x)

  def evaluate(meta_params, task_params, episode: Episode):
    return task_loss(predict(meta_params, task_params, episode.query_x),
                     episode.query_y)

  def meta_grad(meta_params, episode: Episode, key):
    adapted, opt_state, model_state = jax.lax.stop_gradient(
        inner(meta_params, episode, key, True))
    # Metrics with the training forward; the query set does not move the
    # running statistics (Reptile trains on the inner steps alone).
    if support:
      out = predict(meta_params, run.task(adapted, episode.support_x),
                    episode.query_x)
    else:
      out = models.forward(model, adapted, model_state, episode.query_x,
                           training=True)[0]
    _, metrics = task_loss(out, episode.query_y)
    grads = jax.tree.map(jnp.subtract, split(meta_params)[0], adapted)
    # The carried entries are the task's new values (MetaLearner.carried).
    if carry_inner_state:
      grads = ReptileParams(grads, opt_state)
    if stateful:
      grads = WithModelState(grads, model_state)
    return grads, metrics

  def carried_inner(meta_params):
    return ReptileParams(jax.tree.map(lambda _: False, meta_params.model),
                         jax.tree.map(lambda _: True,
                                      meta_params.inner_state))

  carried = carried_inner if carry_inner_state else None
  if stateful:
    carried = with_model_state(carried)
  return make_learner(init, adapt, evaluate, meta_grad, carried, predict,
                      model.transductive, head=True)
