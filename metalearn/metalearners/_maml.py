"""MAML and its family: first-order MAML, ANIL, Meta-SGD and Reptile."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn import models
from metalearn.metalearners._base import (
    MetaLearner,
    WithModelState,
    adaptation_learner,
    make_learner,
    state_step,
    task_loss,
    with_model_state,
)
from metalearn.models import Model
from metalearn.types import Episode

PyTree = Any


class ReptileParams(NamedTuple):
  """Reptile's meta-state with ``carry_inner_state=True``: the initialisation
  (learned) and the inner optimiser's state (carried between tasks and
  meta-steps, not learned)."""

  model: PyTree
  inner_state: PyTree


class MetaSGDParams(NamedTuple):
  """Meta-SGD's meta-parameters: an initialisation and a learning rate per
  parameter, both meta-learned."""

  model: PyTree
  inner_lr: PyTree


def _check(inner_lr, num_inner_steps, name="inner"):
  if not inner_lr > 0:
    raise ValueError(f"{name}_lr must be > 0, got {inner_lr}")
  if not isinstance(num_inner_steps, int) or num_inner_steps < 0:
    raise ValueError(
        f"num_{name}_steps must be an int >= 0, got {num_inner_steps!r}"
    )


def inner_sgd(
    model: Model,
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    inner_lr: float | PyTree,
    num_steps: int,
    first_order: bool = False,
    trainable: str | None = None,
) -> PyTree:
  """Gradient descent on one task's data, as a ``lax.scan``.

  Args:
    model: the network.
    params: the starting parameters (a nested dict).
    x: inputs.
    y: targets (int labels or float regression targets).
    inner_lr: a step size, or a pytree of step sizes shaped like the
      trainable parameters (Meta-SGD).
    num_steps: number of steps (static).
    first_order: stop the gradient through the inner gradients, which drops
      the second-order (Hessian) term of the meta-gradient.
    trainable: ``None`` to adapt every parameter, or the name of the one
      top-level sub-tree to adapt (``"head"`` for ANIL); the rest is held
      fixed.

  Returns:
    The adapted parameters.
  """
  return _sgd_with_state(model, params, None, x, y, inner_lr=inner_lr,
                         num_steps=num_steps, first_order=first_order,
                         trainable=trainable, training=True)[0]


def _sgd_with_state(model, params, state, x, y, *, inner_lr, num_steps,
                    first_order, trainable, training):
  """:func:`inner_sgd` threading the model's state through its forward
  passes (``models.forward``); returns ``(params, state)``."""
  if trainable is None:
    fast, frozen = params, None
  else:
    fast = params[trainable]
    frozen = {k: v for k, v in params.items() if k != trainable}

  def join(fast):
    return fast if frozen is None else {**frozen, trainable: fast}

  def loss_fn(fast, state):
    out, state = models.forward(model, join(fast), state, x,
                                training=training)
    return task_loss(out, y, prefix="inner/")[0], state

  def step(carry, _):
    fast, state = carry
    grads, state = jax.grad(loss_fn, has_aux=True)(fast, state)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    if isinstance(inner_lr, (int, float)):
      fast = jax.tree.map(lambda p, g: p - inner_lr * g, fast, grads)
    else:
      fast = jax.tree.map(lambda p, g, a: p - a * g, fast, grads, inner_lr)
    return (fast, state), None

  (fast, state), _ = jax.lax.scan(step, (fast, state), None,
                                  length=num_steps)
  return join(fast), state


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
  the same.

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
  _check(inner_lr, num_inner_steps)
  eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  _check(eval_inner_lr, eval_num_inner_steps, "eval_inner")

  def inner(params, run, state, episode: Episode, key, training: bool):
    del key
    return _sgd_with_state(
        run, params, state, episode.support_x, episode.support_y,
        inner_lr=inner_lr if training else eval_inner_lr,
        num_steps=num_inner_steps if training else eval_num_inner_steps,
        first_order=first_order or not training,
        trainable=adapt_only, training=training)

  return adaptation_learner(model, _init(model), inner)


def anil(
    model: Model,
    inner_lr: float = 0.4,
    num_inner_steps: int = 1,
    *,
    first_order: bool = False,
    eval_inner_lr: float | None = None,
    eval_num_inner_steps: int | None = None,
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
  )


def metasgd(
    model: Model,
    inner_lr: float = 0.4,
    num_inner_steps: int = 1,
    *,
    first_order: bool = False,
    eval_num_inner_steps: int | None = None,
) -> MetaLearner:
  r"""Meta-SGD: MAML with a meta-learned step size for every parameter.

  The inner update is :math:`\phi = \theta - \alpha \odot \nabla L(\theta)`
  with :math:`\alpha` a pytree shaped like :math:`\theta`, initialised to
  ``inner_lr`` and meta-learned together with :math:`\theta`.

  Args:
    model: the network.
    inner_lr: the initial value of every per-parameter step size.
    num_inner_steps: inner steps (Li et al. use 1).
    first_order: drop second-order terms.
    eval_num_inner_steps: inner steps at meta-test time.

  Returns:
    A :class:`MetaLearner` whose meta-parameters are
    :class:`MetaSGDParams`.

  References:
    Li, Zhou, Chen & Li, `Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning <https://arxiv.org/abs/1707.09835>`_, 2017.
  """
  _check(inner_lr, num_inner_steps)
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  _check(inner_lr, eval_num_inner_steps, "eval_inner")

  def init(key, episode: Episode):
    params = model.init(key, episode.support_x)
    lrs = jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params)
    return MetaSGDParams(params, lrs)

  def inner(params, run, state, episode: Episode, key, training: bool):
    del key
    return _sgd_with_state(
        run, params.model, state, episode.support_x, episode.support_y,
        inner_lr=params.inner_lr,
        num_steps=num_inner_steps if training else eval_num_inner_steps,
        first_order=first_order or not training, trainable=None,
        training=training)

  return adaptation_learner(model, init, inner)


def _reptile_inner(model, params, state, x, y, tx, num_steps, batch_size,
                   key, model_state=None, training=True):
  """``num_steps`` of ``tx`` on one task, each on the next mini-batch.

  Starts from the optimiser state ``state`` (``None``: a fresh one) and
  returns the adapted parameters, the final state and the model's state
  (threaded through the forward passes, :func:`metalearn.models.forward`).
  Mini-batches of ``batch_size`` walk through reshuffled passes over the
  ``n`` examples (Nichol et al.'s sampling without replacement); with
  ``batch_size`` ``None`` or ``>= n`` every step sees all of them.
  """
  n = jax.tree.leaves(x)[0].shape[0]  # x and y may be pytrees (MLTI)
  if state is None:
    state = tx.init(params)

  def loss_fn(p, model_state, xb, yb):
    out, model_state = models.forward(model, p, model_state, xb,
                                      training=training)
    return task_loss(out, yb, prefix="inner/")[0], model_state

  def step(carry, batch):
    p, state, model_state = carry
    xb, yb = batch
    grads, model_state = jax.grad(loss_fn, has_aux=True)(
        p, model_state, xb, yb)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state, model_state), None

  carry = (params, state, model_state)
  if batch_size is None or batch_size >= n:
    def full(carry, _):
      return step(carry, (x, y))
    carry, _ = jax.lax.scan(full, carry, None, length=num_steps)
    return carry
  if key is None:
    raise ValueError("mini-batched inner steps need a key to shuffle by")
  passes = -(-num_steps * batch_size // n)  # ceil
  order = jnp.concatenate([jax.random.permutation(k, n)
                           for k in jax.random.split(key, passes)])
  idx = order[:num_steps * batch_size].reshape(num_steps, batch_size)

  def take(tree, rows):  # Scalar leaves (MLTI's lam, layer) have no rows.
    return jax.tree.map(lambda a: a[rows] if jnp.ndim(a) else a, tree)

  def batch_step(carry, rows):
    return step(carry, (take(x, rows), take(y, rows)))

  carry, _ = jax.lax.scan(batch_step, carry, idx)
  return carry


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
  stored statistics alone.

  Returns:
    A :class:`MetaLearner`; its metrics score the adapted weights on the
    query set.

  References:
    Nichol, Achiam & Schulman, `On First-Order Meta-Learning Algorithms
    <https://arxiv.org/abs/1803.02999>`_, 2018.
  """
  _check(inner_lr, num_inner_steps)
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  if inner_optimizer is not None and eval_inner_lr is not None:
    raise ValueError(
        "eval_inner_lr applies to the inner SGD; with an inner_optimizer, "
        "test adaptation uses that optimiser (set its step size there)")
  eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
  _check(eval_inner_lr, eval_num_inner_steps, "eval_inner")
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

  stateful = models.has_state(model)

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
    params, state, model_state = split(meta_params)
    return _reptile_inner(
        model if training else models.bind(model, model_state),
        params, state, episode.support_x, episode.support_y,
        train_tx if training else eval_tx,
        num_inner_steps if training else eval_num_inner_steps,
        inner_batch_size if training else eval_inner_batch_size, key,
        model_state, training)

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    return inner(meta_params, episode, key, training)[0]

  def predict(meta_params, task_params, x):
    return models.bind(model, split(meta_params)[2]).apply(task_params, x)

  def evaluate(meta_params, task_params, episode: Episode):
    return task_loss(predict(meta_params, task_params, episode.query_x),
                     episode.query_y)

  def meta_grad(meta_params, episode: Episode, key):
    adapted, state, model_state = jax.lax.stop_gradient(
        inner(meta_params, episode, key, True))
    # Metrics with the training forward; the query set does not move the
    # running statistics (Reptile trains on the inner steps alone).
    out = models.forward(model, adapted, model_state, episode.query_x,
                         training=True)[0]
    _, metrics = task_loss(out, episode.query_y)
    params, old_state, old_model_state = split(meta_params)
    grads = jax.tree.map(jnp.subtract, params, adapted)
    if carry_inner_state:  # old - new: the meta-step sets the mean new state
      grads = ReptileParams(grads, state_step(old_state, state))
    if stateful:
      grads = WithModelState(grads, state_step(old_model_state, model_state))
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
