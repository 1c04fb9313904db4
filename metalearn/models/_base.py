"""The pure model interface used at the meta-learner boundary."""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

PyTree = Any


class Model(NamedTuple):
  """A network as two pure functions over a plain parameter pytree.

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
  """

  init: Callable[[jax.Array, jax.Array], PyTree]
  apply: Callable[[PyTree, jax.Array], jax.Array]
  layers: tuple[Callable[[PyTree, jax.Array], jax.Array], ...] | None = None


def from_flax(module: nn.Module) -> Model:
  """Wraps a stateless flax ``linen`` module as a :class:`Model`.

  The module must keep no mutable collections (no running BatchNorm
  statistics): our normalisation layers use the statistics of the batch they
  are given, which is the behaviour MAML's inner loop needs.

  Args:
    module: the flax module.

  Returns:
    A :class:`Model` whose params are the module's ``"params"`` collection.
  """

  def init(key: jax.Array, x: jax.Array) -> PyTree:
    return module.init(key, x)["params"]

  def apply(params: PyTree, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  return Model(init=init, apply=apply)
