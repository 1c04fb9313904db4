"""Few-shot meta-learners whose inner loop is a learned optimiser."""

from typing import Any, NamedTuple

import jax
import optax

from metalearn.learned_optimizers._base import LearnedOptimizer
from metalearn.learned_optimizers._meta_lstm import meta_lstm_optimizer
from metalearn.metalearners import (
    MetaLearner,
    adaptation_learner,
    inner_optimize,
)
from metalearn.models import Model
from metalearn.types import Episode

PyTree = Any


class LearnedOptimizerLearnerParams(NamedTuple):
  """Meta-parameters: the model's initialisation and the optimiser's theta,
  both meta-learned."""

  model: PyTree
  theta: PyTree


def inner_loop(
    model: Model,
    tx: optax.GradientTransformation,
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    num_steps: int,
    first_order: bool = False,
) -> PyTree:
  """Runs ``num_steps`` of ``tx`` on one task's data, as a ``lax.scan``.

  The loss is passed to ``tx.update`` as the ``value`` extra argument. A
  thin wrapper over :func:`metalearn.metalearners.inner_optimize` (which
  also masks parameters, mini-batches, threads a model's state and returns
  the optimiser's state).

  Args:
    model: the network.
    tx: any optax transformation (a learned optimiser's, or a chain).
    params: the starting parameters.
    x: inputs.
    y: targets (int labels or float regression targets).
    num_steps: number of steps (static).
    first_order: stop the gradient through the inner gradients and loss
      values fed to ``tx`` (the approximation of Ravi & Larochelle).

  Returns:
    The adapted parameters.
  """
  return inner_optimize(model, tx, params, x, y, num_steps=num_steps,
                        first_order=first_order).params


def learned_optimizer_learner(
    model: Model,
    learned_optimizer: LearnedOptimizer,
    num_inner_steps: int = 5,
    *,
    first_order: bool = False,
    eval_num_inner_steps: int | None = None,
    remat: bool | str = False,
) -> MetaLearner:
  r"""A few-shot learner that meta-learns an initialisation and an optimiser.

  The inner loop runs ``num_inner_steps`` of the learned optimiser's
  transformation on the support set from the meta-learned initialisation;
  the outer loss is the query loss of the result, differentiated with
  respect to both (the default ``meta_grad``), so
  :func:`metalearn.training.make_meta_step` trains it unchanged. A model
  with ``norm="running"`` keeps its running statistics as carried
  meta-state, moved by every training forward pass (each inner step, then
  the query set) and used alone at meta-test
  (:func:`metalearn.metalearners.adaptation_learner`).

  Args:
    model: the network.
    learned_optimizer: the inner-loop update rule.
    num_inner_steps: inner steps during meta-training.
    first_order: ignore the dependence of the inner gradients and losses on
      the meta-parameters (the meta-gradient still flows through the
      parameters and the optimiser's outputs).
    eval_num_inner_steps: inner steps at meta-test time.
    remat: ``True`` or ``"nested"``: recompute the inner steps in the
      meta-gradient's backward pass instead of storing their activations
      (:func:`metalearn.metalearners.inner_optimize`).

  Returns:
    A :class:`~metalearn.metalearners.MetaLearner` whose meta-parameters
    are :class:`LearnedOptimizerLearnerParams`.

  References:
    Ravi & Larochelle, `Optimization as a Model for Few-Shot Learning
    <https://openreview.net/forum?id=rJY0-Kcll>`_, 2017.
  """
  for name, value in (("num_inner_steps", num_inner_steps),
                      ("eval_num_inner_steps", eval_num_inner_steps)):
    if value is not None and (not isinstance(value, int) or value < 0):
      raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  if eval_num_inner_steps is None:
    eval_num_inner_steps = num_inner_steps

  def init(key, episode: Episode):
    model_key, opt_key = jax.random.split(key)
    return LearnedOptimizerLearnerParams(
        model.init(model_key, episode.support_x),
        learned_optimizer.init(opt_key),
    )

  def inner(params, model_state, episode: Episode, key, training: bool):
    del key
    return inner_optimize(
        model,
        learned_optimizer.opt_fn(params.theta),
        params.model,
        episode.support_x,
        episode.support_y,
        num_steps=num_inner_steps if training else eval_num_inner_steps,
        first_order=first_order or not training,
        model_state=model_state,
        training=training,
        remat=remat if training else False,
    )

  return adaptation_learner(model, init, inner)


def meta_lstm(
    model: Model,
    num_inner_steps: int = 5,
    *,
    init_lr: float = 0.1,
    init_forget_bias: float = 5.0,
    first_order: bool = True,
    eval_num_inner_steps: int | None = None,
    remat: bool | str = False,
) -> MetaLearner:
  r"""The Meta-LSTM few-shot learner of Ravi & Larochelle (2017).

  Meta-learns the learner's initialisation (the LSTM's initial cell state)
  together with the gates of :func:`meta_lstm_optimizer`, which set a
  per-coordinate, per-step learning rate (input gate) and shrinkage
  (forget gate) from the gradient, the loss, the parameter and the
  previous gate. As in the paper, ``first_order=True`` drops the
  dependence of the inner gradients and losses on the meta-parameters.

  Deviations from the paper (a simplified but faithful variant): no first
  LSTM layer before the gates, no input batch normalisation, and the inner
  loop takes full-batch steps on the support set for a fixed number of
  steps; the model's batch norm follows its ``norm`` (``"transductive"``:
  the statistics of the batch it is given, at test too; ``"running"``: as
  :func:`learned_optimizer_learner`).

  Args:
    model: the network, e.g. ``models.conv4(num_ways)``.
    num_inner_steps: inner steps during meta-training.
    init_lr: the initial input gate (step size).
    init_forget_bias: the initial forget-gate bias.
    first_order: the paper's approximation.
    eval_num_inner_steps: inner steps at meta-test time.
    remat: as in :func:`learned_optimizer_learner`.

  Returns:
    A :class:`~metalearn.metalearners.MetaLearner`; its meta-parameters are
    :class:`LearnedOptimizerLearnerParams` ``(model, theta)``.

  Examples:
    >>> import jax
    >>> from metalearn import models, tasks
    >>> sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
    >>> ep = sampler.sample(jax.random.key(0), None)
    >>> learner = meta_lstm(models.mlp(), num_inner_steps=2)
    >>> meta_params = learner.init(jax.random.key(1), ep)
    >>> grads, metrics = learner.meta_grad(meta_params, ep, jax.random.key(2))
    >>> sorted(metrics)
    ['outer/loss']

  References:
    Ravi & Larochelle, `Optimization as a Model for Few-Shot Learning
    <https://openreview.net/forum?id=rJY0-Kcll>`_, 2017.
  """
  return learned_optimizer_learner(
      model,
      meta_lstm_optimizer(init_lr, init_forget_bias),
      num_inner_steps,
      first_order=first_order,
      eval_num_inner_steps=eval_num_inner_steps,
      remat=remat,
  )
