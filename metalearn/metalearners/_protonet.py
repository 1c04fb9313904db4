"""Prototypical Networks."""

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
  support = models.uses_support_statistics(embed)
  stateful = models.has_state(embed) and not support

  def split(meta_params):
    return split_model_state(meta_params, stateful)

  def init(key, episode: Episode):
    params = embed.init(key, episode.support_x)
    if not stateful:
      return params
    return WithModelState(params, embed.init_state(key, episode.support_x))

  def embed_episode(params, state, episode: Episode, training: bool):
    return _embed_episode(embed, params, state, episode, training)

  def classify(task_params, z):
    protos, present = task_params
    logits = -squared_distances(z, protos)
    return jnp.where(present[None, :], logits, -jnp.inf)

  def score(task_params, z, labels):
    return task_loss(classify(task_params, z), labels)

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    del key, training
    params, state = split(meta_params)
    if support:
      z, stats = models.support_forward(embed, params, episode.support_x)
    else:
      z, _, _ = embed_episode(params, state, episode, False)
    protos = prototypes(z, episode.support_y, episode.support_y.shape[-1])
    return WithModelState(protos, stats) if support else protos

  def evaluate(meta_params, task_params, episode: Episode):
    if support:
      return score(task_params.params,
                   embed_with(meta_params, task_params, episode.query_x),
                   episode.query_y)
    params, state = split(meta_params)
    _, z, _ = embed_episode(params, state, episode, False)
    return score(task_params, z, episode.query_y)

  def embed_with(meta_params, task_params, x):
    """Embeddings of ``x`` at meta-test (normalised with the support
    statistics in ``task_params`` for ``norm="support"``)."""
    params, state = split(meta_params)
    if support:
      state = task_params.model_state
    return models.bind(embed, state).apply(params, x)

  def predict(meta_params, task_params, x):
    protos = task_params.params if support else task_params
    return classify(protos, embed_with(meta_params, task_params, x))

  def meta_grad(meta_params, episode: Episode, key):
    del key
    params, state = split(meta_params)

    def loss_fn(params):
      zs, zq, new = embed_episode(params, state, episode, True)
      task_params = prototypes(zs, episode.support_y,
                               episode.support_y.shape[-1])
      loss, metrics = score(task_params, zq, episode.query_y)
      return loss, (metrics, new)

    grads, (metrics, new) = jax.grad(loss_fn, has_aux=True)(params)
    if stateful:  # the carried entry is the new value (MetaLearner.carried)
      grads = WithModelState(grads, jax.lax.stop_gradient(new))
    return grads, metrics

  return make_learner(init, adapt, evaluate, meta_grad,
                      with_model_state() if stateful else None, predict,
                      embed.transductive)
