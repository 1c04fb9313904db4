"""R2-D2: a differentiable ridge-regression head on a learned embedding."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.metalearners._base import MetaLearner, embedding_learner
from metalearn.models import Model

PyTree = Any


class R2D2Params(NamedTuple):
  r"""R2-D2's learned meta-parameters.

  Attributes:
    embed: the embedding network's parameters.
    log_lam: the log of the ridge regulariser :math:`\lambda` (``None``
      when it is fixed, ``learn_lam=False``).
    log_scale: the log of the logit scale :math:`\alpha` (``None`` when
      fixed, ``learn_scale=False``).
    bias: the logit offset :math:`\beta` (``None`` when fixed).
  """

  embed: PyTree
  log_lam: jax.Array | None
  log_scale: jax.Array | None
  bias: jax.Array | None


class RidgeHead(NamedTuple):
  """A task's ridge classifier: ``weights [d + 1, slots]`` (the last row
  multiplies the constant feature, a bias) and ``present [slots]``, which
  classes the support set has."""

  weights: jax.Array
  present: jax.Array


def ridge_regression(x: jax.Array, y: jax.Array,
                     lam: jax.typing.ArrayLike) -> jax.Array:
  r"""Ridge regression in closed form, on the mean squared error.

  .. math::
    W = \arg\min_W \tfrac{1}{n} \lVert X W - Y \rVert^2
        + \lambda \lVert W \rVert^2
      = X^\top (X X^\top + n \lambda I_n)^{-1} Y
      = (X^\top X + n \lambda I_d)^{-1} X^\top Y .

  The first form (Woodbury's identity) solves an :math:`n \times n`
  system, the second a :math:`d \times d` one; the smaller is chosen from
  the static shapes, as Bertinetto et al.'s code does. Averaging the data
  term over the ``n`` examples (their code divides :math:`X` and
  :math:`Y` by :math:`\sqrt{n}`) keeps :math:`\lambda` on the same scale
  for 5-way test episodes and 60-way training ones. Both forms are
  differentiable in ``x`` and ``lam`` by ordinary autodiff.

  Args:
    x: ``[n, d]`` inputs.
    y: ``[n, k]`` targets.
    lam: the regulariser, a positive scalar.

  Returns:
    ``W [d, k]``.
  """
  n, d = x.shape
  if n <= d:
    gram = x @ x.T + n * lam * jnp.eye(n, dtype=x.dtype)
    return x.T @ jnp.linalg.solve(gram, y)
  gram = x.T @ x + n * lam * jnp.eye(d, dtype=x.dtype)
  return jnp.linalg.solve(gram, x.T @ y)


def _with_ones(z: jax.Array) -> jax.Array:
  """``z [n, d]`` with a constant feature appended (the bias)."""
  return jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], -1)


def _positive(value: float, name: str) -> None:
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def r2d2(
    embed: Model,
    *,
    lam: float = 50.0,
    scale: float = 10.0,
    learn_lam: bool = True,
    learn_scale: bool = True,
) -> MetaLearner:
  r"""R2-D2: ridge regression from support embeddings to one-hot labels.

  Embeds the support set into :math:`X` (``n = N K`` rows, with a constant
  feature for the bias), regresses the one-hot labels :math:`Y` on it in
  closed form (:func:`ridge_regression`, the Woodbury form when ``n`` is
  at most the embedding size) and scores a query :math:`x` with the
  logits :math:`\alpha\, [f(x), 1]\, W + \beta`, trained with
  cross-entropy on the query set. The embedding, :math:`\lambda`,
  :math:`\alpha` and :math:`\beta` are meta-learned, the meta-gradient
  flowing through the linear solve; :math:`\lambda` and :math:`\alpha`
  through their logarithms, to stay positive. (:math:`\beta` adds the same
  offset to every logit, which the softmax cancels: its meta-gradient is
  zero, and it is kept for fidelity to the paper's adjust layer.) Any
  number of ways works: the number of classes is read from the labels,
  bounded by the support size, and absent classes get ``-inf`` logits.

  The embedding's normalisation (``norm="running"``, the authors' test;
  ``"transductive"``; ``"support"``, task parameters then
  :class:`WithModelState` ``(head, support statistics)``; ``"none"``) is
  that of every embedding learner, :func:`~metalearn.metalearners.
  embedding_learner`.

  Args:
    embed: the embedding network (``conv4(None)``; the paper's is a wider
      Conv-4 whose last two stages' features are concatenated).
    lam: :math:`\lambda`, or its initial value when learned (the authors'
      code: 50, on the same averaged data term).
    scale: :math:`\alpha`, or its initial value (the authors' Omniglot
      runs: 10). :math:`\beta` starts at 0.
    learn_lam: meta-learn :math:`\lambda`.
    learn_scale: meta-learn :math:`\alpha` and :math:`\beta`.

  Returns:
    A :class:`MetaLearner` whose meta-parameters are :class:`R2D2Params`
    (in :class:`WithModelState` with running statistics) and task
    parameters :class:`RidgeHead`.

  Raises:
    ValueError: if ``lam`` or ``scale`` is not positive.

  Examples:
    >>> import jax
    >>> import numpy as np
    >>> from metalearn import models, tasks
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((8, 4, 28, 28, 1), np.uint8),
    ...                  np.arange(8, dtype=np.int32))
    >>> s = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
    ...                           num_queries=2)
    >>> ep = s.sample(jax.random.key(0), pool)
    >>> learner = r2d2(models.conv4(None, norm="running"))
    >>> params = learner.init(jax.random.key(1), ep)
    >>> head = learner.adapt(params, ep, None, training=False)
    >>> head.weights.shape  # 64 features and a bias, 3 support slots
    (65, 3)

  References:
    Bertinetto, Henriques, Torr & Vedaldi, `Meta-learning with
    differentiable closed-form solvers
    <https://arxiv.org/abs/1805.08136>`_, ICLR 2019.
  """
  _positive(lam, "lam")
  _positive(scale, "scale")

  def wrap(net):
    return R2D2Params(
        net,
        jnp.log(jnp.float32(lam)) if learn_lam else None,
        jnp.log(jnp.float32(scale)) if learn_scale else None,
        jnp.zeros((), jnp.float32) if learn_scale else None,
    )

  def hyper(params: R2D2Params):
    """``(lam, scale, bias)``, learned or fixed."""
    lam_ = jnp.exp(params.log_lam) if learn_lam else lam
    if not learn_scale:
      return lam_, scale, 0.0
    return lam_, jnp.exp(params.log_scale), params.bias

  def fit(params: R2D2Params, z, labels) -> RidgeHead:
    slots = labels.shape[-1]
    one_hot = jax.nn.one_hot(labels, slots, dtype=z.dtype)
    weights = ridge_regression(_with_ones(z), one_hot, hyper(params)[0])
    return RidgeHead(weights, one_hot.sum(0) > 0)

  def classify(params: R2D2Params, head: RidgeHead, z):
    _, alpha, beta = hyper(params)
    logits = alpha * (_with_ones(z) @ head.weights) + beta
    return jnp.where(head.present[None, :], logits, -jnp.inf)

  return embedding_learner(embed, fit, classify, wrap,
                           lambda params: params.embed)
