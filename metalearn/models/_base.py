"""The pure model interface used at the meta-learner boundary."""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

PyTree = Any
NORMS = ("transductive", "running", "support", "none")


class Model(NamedTuple):
  """A network as pure functions over a plain parameter pytree.

  ``init(key, x) -> params`` and ``apply(params, x) -> outputs``. The inner
  loop of a meta-learner differentiates ``apply`` with respect to ``params``,
  so the parameters must be an ordinary pytree (a nested dict), never an
  object with hidden state. Models built here name their last layer
  ``"head"``, which is what ANIL adapts.

  ``layers`` (optional) splits ``apply`` into stages, each
  ``stage(params, h) -> h`` taking the full parameter tree: composing them
  in order computes ``apply``. A model can then be run up to a layer and
  from it, which feature-level mixup needs (``metalearners.mlti``).
  ``conv4``, ``mlp`` and ``resnet12`` provide them; ``None`` (the default)
  means the model cannot be split.

  A model may keep non-learned **state** beside its parameters (batch-norm
  running statistics, ``norm="running"``). Then ``init_state(key, x) ->
  state`` builds it and ``apply_with_state(params, state, x, training) ->
  (outputs, state)`` runs the network: with ``training=True`` each norm
  layer normalises with the statistics of the batch at hand and returns the
  running statistics moved towards them; with ``training=False`` it
  normalises with the stored statistics and returns the state unchanged, so
  each input's output depends on that input alone. ``apply`` and
  ``layers`` of such a model compute the ``training=True`` outputs without
  touching the state. Use :func:`forward` and :func:`bind` rather than
  reading these fields, so stateless models work the same.

  ``transductive`` declares that an input's outputs depend on the other
  inputs of its batch at meta-test time (batch statistics,
  ``norm="transductive"``).

  ``support_norm`` marks a model whose state is not meta-learned but
  belongs to one task (``norm="support"``): the statistics of the task's
  support set (:func:`support_statistics`), with which the queries are
  normalised in meta-training and at test alike. The learners compute it
  per task instead of carrying it.
  """

  init: Callable[[jax.Array, jax.Array], PyTree]
  apply: Callable[[PyTree, jax.Array], jax.Array]
  layers: tuple[Callable[[PyTree, jax.Array], jax.Array], ...] | None = None
  init_state: Callable[[jax.Array, jax.Array], PyTree] | None = None
  apply_with_state: Callable[..., tuple[jax.Array, PyTree]] | None = None
  transductive: bool = False
  support_norm: bool = False


def has_state(model: Model) -> bool:
  """Whether ``model`` keeps state beside its parameters."""
  return model.init_state is not None


def forward(model: Model, params: PyTree, state: PyTree, x: jax.Array, *,
            training: bool) -> tuple[jax.Array, PyTree]:
  """Runs ``model`` with its state: ``(outputs, new_state)``.

  A stateless model ignores ``state`` and returns it unchanged. A model with
  state given ``state=None`` runs with the statistics of the batch at hand
  (``model.apply``) and returns ``None``: how support-norm learners adapt
  on a support set.
  """
  if not has_state(model) or state is None:
    return model.apply(params, x), state
  return model.apply_with_state(params, state, x, training)


def uses_support_statistics(model: Model) -> bool:
  """Whether ``model`` normalises queries with the support set's
  statistics (``norm="support"``) rather than meta-learned state."""
  return model.support_norm


def support_forward(model: Model, params: PyTree,
                    x: jax.Array) -> tuple[jax.Array, PyTree]:
  """Runs a task's support set ``x`` with its own batch statistics:
  ``(outputs, state)``, the state holding those statistics
  (:func:`support_statistics`)."""
  shapes = jax.eval_shape(model.init_state, jax.random.key(0), x)
  zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)
  return model.apply_with_state(params, zeros, x, True)


def support_statistics(model: Model, params: PyTree,
                       x: jax.Array) -> PyTree:
  """The state that normalises inputs with the statistics of ``x``.

  For a ``norm="support"`` model: run ``x`` (a task's support set) with
  batch statistics and return them, differentiable with respect to
  ``params``; ``bind(model, state)`` or ``forward(..., training=False)``
  then normalises any input (a query) with them alone.
  """
  return support_forward(model, params, x)[1]


def bind(model: Model, state: PyTree) -> Model:
  """The stateless model that normalises with the stored ``state``.

  Its ``apply(params, x)`` is ``forward(model, params, state, x,
  training=False)[0]``: what meta-test adaptation and evaluation run, so
  the learners' inner loops need no notion of state there. A stateless
  model is returned as it is.
  """
  if not has_state(model):
    return model

  def apply(params, x):
    return model.apply_with_state(params, state, x, False)[0]

  return Model(model.init, apply, transductive=model.transductive)


def check_norm(norm: str) -> None:
  """Raises ``ValueError`` unless ``norm`` is one of :data:`NORMS`."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def from_flax(module: nn.Module, *, train_arg: str | None = None,
              transductive: bool = False,
              state_gradients: bool = False) -> Model:
  """Wraps a flax ``linen`` module as a :class:`Model`.

  A module with only a ``"params"`` collection becomes a stateless model.
  A module with a ``"batch_stats"`` collection (``nn.BatchNorm``) becomes a
  model with state: pass ``train_arg``, the name of its ``__call__``
  argument that is true in training (flax's examples call it ``train``);
  it is passed as a keyword, true with batch statistics and the running
  statistics updated, false with the stored ones.

  Args:
    module: the flax module.
    train_arg: for a module with ``batch_stats``, its training flag.
    transductive: declare that an input's outputs depend on the other
      inputs of its batch (a norm layer that always uses batch
      statistics, as :class:`~metalearn.models.BatchNorm` by default).
    state_gradients: let gradients flow through the new state (the
      support statistics of ``norm="support"``); running statistics are
      constants to the gradient (the default).

  Returns:
    A :class:`Model` whose params are the module's ``"params"`` collection
    (and whose state is its ``"batch_stats"``, with ``train_arg``).

  Raises:
    ValueError: from ``init``, if the module keeps collections besides
      ``"params"`` and ``"batch_stats"``, or keeps ``"batch_stats"``
      without ``train_arg``.
  """

  def variables(key, x):
    out = dict(module.init(key, x))
    extra = set(out) - {"params", "batch_stats"}
    if extra or ("batch_stats" in out) != (train_arg is not None):
      raise ValueError(
          f"{type(module).__name__} keeps the collections {sorted(out)}: "
          "from_flax takes 'params', and 'batch_stats' together with "
          "train_arg (the name of the module's training flag)")
    return out

  def init(key: jax.Array, x: jax.Array) -> PyTree:
    return variables(key, x)["params"]

  if train_arg is None:
    def apply(params: PyTree, x: jax.Array) -> jax.Array:
      return module.apply({"params": params}, x)

    return Model(init=init, apply=apply, transductive=transductive)

  def init_state(key, x):
    return variables(key, x)["batch_stats"]

  def apply_with_state(params, state, x, training):
    flags = {train_arg: training}
    if not training:
      return module.apply({"params": params, "batch_stats": state}, x,
                          **flags), state
    out, updates = module.apply({"params": params, "batch_stats": state},
                                x, mutable=["batch_stats"], **flags)
    new = updates["batch_stats"]
    return out, new if state_gradients else jax.lax.stop_gradient(new)

  def apply_train(params, x):
    # Training outputs use batch statistics only, so any stored values do:
    # zeros of the state's shapes, whose update is discarded.
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype),
                         shapes["batch_stats"])
    return apply_with_state(params, zeros, x, True)[0]

  return Model(init, apply_train, None, init_state, apply_with_state,
               transductive)
