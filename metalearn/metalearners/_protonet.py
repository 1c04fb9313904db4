"""Prototypical Networks."""

import jax
import jax.numpy as jnp
import optax

from metalearn.metalearners._base import MetaLearner, make_learner
from metalearn.models import Model
from metalearn.types import Episode


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


def protonet(embed: Model) -> MetaLearner:
  r"""Prototypical Networks.

  Embeds the support set, takes each class's mean embedding as its
  prototype :math:`c_k`, and classifies a query :math:`x` with logits
  :math:`-\lVert f(x) - c_k \rVert^2`. "Adaptation" is computing the
  prototypes, so it works for any number of ways: the number of classes is
  read from the labels, bounded by the support size.

  Args:
    embed: the embedding network (``conv4(None)`` in Snell et al.).

  Returns:
    A :class:`MetaLearner`; task parameters are ``(prototypes, present)``.

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
    >>> learner = protonet(models.conv4(None))
    >>> params = learner.init(jax.random.key(1), ep)
    >>> loss, metrics = learner.evaluate(
    ...     params, learner.adapt(params, ep, None), ep)
    >>> sorted(metrics)
    ['outer/accuracy', 'outer/loss']

  References:
    Snell, Swersky & Zemel, `Prototypical Networks for Few-shot Learning
    <https://arxiv.org/abs/1703.05175>`_, 2017.
  """

  def init(key, episode: Episode):
    return embed.init(key, episode.support_x)

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    del key, training
    z = embed.apply(meta_params, episode.support_x)
    return prototypes(z, episode.support_y, episode.support_y.shape[-1])

  def evaluate(meta_params, task_params, episode: Episode):
    protos, present = task_params
    z = embed.apply(meta_params, episode.query_x)
    logits = -squared_distances(z, protos)
    logits = jnp.where(present[None, :], logits, -jnp.inf)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, episode.query_y
    ).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == episode.query_y)
    return loss, {"outer/loss": loss, "outer/accuracy": acc}

  return make_learner(init, adapt, evaluate)
