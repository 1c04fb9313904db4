"""Meta-learning with fewer tasks through task interpolation (MLTI).

The wrapper and its task pairs; the mixing itself is in ``_mixing.py``.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn.metalearners._base import MetaLearner
from metalearn.metalearners._mixing import (
    MIX_MODES,
    _mix_points,
    feature_mixing,
    interpolate_tasks,
)
from metalearn.models import Model
from metalearn.tasks import TaskSampler
from metalearn.types import Episode


class EpisodePair(NamedTuple):
  """A task and the partner it is interpolated with (:func:`paired_sampler`).

  Attributes:
    episode: the task.
    partner: another task of the same shapes.
  """

  episode: Episode
  partner: Episode


def paired_sampler(sampler: TaskSampler) -> TaskSampler:
  """A sampler of :class:`EpisodePair`, for :func:`mlti` on large pools.

  The task drawn from ``key`` is the one ``sampler`` draws from ``key``; its
  partner comes from ``jax.random.fold_in(key, 1)``. The pool stays an
  argument of the jitted step instead of a constant captured by the
  learner (see :func:`mlti`).

  Args:
    sampler: the meta-training task distribution.

  Returns:
    A :class:`~metalearn.tasks.TaskSampler` over the same data.

  Examples:
    >>> import jax
    >>> from metalearn import tasks
    >>> pairs = paired_sampler(tasks.sinusoid_sampler(num_shots=5,
    ...                                               num_queries=5))
    >>> pair = pairs.sample(jax.random.key(0), pairs.data)
    >>> pair.episode.support_x.shape == pair.partner.support_x.shape
    True
  """

  def sample(key, data):
    return EpisodePair(
        sampler.sample(key, data),
        sampler.sample(jax.random.fold_in(key, 1), data),
    )

  return TaskSampler(sample=sample, data=sampler.data)


def mlti(
    learner_fn: Callable[[Model], MetaLearner],
    model: Model,
    sampler: TaskSampler | None = None,
    *,
    mix: str = "features",
    prob: float = 1.0,
    self_mix_prob: float = 0.5,
    shared_box: bool = False,
    alpha: float = 2.0,
    beta: float | None = None,
    mix_layers: Sequence[int] | None = None,
    label_sharing: bool = False,
    fixed_lambda: float | None = None,
) -> MetaLearner:
  r"""Task interpolation (MLTI) around any meta-learner.

  Every meta-training task :math:`\tau_i` is replaced by its interpolation
  with a partner: :math:`\tau_i` itself with its classes shuffled (with
  probability ``self_mix_prob``), otherwise another task. With
  :math:`\lambda \sim \mathrm{Beta}(\alpha, \beta)` per task and the two
  tasks' classes paired at random,

  .. math::
    h^{mix} = \lambda\, f_{\le l}(x_i) + (1 - \lambda)\, f_{\le l}(x_j'),

  at a layer :math:`l` drawn from ``mix_layers`` (``mix="features"``), or
  the images are mixed by CutMix (``mix="cutmix"``, one box for the
  support set and another for the query set). The wrapped learner computes
  its meta-gradient on the mixed task; meta-test is the wrapped learner's
  on plain episodes. The defaults are the authors' code's;
  ``prob=0.5, self_mix_prob=0.0, shared_box=True`` is this library's first
  variant. Partners come from ``sampler``, or with ``sampler=None`` from
  the pairs of :func:`paired_sampler` (the learner's ``train_sampler``).
  How this follows the authors' code, and the design: ``docs/mlti.md``.

  Args:
    learner_fn: builds the wrapped learner from a model, e.g.
      ``functools.partial(maml, inner_lr=0.4)`` or ``protonet``.
    model: the network (with ``layers`` for ``mix="features"``).
    sampler: the meta-training task distribution that partners are drawn
      from; may be ``None`` if training uses ``paired_sampler`` or if
      ``self_mix_prob=1``.
    mix: ``"features"`` or ``"cutmix"``.
    prob: the probability that a task is interpolated.
    self_mix_prob: the probability that a task's partner is itself with
      its classes shuffled (with ``label_sharing``: its rows shuffled).
    shared_box: ``"cutmix"`` only: one box for support and query.
    alpha: the first Beta parameter.
    beta: the second Beta parameter (default ``alpha``).
    mix_layers: candidate layers for ``"features"`` (0 = inputs; default:
      every layer before the model's last stage).
    label_sharing: whether the tasks share labels (mixed labels through
      :class:`MixedLabels`, which only learners whose loss is
      :func:`task_loss` accept, i.e. the MAML family, not ProtoNet).
    fixed_lambda: use this :math:`\lambda` instead of sampling it (1.0
      reproduces the wrapped learner).

  Returns:
    A :class:`MetaLearner`. Its ``init`` and ``meta_grad`` accept an
    :class:`~metalearn.types.Episode` or an :class:`EpisodePair`.

  Raises:
    ValueError: for an argument out of its range or without the ``mix`` it
      applies to, or a ``learner_fn`` that returns no :class:`MetaLearner`.

  Examples:
    >>> import functools, jax, numpy as np
    >>> from metalearn import metalearners, models, tasks
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((8, 4, 28, 28, 1), np.uint8),
    ...                  np.arange(8, dtype=np.int32))
    >>> sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
    ...                                 num_queries=2)
    >>> learner = mlti(functools.partial(metalearners.maml, inner_lr=0.4),
    ...                models.conv4(3, features=8), sampler)
    >>> ep = sampler.sample(jax.random.key(0), pool)
    >>> params = jax.jit(learner.init)(jax.random.key(1), ep)
    >>> # Shapes only here (compiling second-order MAML takes a while):
    >>> grads, metrics = jax.eval_shape(learner.meta_grad, params, ep,
    ...                                 jax.random.key(2))
    >>> sorted(metrics)
    ['outer/accuracy', 'outer/loss']

  References:
    Yao, Zhang & Finn, `Meta-Learning with Fewer Tasks through Task
    Interpolation <https://arxiv.org/abs/2106.02695>`_, 2022; the authors'
    code, https://github.com/huaxiuyao/MLTI (``ProtoNet/*/main.py``,
    ``protonet.py``).
  """
  beta = alpha if beta is None else beta
  _check_mlti(mix, prob, self_mix_prob, shared_box, alpha, beta, mix_layers,
              fixed_lambda)
  if mix == "features":
    points = _mix_points(model, mix_layers)
    base = learner_fn(feature_mixing(model, points))
  else:
    points = (0,)
    base = learner_fn(model)
  if not isinstance(base, MetaLearner):
    raise ValueError(
        f"learner_fn must return a MetaLearner, got {type(base).__name__}"
    )

  def init(key, episode):
    if isinstance(episode, EpisodePair):
      episode = episode.episode
    return base.init(key, episode)

  def partner_of(episode, key):
    if isinstance(episode, EpisodePair):
      return episode
    if self_mix_prob == 1.0:
      return EpisodePair(episode, episode)
    if sampler is None:
      raise ValueError(
          "mlti was built with sampler=None, so meta_grad needs an "
          "EpisodePair: train on paired_sampler(sampler), or pass sampler"
      )
    return EpisodePair(episode, sampler.sample(key, sampler.data))

  def meta_grad(meta_params, episode, key):
    partner_key, mix_key, base_key = jax.random.split(key, 3)
    episode, partner = partner_of(episode, partner_key)
    on_key, lam_key, layer_key, pair_key = jax.random.split(mix_key, 4)
    # Folded in rather than split, so that self_mix_prob=0 draws the same
    # numbers as before the option existed.
    self_key = jax.random.fold_in(mix_key, 1)
    if self_mix_prob > 0.0:
      itself = jax.random.bernoulli(self_key, self_mix_prob)
      partner = jax.tree.map(lambda a, b: jnp.where(itself, a, b), episode,
                             partner)
    if fixed_lambda is None:
      lam = jax.random.beta(lam_key, alpha, beta)
    else:
      lam = jnp.float32(fixed_lambda)
    lam = jnp.where(jax.random.bernoulli(on_key, prob), lam, 1.0)
    layer = jnp.asarray(points)[
        jax.random.randint(layer_key, (), 0, len(points))
    ]
    mixed = interpolate_tasks(
        episode, partner, lam, key=pair_key, mix=mix, layer=layer,
        label_sharing=label_sharing, shared_box=shared_box,
    )
    return base.meta_grad(meta_params, mixed, base_key)

  # Without a sampler of its own, the learner trains on pairs of tasks.
  return base._replace(
      init=init, meta_grad=meta_grad,
      train_sampler=paired_sampler if sampler is None else None)


def _check_mlti(mix, prob, self_mix_prob, shared_box, alpha, beta,
                mix_layers, fixed_lambda):
  if mix not in MIX_MODES:
    raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob must be in [0, 1], got {prob}")
  if not 0.0 <= self_mix_prob <= 1.0:
    raise ValueError(f"self_mix_prob must be in [0, 1], got {self_mix_prob}")
  if not (alpha > 0 and beta > 0):
    raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
  if mix_layers is not None and mix != "features":
    raise ValueError("mix_layers applies only to mix='features'")
  if shared_box and mix != "cutmix":
    raise ValueError("shared_box=True applies only to mix='cutmix'")
  if fixed_lambda is not None and not 0.0 <= fixed_lambda <= 1.0:
    raise ValueError(f"fixed_lambda must be in [0, 1], got {fixed_lambda}")
