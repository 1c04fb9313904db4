"""The meta-learner interface: a NamedTuple of pure functions."""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn import models
from metalearn.models import Model
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
      for one task, ``grads`` shaped like ``meta_params``: the
      meta-gradient on the learned leaves and the new value on the carried
      ones (``carried``). The default differentiates
      ``evaluate(adapt(...))``; estimators such as Reptile's supply their
      own.

    carried: ``None``, or ``carried(meta_params) -> tree of bools`` (the
      structure of ``meta_params``) marking the leaves that are state
      carried from one meta-step to the next rather than learned, such as
      Reptile's inner optimiser state with ``carry_inner_state=True`` or a
      model's batch-norm running statistics (:class:`WithModelState`). For
      those leaves ``meta_grad`` returns the task's *new value* of the
      state (not a gradient); the meta-step averages them over tasks as
      it averages gradients, gives the meta-optimizer the learned leaves
      alone, and sets the carried leaves to the tasks' mean new value
      (:func:`metalearn.training.outer_optimizer`; integer leaves, such as
      an optimiser's step count, are averaged exactly, rounded to the
      nearest integer).
    predict: ``None``, or ``predict(meta_params, task_params, x) ->
      outputs`` (logits for classification, predictions for regression)
      for new inputs ``x`` of an adapted task (``adapt(...,
      training=False)``), with the meta-test settings.
    transductive: whether a query's outputs at meta-test depend on the
      other inputs of its episode (batch statistics of the batch at hand).
      Every built-in learner on a model with ``norm="running"`` or
      ``"none"`` is not: replacing the other queries leaves a query's
      outputs bit-identical (the conformance suite checks it).
    train_sampler: ``None``, or ``train_sampler(sampler) -> sampler``: how
      the learner draws its meta-training tasks from a task sampler (MLTI
      draws pairs, :func:`~metalearn.metalearners.paired_sampler`). Runs
      apply it to the training sampler; validation and test use plain
      episodes.
    head: whether the model ends in a classification head with one output
      per way (the MAML family): its output size must equal the number of
      ways, in meta-training and at test. Embedding learners (ProtoNet)
      take any number of ways. Runs check it against the task before
      loading data.

  All are traced once per shape and run under ``jit`` and ``vmap``.
  The trainer (:func:`metalearn.training.make_meta_step`) maps ``meta_grad``
  over the tasks of a batch and never needs to know the algorithm.
  """

  init: Callable[[jax.Array, Episode], PyTree]
  adapt: Callable[..., PyTree]
  evaluate: Callable[[PyTree, PyTree, Episode], tuple[jax.Array, Metrics]]
  meta_grad: Callable[[PyTree, Episode, jax.Array], tuple[PyTree, Metrics]]
  carried: Callable[[PyTree], PyTree] | None = None
  predict: Callable[[PyTree, PyTree, jax.Array], jax.Array] | None = None
  transductive: bool = False
  train_sampler: Callable[[Any], Any] | None = None
  head: bool = False


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
                 carried=None, predict=None,
                 transductive=False, *, train_sampler=None,
                 head=False) -> MetaLearner:
  """Assembles a :class:`MetaLearner`, filling in the default ``meta_grad``.

  Arguments are the fields of :class:`MetaLearner`.

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
  return MetaLearner(init, adapt, evaluate, meta_grad, carried, predict,
                     transductive, train_sampler, head)


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


class WithModelState(NamedTuple):
  """The meta-parameters of a learner whose model keeps state.

  Attributes:
    params: what the learner's meta-parameters are without state (learned).
    model_state: the model's state (batch-norm running statistics),
      carried from one meta-step to the next (:attr:`MetaLearner.carried`):
      each task moves it through the training forward passes of its
      meta-gradient and returns its new value there, and the meta-step
      sets it to the tasks' mean.
  """

  params: PyTree
  model_state: PyTree


def with_model_state(carried=None):
  """``carried`` for :class:`WithModelState` meta-parameters.

  Args:
    carried: the learner's own ``carried`` for ``params``, or ``None``.

  Returns:
    ``carried(meta_params)`` marking ``model_state`` (and what ``carried``
    marks in ``params``); the learner's ``meta_grad`` returns
    ``WithModelState(grads, new_model_state)``.
  """

  def mark(meta_params):
    inner = (jax.tree.map(lambda _: False, meta_params.params)
             if carried is None else carried(meta_params.params))
    return WithModelState(
        inner, jax.tree.map(lambda _: True, meta_params.model_state))

  return mark


def split_model_state(meta_params, stateful: bool):
  """``(params, model_state)`` of meta-parameters that are
  :class:`WithModelState` when ``stateful``, else ``(meta_params, None)``."""
  if stateful:
    return meta_params.params, meta_params.model_state
  return meta_params, None


def embed_episode(embed: Model, params, state, episode: Episode,
                  training: bool):
  """Support and query embeddings of an embedding learner, and the state.

  The one place the embedding learners (ProtoNet, R2-D2, the in-context
  learner) apply the model's normalisation mode: with the support set's
  statistics (``norm="support"``); with the carried running statistics
  alone at meta-test (``norm="running"``, ``training=False``); otherwise
  from one batch of support and query inputs, whose statistics are the
  batch's (training, or a transductive test), moving the running state.

  Args:
    embed: the embedding network.
    params: its parameters.
    state: its state (running statistics), or ``None``.
    episode: the episode; inputs may be pytrees (MLTI's ``MixedInputs``):
      rows are joined, a task's scalars are the support's.
    training: meta-training (``True``) or meta-test.

  Returns:
    ``(support embeddings, query embeddings, state)``: the support
    statistics for ``norm="support"``, else the (new) running state.
  """
  n = jax.tree.leaves(episode.support_x)[0].shape[0]
  if models.uses_support_statistics(embed):
    zs, stats = models.support_forward(embed, params, episode.support_x)
    return zs, models.bind(embed, stats).apply(params, episode.query_x), stats
  if models.has_state(embed) and not training:
    run = models.bind(embed, state)
    return (run.apply(params, episode.support_x),
            run.apply(params, episode.query_x), state)
  x = jax.tree.map(
      lambda s, q: jnp.concatenate([s, q]) if jnp.ndim(s) else s,
      episode.support_x, episode.query_x)
  z, state = models.forward(embed, params, state, x, training=True)
  return z[:n], z[n:], state


def embedding_learner(
    embed: Model,
    fit: Callable[[PyTree, jax.Array, jax.Array], PyTree],
    classify: Callable[[PyTree, PyTree, jax.Array], jax.Array],
    wrap: Callable[[PyTree], PyTree] | None = None,
    network: Callable[[PyTree], PyTree] | None = None,
) -> MetaLearner:
  """A learner that fits a head on the support embeddings and scores the
  queries with it.

  The shared shape of ProtoNet and Meta-Baseline (class means), R2-D2
  (ridge regression) and MetaOptNet (a multi-class SVM): ``adapt`` embeds
  the support set and fits the head; the query logits are the head's on
  the query embeddings; the meta-gradient flows through the fit into the
  embedding and the learner's own parameters. The embedding's
  normalisation is handled once, here (:func:`embed_episode`):

  - meta-training embeds the support and query sets in one batch, as
    Snell et al.'s code does, so batch normalisation sees one set of
    statistics per episode; with ``norm="running"`` that batch moves the
    carried running statistics (:class:`WithModelState`, the task's new
    value in its meta-gradient);
  - at meta-test, ``norm="running"`` normalises every image with the
    running statistics alone, so a query's logits depend on that query
    and the support set only; ``norm="transductive"`` embeds the episode
    as one batch (``transductive=True``); ``norm="none"`` does not
    normalise;
  - ``norm="support"`` (Bronskill et al.) normalises the support set with
    its own statistics and every query with them, in meta-training and at
    test, and nothing is carried; task parameters are then
    :class:`WithModelState` ``(head, support statistics)``.

  Args:
    embed: the embedding network.
    fit: ``fit(learned, support_z, support_y) -> head``; ``support_y``
      are int labels in ``[0, n)`` for ``n`` support rows (its length is
      a static bound on the number of classes).
    classify: ``classify(learned, head, z) -> logits [m, slots]``.
    wrap: ``wrap(network_params) -> learned``, the learner's learned
      meta-parameters around the network's (a temperature, a regulariser);
      default: the network's parameters alone.
    network: ``network(learned) -> network_params``, undoing ``wrap``.

  Returns:
    The :class:`MetaLearner`; meta-parameters are ``learned``
    (in :class:`WithModelState` with running statistics), task parameters
    ``fit``'s heads.
  """
  support = models.uses_support_statistics(embed)
  stateful = models.has_state(embed) and not support
  if wrap is None:
    wrap, network = (lambda p: p), (lambda p: p)

  def split(meta_params):
    return split_model_state(meta_params, stateful)

  def init(key, episode: Episode):
    learned = wrap(embed.init(key, episode.support_x))
    if not stateful:
      return learned
    return WithModelState(learned, embed.init_state(key, episode.support_x))

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    del key, training  # the same fit in meta-training and at test
    learned, state = split(meta_params)
    if support:
      z, stats = models.support_forward(embed, network(learned),
                                        episode.support_x)
      return WithModelState(fit(learned, z, episode.support_y), stats)
    z, _, _ = embed_episode(embed, network(learned), state, episode, False)
    return fit(learned, z, episode.support_y)

  def embed_with(meta_params, task_params, x):
    """Embeddings of ``x`` at meta-test (normalised with the support
    statistics in ``task_params`` for ``norm="support"``)."""
    learned, state = split(meta_params)
    if support:
      state = task_params.model_state
    return models.bind(embed, state).apply(network(learned), x)

  def predict(meta_params, task_params, x):
    head = task_params.params if support else task_params
    return classify(split(meta_params)[0], head,
                    embed_with(meta_params, task_params, x))

  def evaluate(meta_params, task_params, episode: Episode):
    if support:
      return task_loss(predict(meta_params, task_params, episode.query_x),
                       episode.query_y)
    learned, state = split(meta_params)
    _, z, _ = embed_episode(embed, network(learned), state, episode, False)
    return task_loss(classify(learned, task_params, z), episode.query_y)

  def meta_grad(meta_params, episode: Episode, key):
    del key
    learned, state = split(meta_params)

    def loss_fn(learned):
      zs, zq, new = embed_episode(embed, network(learned), state, episode,
                                  True)
      head = fit(learned, zs, episode.support_y)
      loss, metrics = task_loss(classify(learned, head, zq), episode.query_y)
      return loss, (metrics, new)

    grads, (metrics, new) = jax.grad(loss_fn, has_aux=True)(learned)
    if stateful:  # the carried entry is the new value (MetaLearner.carried)
      grads = WithModelState(grads, jax.lax.stop_gradient(new))
    return grads, metrics

  return make_learner(init, adapt, evaluate, meta_grad,
                      with_model_state() if stateful else None, predict,
                      embed.transductive)


class AdaptedModel(NamedTuple):
  """How an adapting learner turns adapted weights into task parameters
  and predictions, whatever the model's normalisation.

  ``task(adapted, support_x)`` gives the task parameters: the adapted
  weights, or for a ``norm="support"`` model :class:`WithModelState`
  ``(weights, the support set's statistics under them)``.
  ``predict(model_state, task_params, x)`` runs the model on ``x`` with
  the stored ``model_state`` (running statistics, or ``None``), or with
  the task's support statistics.
  """

  task: Callable[[PyTree, jax.Array], PyTree]
  predict: Callable[[PyTree, PyTree, jax.Array], jax.Array]


def adapted_model(model: Model) -> AdaptedModel:
  """:class:`AdaptedModel` of ``model`` (MAML family, Reptile)."""
  support = models.uses_support_statistics(model)

  def task(adapted, support_x):
    if not support:
      return adapted
    return WithModelState(adapted, models.support_statistics(
        model, adapted, support_x))

  def predict(model_state, task_params, x):
    if support:
      model_state, task_params = task_params.model_state, task_params.params
    return models.bind(model, model_state).apply(task_params, x)

  return AdaptedModel(task, predict)


RUNNING_NORM_WARNING = (
    "gradient-based adaptation with running batch-norm statistics "
    "(norm='running') adapts on batch statistics in meta-training but on "
    "the stored ones at meta-test, where the inner step can diverge (MAML "
    "Omniglot 5w1s: 22.6% against 96.7% transductive, "
    "benchmarks/README.md); use norm='support' (the support set's "
    "statistics, in training and at test; not transductive) or "
    "norm='transductive' for the MAML family")


def adaptation_learner(
    model: Model,
    init_params: Callable[[jax.Array, Episode], PyTree],
    inner: Callable[..., Any],
) -> MetaLearner:
  """A learner that adapts the model's parameters on the support set.

  The shared shape of MAML, ANIL, Meta-SGD and the learned-optimiser
  learners: adaptation returns the model's task parameters; the query
  outputs are the model's on them.

  With a stateless model the meta-parameters are ``init_params``'s and the
  meta-gradient differentiates ``evaluate(adapt(...))``. With a model that
  keeps state (``norm="running"``) they are :class:`WithModelState`:
  meta-training runs every forward pass (each inner step on the support
  set, then the query set) with batch statistics, threading the running
  statistics through them in order; the task's final statistics are its
  carried-state entry (their new value). ``adapt(training=False)``,
  ``evaluate`` and ``predict`` normalise every input with the stored
  statistics alone.

  That mismatch costs gradient-based adaptation dearly: adaptation learns
  its step on batch-normalised networks and then runs, at meta-test, on
  networks normalised with the stored statistics, where the same step can
  diverge (MAML Omniglot 5-way 1-shot: 22.6% test accuracy after 8000
  meta-steps against 96.7% transductive; benchmarks/README.md). This is
  conventional batch norm's known failure with MAML (Bronskill et al.,
  TaskNorm, 2020), so building such a learner warns
  (:data:`RUNNING_NORM_WARNING`).

  With a ``norm="support"`` model (their remedy) nothing is carried: the
  meta-parameters are ``init_params``'s, adaptation runs on the support
  set with its own batch statistics, in meta-training and at test alike,
  and the queries are normalised with the statistics of the support set
  under the adapted parameters (:func:`~metalearn.models.
  support_statistics`, differentiated through in the meta-gradient). The
  task parameters are then :class:`WithModelState` ``(adapted params,
  support statistics)``; no query influences another.

  Args:
    model: the network.
    init_params: ``init_params(key, episode)`` -> the learner's parameters
      (without the model state).
    inner: ``inner(params, model_state, episode, key, training) ->``
      :class:`~metalearn.metalearners.InnerResult`, the inner loop from
      the learner's parameters on the support set
      (:func:`~metalearn.metalearners.inner_optimize` with ``model``,
      ``model_state`` and ``training``).

  Returns:
    The :class:`MetaLearner`.
  """
  support = models.uses_support_statistics(model)
  stateful = models.has_state(model) and not support
  if stateful:
    warnings.warn(RUNNING_NORM_WARNING, UserWarning, stacklevel=3)

  def split(meta_params):
    if stateful:
      return meta_params.params, meta_params.model_state
    return meta_params, None

  def init(key, episode: Episode):
    params = init_params(key, episode)
    if not stateful:
      return params
    return WithModelState(params, model.init_state(key, episode.support_x))

  run = adapted_model(model)

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    params, state = split(meta_params)
    return run.task(inner(params, state, episode, key, training).params,
                    episode.support_x)

  def predict(meta_params, task_params, x):
    return run.predict(split(meta_params)[1], task_params, x)

  def evaluate(meta_params, task_params, episode: Episode):
    return task_loss(predict(meta_params, task_params, episode.query_x),
                     episode.query_y)

  def meta_grad(meta_params, episode: Episode, key):
    params, state = meta_params

    def outer(params):
      adapted = inner(params, state, episode, key, True)
      out, new = models.forward(model, adapted.params, adapted.model_state,
                                episode.query_x, training=True)
      loss, metrics = task_loss(out, episode.query_y)
      return loss, (metrics, new)

    grads, (metrics, new) = jax.grad(outer, has_aux=True)(params)
    return WithModelState(grads, jax.lax.stop_gradient(new)), metrics

  return make_learner(init, adapt, evaluate,
                      meta_grad if stateful else None,
                      with_model_state() if stateful else None,
                      predict, model.transductive, head=True)
