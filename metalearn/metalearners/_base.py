"""The meta-learner interface: a NamedTuple of pure functions."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn.types import Episode

PyTree = Any
Metrics = dict[str, jax.Array]


class MetaLearner(NamedTuple):
  """A meta-learning algorithm as four pure functions (and an optional fifth).

  Attributes:
    init: ``init(key, example_episode) -> meta_params``. Only the shapes of
      the episode are read.
    adapt: ``adapt(meta_params, episode, key, training=True) -> task_params``,
      the inner loop on the support set. ``training`` (a Python bool) selects
      the meta-training or the meta-test settings (inner steps and rate).
    evaluate: ``evaluate(meta_params, task_params, episode) -> (loss,
      metrics)`` on the query set. Metric names are ``outer/*``.
    meta_grad: ``meta_grad(meta_params, episode, key) -> (grads, metrics)``
      for one task. The default differentiates ``evaluate(adapt(...))``;
      estimators such as Reptile's supply their own.

    carried: ``None``, or ``carried(meta_params) -> tree of bools`` (the
      structure of ``meta_params``) marking the leaves that are state
      carried from one meta-step to the next rather than learned, such as
      Reptile's inner optimiser state with ``carry_inner_state=True``. For
      those leaves ``meta_grad`` returns ``old - new`` for its task, and the
      meta-step sets them to the tasks' mean new value whatever the
      meta-optimizer (:func:`metalearn.training.outer_optimizer`).

  All are traced once per shape and run under ``jit`` and ``vmap``.
  The trainer (:func:`metalearn.training.make_meta_step`) maps ``meta_grad``
  over the tasks of a batch and never needs to know the algorithm.
  """

  init: Callable[[jax.Array, Episode], PyTree]
  adapt: Callable[..., PyTree]
  evaluate: Callable[[PyTree, PyTree, Episode], tuple[jax.Array, Metrics]]
  meta_grad: Callable[[PyTree, Episode, jax.Array], tuple[PyTree, Metrics]]
  carried: Callable[[PyTree], PyTree] | None = None


def default_meta_grad(adapt, evaluate):
  """The meta-gradient by differentiating through adaptation.

  Args:
    adapt: the learner's ``adapt``.
    evaluate: the learner's ``evaluate``.

  Returns:
    ``meta_grad(meta_params, episode, key) -> (grads, metrics)``.
  """

  def outer_loss(meta_params, episode, key):
    task_params = adapt(meta_params, episode, key)
    return evaluate(meta_params, task_params, episode)

  def meta_grad(meta_params, episode, key):
    grad_fn = jax.grad(outer_loss, has_aux=True)
    return grad_fn(meta_params, episode, key)

  return meta_grad


def make_learner(init, adapt, evaluate, meta_grad=None,
                 carried=None) -> MetaLearner:
  """Assembles a :class:`MetaLearner`, filling in the default ``meta_grad``.

  Examples:
    A learner that never adapts, trained by the standard loop:

    >>> import jax, jax.numpy as jnp
    >>> def init(key, ep):
    ...   return jnp.zeros(())
    >>> def adapt(mp, ep, key, training=True):
    ...   return mp
    >>> def evaluate(mp, tp, ep):
    ...   loss = jnp.mean((ep.query_y - tp) ** 2)
    ...   return loss, {"outer/loss": loss}
    >>> learner = make_learner(init, adapt, evaluate)
    >>> isinstance(learner, MetaLearner)
    True
  """
  if meta_grad is None:
    meta_grad = default_meta_grad(adapt, evaluate)
  return MetaLearner(init, adapt, evaluate, meta_grad, carried)


class MixedLabels(NamedTuple):
  r"""Soft labels that mix two sets of int labels, as task mixup makes them.

  Stands for the target :math:`\lambda\, e_{labels} + (1 - \lambda)\,
  e_{other}`. :func:`task_loss` scores it as the same mix of the two
  cross-entropies (equal to the cross-entropy with that soft target) and of
  the two accuracies. A separate type, so float targets keep meaning
  regression.

  Attributes:
    labels: int ``[n]``.
    other: int ``[n]``.
    lam: the weight of ``labels``, a float scalar.
  """

  labels: jax.Array
  other: jax.Array
  lam: jax.Array


def is_classification(y: jax.Array) -> bool:
  """Integer targets are class labels; float targets are regression."""
  return jnp.issubdtype(y.dtype, jnp.integer)


def task_loss(
    outputs: jax.Array, y: jax.Array, prefix: str = "outer/"
) -> tuple[jax.Array, Metrics]:
  """Cross-entropy and accuracy for labels, mean squared error for floats.

  Args:
    outputs: logits ``[n, classes]`` or predictions ``[n, d]``.
    y: int labels ``[n]``, float targets ``[n, d]``, or
      :class:`MixedLabels` (scored as the mix of the two label sets).
    prefix: prefix of the metric names.

  Returns:
    ``(loss, {prefix+"loss", prefix+"accuracy"})`` (no accuracy for
    regression).
  """
  if isinstance(y, MixedLabels):
    first = task_loss(outputs, y.labels, prefix)
    second = task_loss(outputs, y.other, prefix)
    return jax.tree.map(
        lambda a, b: y.lam * a + (1.0 - y.lam) * b, first, second
    )
  if is_classification(y):
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()
    acc = jnp.mean(jnp.argmax(outputs, -1) == y)
    return loss, {f"{prefix}loss": loss, f"{prefix}accuracy": acc}
  loss = jnp.mean(jnp.square(outputs - y))
  return loss, {f"{prefix}loss": loss}
