"""MAML and its family: first-order MAML, ANIL and Meta-SGD."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn.metalearners._base import MetaLearner, adaptation_learner
from metalearn.metalearners._inner import inner_optimize, scale_by_rates
from metalearn.models import Model
from metalearn.types import Episode

PyTree = Any


class MetaSGDParams(NamedTuple):
  """Meta-SGD's meta-parameters: an initialisation and a learning rate per
  parameter, both meta-learned."""

  model: PyTree
  inner_lr: PyTree


def check_inner(inner_lr, num_inner_steps, name="inner"):
  """Raises ``ValueError`` for a step size <= 0 or a bad number of steps.

  A traced step size (a population of runs sweeping it,
  :func:`~metalearn.training.make_population_step`) is not checked here:
  the population checks each member's concrete value before tracing.
  """
  if not isinstance(inner_lr, jax.core.Tracer) and not inner_lr > 0:
    raise ValueError(f"{name}_lr must be > 0, got {inner_lr}")
  if not isinstance(num_inner_steps, int) or num_inner_steps < 0:
    raise ValueError(
        f"num_{name}_steps must be an int >= 0, got {num_inner_steps!r}"
    )


def _init(model):
  def init(key, episode: Episode):
    return model.init(key, episode.support_x)

  return init


def maml(
    model: Model,
    inner_lr: float = 0.4,
    num_inner_steps: int = 1,
    *,
    first_order: bool = False,
    eval_inner_lr: float | None = None,
    eval_num_inner_steps: int | None = None,
    adapt_only: str | None = None,
    remat: bool | str = False,
) -> MetaLearner:
  r"""Model-Agnostic Meta-Learning.

  Learns an initialisation :math:`\theta` from which a few steps of gradient
  descent on a task's support set give low loss on its query set:

  .. math::
    \phi = \theta - \alpha \nabla_\theta L_{support}(\theta), \qquad
    \min_\theta \; \mathbb{E}_\tau \, L_{query}(\phi).

  The meta-gradient differentiates through the inner steps (second order);
  ``first_order=True`` stops the gradient through the inner gradients,
  which drops the Hessian term (first-order MAML).

  Batch norm follows the model's ``norm``. With ``"transductive"`` (Finn
  et al.'s code) every forward pass, at meta-test too, uses the statistics
  of the batch at hand. With ``"running"`` the meta-parameters are
  :class:`WithModelState`: in meta-training each inner step on the
  support set and then the query pass use batch statistics and move the
  running statistics in that order (the meta-step keeps the tasks' mean);
  meta-test adaptation and evaluation use the stored statistics alone and
  leave them unchanged (:func:`adaptation_learner`). ANIL and Meta-SGD do
  the same. Adapting at meta-test on statistics other than those it
  meta-trained on makes MAML fail there (22.6% on Omniglot 5-way 1-shot
  against 96.7% transductive), so building it so warns. ``"support"``
  is the non-transductive mode that works: adaptation on the support set's
  own statistics, queries normalised with them, in meta-training and at
  test alike (:func:`adaptation_learner`).

  Args:
    model: the network; its output size is the number of ways.
    inner_lr: the inner step size :math:`\alpha` during meta-training.
    num_inner_steps: inner steps during meta-training.
    first_order: use the first-order approximation.
    eval_inner_lr: the step size at meta-test time (default: ``inner_lr``).
    eval_num_inner_steps: inner steps at meta-test time (default:
      ``num_inner_steps``; Finn et al. use 10 on Mini-ImageNet).
    adapt_only: adapt only this top-level parameter sub-tree (``"head"`` is
      ANIL); ``None`` adapts everything.
    remat: recompute each inner step in the meta-gradient's backward pass
      instead of storing its activations (``True``), and also group the
      steps into rematerialised chunks (``"nested"``), so memory hardly
      grows with ``num_inner_steps`` (:func:`inner_optimize`); same
      results, slower.

  Returns:
    A :class:`MetaLearner` whose meta-parameters are the model's params.

  Examples:
    >>> import jax
    >>> from metalearn import models, tasks
    >>> sampler = tasks.sinusoid_sampler(num_shots=10, num_queries=10)
    >>> ep = sampler.sample(jax.random.key(0), None)
    >>> learner = maml(models.mlp(), inner_lr=0.01, num_inner_steps=1)
    >>> params = learner.init(jax.random.key(1), ep)
    >>> grads, metrics = learner.meta_grad(params, ep, jax.random.key(2))
    >>> sorted(metrics)
    ['outer/loss']

  References:
    Finn, Abbeel & Levine, `Model-Agnostic Meta-Learning for Fast Adaptation
    of Deep Networks <https://arxiv.org/abs/1703.03400>`_, 2017.
  """
  check_inner(inner_lr, num_inner_steps)
  eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  check_inner(eval_inner_lr, eval_num_inner_steps, "eval_inner")

  def inner(params, model_state, episode: Episode, key, training: bool):
    del key
    return inner_optimize(
        model, optax.sgd(inner_lr if training else eval_inner_lr), params,
        episode.support_x, episode.support_y,
        num_steps=num_inner_steps if training else eval_num_inner_steps,
        first_order=first_order or not training, mask=adapt_only,
        model_state=model_state, training=training,
        remat=remat if training else False)

  return adaptation_learner(model, _init(model), inner)


def anil(
    model: Model,
    inner_lr: float = 0.4,
    num_inner_steps: int = 1,
    *,
    first_order: bool = False,
    eval_inner_lr: float | None = None,
    eval_num_inner_steps: int | None = None,
    remat: bool | str = False,
) -> MetaLearner:
  """Almost No Inner Loop: MAML that adapts only the final layer.

  The body is meta-learned as a feature extractor; only the parameters
  under ``"head"`` change in the inner loop. Arguments are as in
  :func:`maml`.

  References:
    Raghu, Raghu, Bengio & Vinyals, `Rapid Learning or Feature Reuse?
    Towards Understanding the Effectiveness of MAML
    <https://arxiv.org/abs/1909.09157>`_, 2020.
  """
  return maml(
      model,
      inner_lr,
      num_inner_steps,
      first_order=first_order,
      eval_inner_lr=eval_inner_lr,
      eval_num_inner_steps=eval_num_inner_steps,
      adapt_only="head",
      remat=remat,
  )


def metasgd(
    model: Model,
    inner_lr: float = 0.4,
    num_inner_steps: int = 1,
    *,
    first_order: bool = False,
    eval_num_inner_steps: int | None = None,
    remat: bool | str = False,
    inner_lr_range: tuple[float, float] | None = None,
) -> MetaLearner:
  r"""Meta-SGD: MAML with a meta-learned step size for every parameter.

  The inner update is :math:`\phi = \theta - \alpha \odot \nabla L(\theta)`
  with :math:`\alpha` a pytree shaped like :math:`\theta`, initialised to
  ``inner_lr`` (or drawn from ``inner_lr_range``) and meta-learned together
  with :math:`\theta`.

  Args:
    model: the network.
    inner_lr: the initial value of every per-parameter step size.
    inner_lr_range: ``(low, high)``: draw each step size uniformly from
      it instead (Li et al. draw from ``[0.005, 0.1]``); ``None`` uses
      ``inner_lr``.
    num_inner_steps: inner steps (Li et al. use 1).
    first_order: drop second-order terms.
    eval_num_inner_steps: inner steps at meta-test time.
    remat: as in :func:`maml`.

  Returns:
    A :class:`MetaLearner` whose meta-parameters are
    :class:`MetaSGDParams`.

  References:
    Li, Zhou, Chen & Li, `Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning <https://arxiv.org/abs/1707.09835>`_, 2017.
  """
  check_inner(inner_lr, num_inner_steps)
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  check_inner(inner_lr, eval_num_inner_steps, "eval_inner")
  if inner_lr_range is not None:
    low, high = inner_lr_range
    if not 0 < low <= high:
      raise ValueError(
          f"inner_lr_range must be (low, high) with 0 < low <= high, got "
          f"{inner_lr_range!r}")

  def init(key, episode: Episode):
    params = model.init(key, episode.support_x)
    if inner_lr_range is None:
      lrs = jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params)
    else:
      # Its own key: the model's initialisation is as with constant rates.
      leaves, treedef = jax.tree.flatten(params)
      keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
      lrs = treedef.unflatten([
          jax.random.uniform(k, p.shape, p.dtype, low, high)
          for k, p in zip(keys, leaves, strict=True)])
    return MetaSGDParams(params, lrs)

  def inner(params, model_state, episode: Episode, key, training: bool):
    del key
    return inner_optimize(
        model, scale_by_rates(params.inner_lr), params.model,
        episode.support_x, episode.support_y,
        num_steps=num_inner_steps if training else eval_num_inner_steps,
        first_order=first_order or not training, model_state=model_state,
        training=training, remat=remat if training else False)

  return adaptation_learner(model, init, inner)
