"""Prototypical Networks, and Meta-Baseline's cosine variant."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.metalearners._base import MetaLearner, embedding_learner
from metalearn.models import Model

PyTree = Any
METRICS = ("euclidean", "cosine")


class ScaledParams(NamedTuple):
  """Meta-parameters of a prototype learner with a learned logit scale.

  Attributes:
    embed: the embedding network's parameters.
    scale: the temperature multiplying the logits (Meta-Baseline's
      :math:`\\tau`), a scalar.
  """

  embed: PyTree
  scale: jax.Array


def prototypes(
    embeddings: jax.Array, labels: jax.Array, num_slots: int
) -> tuple[jax.Array, jax.Array]:
  """Class means of embeddings.

  Args:
    embeddings: ``[n, d]``.
    labels: int ``[n]`` in ``[0, num_slots)``.
    num_slots: an upper bound on the number of classes (static).

  Returns:
    ``(prototypes [num_slots, d], present [num_slots] bool)``; absent
    classes have zero prototypes and ``present=False``.
  """
  one_hot = jax.nn.one_hot(labels, num_slots, dtype=embeddings.dtype)
  counts = one_hot.sum(0)
  protos = one_hot.T @ embeddings / jnp.maximum(counts, 1.0)[:, None]
  return protos, counts > 0


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[n, m]`` squared Euclidean distances between rows of a and b."""
  return (
      jnp.sum(a * a, -1)[:, None]
      - 2.0 * a @ b.T
      + jnp.sum(b * b, -1)[None, :]
  )


def cosine_similarities(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[n, m]`` cosine similarities between rows of a and b (a zero row
  has similarity 0 to everything, and a finite gradient: squared norms
  are floored at 1e-24, whose ``rsqrt`` derivative is still finite in
  float32, so no ``0 * inf`` appears)."""
  eps = 1e-24

  def unit(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True),
                                         eps))

  return unit(a) @ unit(b).T


def protonet(
    embed: Model,
    *,
    metric: str = "euclidean",
    scale: float = 1.0,
    learn_scale: bool = False,
) -> MetaLearner:
  r"""Prototypical Networks.

  Embeds the support set, takes each class's mean embedding as its
  prototype :math:`c_k`, and classifies a query :math:`x` with logits
  :math:`-\tau \lVert f(x) - c_k \rVert^2` (``metric="euclidean"``,
  Snell et al.) or :math:`\tau \cos(f(x), c_k)` (``metric="cosine"``,
  Meta-Baseline's, :func:`meta_baseline`), the temperature :math:`\tau`
  fixed (``scale``, 1 in Snell et al.) or meta-learned
  (``learn_scale=True``; meta-parameters are then :class:`ScaledParams`).
  "Adaptation" is computing the prototypes, so it works for any number of
  ways: the number of classes is read from the labels, bounded by the
  support size.

  Meta-training embeds the support and query sets in one batch, as Snell
  et al.'s code does; the embedding's normalisation at meta-test
  (``norm="running"``: Snell et al.'s test, each image normalised with the
  running statistics; ``"transductive"``; ``"support"``: Bronskill et
  al.'s support-set moments, task parameters then :class:`WithModelState`
  ``((prototypes, present), support statistics)``; ``"none"``) is that of
  every embedding learner, :func:`~metalearn.metalearners.
  embedding_learner`.

  Args:
    embed: the embedding network (``conv4(None)`` in Snell et al.).
    metric: ``"euclidean"`` (negative squared distances) or ``"cosine"``.
    scale: the temperature :math:`\tau`, or its initial value when
      learned.
    learn_scale: meta-learn :math:`\tau` (directly, as Meta-Baseline's
      code does, not through its logarithm).

  Returns:
    A :class:`MetaLearner`; task parameters are ``(prototypes, present)``.

  Raises:
    ValueError: for an unknown ``metric`` or a non-positive ``scale``.

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
    >>> learner = protonet(models.conv4(None, norm="running"))
    >>> params = jax.jit(learner.init)(jax.random.key(1), ep)
    >>> @jax.jit
    ... def test_episode(params, ep):
    ...   return learner.evaluate(params, learner.adapt(params, ep, None), ep)
    >>> loss, metrics = test_episode(params, ep)
    >>> sorted(metrics)
    ['outer/accuracy', 'outer/loss']

  References:
    Snell, Swersky & Zemel, `Prototypical Networks for Few-shot Learning
    <https://arxiv.org/abs/1703.05175>`_, 2017.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}")

  def fit(z, labels):
    return prototypes(z, labels, labels.shape[-1])

  def classify(tau, task_params, z):
    protos, present = task_params
    if metric == "cosine":
      logits = tau * cosine_similarities(z, protos)
    else:
      logits = -tau * squared_distances(z, protos)
    return jnp.where(present[None, :], logits, -jnp.inf)

  return scaled_embedding_learner(embed, fit, classify, scale, learn_scale)


def scaled_embedding_learner(embed: Model, fit, classify, scale: float,
                             learn_scale: bool) -> MetaLearner:
  """:func:`~metalearn.metalearners.embedding_learner` with a temperature.

  Args:
    embed: the embedding network.
    fit: ``fit(support_z, support_y) -> head``.
    classify: ``classify(tau, head, z) -> logits``.
    scale: the temperature, or its initial value when learned.
    learn_scale: meta-learn it (meta-parameters :class:`ScaledParams`).

  Returns:
    The :class:`MetaLearner`.
  """
  if not learn_scale:
    return embedding_learner(
        embed, lambda _, z, y: fit(z, y),
        lambda _, head, z: classify(scale, head, z))
  return embedding_learner(
      embed, lambda _, z, y: fit(z, y),
      lambda learned, head, z: classify(learned.scale, head, z),
      wrap=lambda net: ScaledParams(net, jnp.float32(scale)),
      network=lambda learned: learned.embed)


def meta_baseline(embed: Model, *, scale: float = 10.0,
                  learn_scale: bool = True) -> MetaLearner:
  r"""Meta-Baseline: cosine nearest-centroid meta-training of a pretrained
  embedding.

  Chen et al. (2021) pretrain a classifier on all meta-training classes
  (Classifier-Baseline: :func:`~metalearn.metalearners.baseline` here),
  drop its head, and meta-train the embedding on episodes with the metric
  it is tested with: prototypes are the support set's class means and a
  query's logits are :math:`\tau \cos(f(x), c_k)`, with a learned
  temperature :math:`\tau` (initially 10). This is
  :func:`protonet` with ``metric="cosine"`` and a learned scale; the
  pretrained embedding comes from ``trainer.init_from`` (a run directory
  of the pretraining). Without it, meta-training starts from scratch
  (their "Meta-Baseline without pretraining" ablation); at step 0 with
  it, evaluation is Classifier-Baseline's cosine nearest-centroid test.

  Args:
    embed: the embedding network (their ResNet-12; ``conv4(None)`` here on
      Omniglot).
    scale: the initial temperature :math:`\tau` (their code: 10).
    learn_scale: meta-learn :math:`\tau` (their code: yes).

  Returns:
    A :class:`MetaLearner` whose meta-parameters are :class:`ScaledParams`
    when ``learn_scale`` (in :class:`WithModelState` with running
    statistics), task parameters ``(prototypes, present)``.

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
    >>> learner = meta_baseline(models.conv4(None, norm="none"))
    >>> params = learner.init(jax.random.key(1), ep)
    >>> float(params.scale)
    10.0

  References:
    Chen, Liu, Xu, Darrell & Wang, `Meta-Baseline: Exploring Simple
    Meta-Learning for Few-Shot Learning <https://arxiv.org/abs/2003.04390>`_,
    ICCV 2021.
  """
  return protonet(embed, metric="cosine", scale=scale,
                  learn_scale=learn_scale)
