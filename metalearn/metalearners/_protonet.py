"""Prototypical Networks, and Meta-Baseline's cosine variant."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn import models
from metalearn.metalearners._base import (
    MetaLearner,
    WithModelState,
    make_learner,
    split_model_state,
    task_loss,
    with_model_state,
)
from metalearn.metalearners._base import embed_episode as _embed_episode
from metalearn.models import Model
from metalearn.types import Episode

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
  has similarity 0 to everything)."""
  eps = jnp.finfo(a.dtype).tiny

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
  et al.'s code does, so batch normalisation sees one set of statistics
  per episode. At meta-test (``adapt``, ``evaluate``, ``predict``) the
  embedding's normalisation decides what a query's logits depend on:

  - ``norm="running"`` (Snell et al.'s test): the running statistics kept
    during meta-training (the carried :class:`WithModelState`, moved once
    per task by the joint support-and-query batch) normalise every image
    alone, so a query's logits depend on that query and the support set
    only;
  - ``norm="transductive"``: the support and query sets are embedded in
    one batch, as in training, and each query's embedding depends on the
    other queries of its episode (declared by ``transductive=True``);
    ``predict`` normalises the inputs it is given as one batch;
  - ``norm="support"`` (Bronskill et al.'s support-set moments): the
    support set is embedded with its own batch statistics and every query
    is normalised with them, in meta-training and at test alike, so a
    query's logits depend on that query and the support set only, and
    nothing is carried; task parameters are then :class:`WithModelState`
    ``((prototypes, present), support statistics)``;
  - ``norm="none"``: no normalisation.

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
  support = models.uses_support_statistics(embed)
  stateful = models.has_state(embed) and not support

  def unpack(learned):
    """``(network parameters, temperature)`` of the learned entries."""
    return (learned.embed, learned.scale) if learn_scale else (learned, scale)

  def split(meta_params):
    """``(network parameters, temperature, model state)``."""
    learned, state = split_model_state(meta_params, stateful)
    return *unpack(learned), state

  def init(key, episode: Episode):
    params = embed.init(key, episode.support_x)
    if learn_scale:
      params = ScaledParams(params, jnp.float32(scale))
    if not stateful:
      return params
    return WithModelState(params, embed.init_state(key, episode.support_x))

  def embed_episode(params, state, episode: Episode, training: bool):
    return _embed_episode(embed, params, state, episode, training)

  def classify(task_params, z, tau):
    protos, present = task_params
    if metric == "cosine":
      logits = tau * cosine_similarities(z, protos)
    else:
      logits = -tau * squared_distances(z, protos)
    return jnp.where(present[None, :], logits, -jnp.inf)

  def score(task_params, z, labels, tau):
    return task_loss(classify(task_params, z, tau), labels)

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    del key, training
    params, _, state = split(meta_params)
    if support:
      z, stats = models.support_forward(embed, params, episode.support_x)
    else:
      z, _, _ = embed_episode(params, state, episode, False)
    protos = prototypes(z, episode.support_y, episode.support_y.shape[-1])
    return WithModelState(protos, stats) if support else protos

  def evaluate(meta_params, task_params, episode: Episode):
    params, tau, state = split(meta_params)
    if support:
      return score(task_params.params,
                   embed_with(meta_params, task_params, episode.query_x),
                   episode.query_y, tau)
    _, z, _ = embed_episode(params, state, episode, False)
    return score(task_params, z, episode.query_y, tau)

  def embed_with(meta_params, task_params, x):
    """Embeddings of ``x`` at meta-test (normalised with the support
    statistics in ``task_params`` for ``norm="support"``)."""
    params, _, state = split(meta_params)
    if support:
      state = task_params.model_state
    return models.bind(embed, state).apply(params, x)

  def predict(meta_params, task_params, x):
    protos = task_params.params if support else task_params
    return classify(protos, embed_with(meta_params, task_params, x),
                    split(meta_params)[1])

  def meta_grad(meta_params, episode: Episode, key):
    del key
    learned, state = split_model_state(meta_params, stateful)

    def loss_fn(learned):
      net, tau = unpack(learned)
      zs, zq, new = embed_episode(net, state, episode, True)
      task_params = prototypes(zs, episode.support_y,
                               episode.support_y.shape[-1])
      loss, metrics = score(task_params, zq, episode.query_y, tau)
      return loss, (metrics, new)

    grads, (metrics, new) = jax.grad(loss_fn, has_aux=True)(learned)
    if stateful:  # the carried entry is the new value (MetaLearner.carried)
      grads = WithModelState(grads, jax.lax.stop_gradient(new))
    return grads, metrics

  return make_learner(init, adapt, evaluate, meta_grad,
                      with_model_state() if stateful else None, predict,
                      embed.transductive)


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
