"""Flax NNX modules as pure :class:`~metalearn.models.Model` functions."""

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from metalearn.models._base import Model

PyTree = Any


def from_nnx(module: nnx.Module | Callable[[nnx.Rngs], nnx.Module], *,
             transductive: bool = False) -> Model:
  """Wraps a flax NNX module as a :class:`Model`.

  The module is split once into its graph definition, its ``nnx.Param``
  variables (the parameters the inner loop differentiates) and its
  ``nnx.BatchStat`` variables (the state, when it has any: ``nnx.BatchNorm``
  running statistics); every call merges a fresh copy, so the functions are
  pure and compose with ``grad``, ``vmap`` and ``scan``. Training mode is
  set with the module's ``train()`` / ``eval()`` (``nnx.BatchNorm`` then
  uses batch statistics and updates the running ones, or uses the running
  ones alone).

  Args:
    module: an NNX module, or a function ``make(rngs) -> module``. With a
      function, ``init(key, x)`` builds a new module from ``nnx.Rngs(key)``;
      with a module, ``init`` returns its current parameters whatever the
      key (its initialisation already happened).
    transductive: declare that an input's outputs depend on the other
      inputs of its batch at meta-test time.

  Returns:
    A :class:`Model`; with ``nnx.BatchStat`` variables it has state.

  Raises:
    ValueError: if the module holds variables other than parameters and
      batch statistics (an ``nnx.Rngs`` for dropout, for instance).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(4, 8, rngs=rngs)
    ...     self.norm = nnx.BatchNorm(8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.norm(self.dense(x))))
    >>> model = from_nnx(Net)
    >>> x = jnp.ones((5, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> state = model.init_state(jax.random.key(0), x)
    >>> y, state = model.apply_with_state(params, state, x, True)
    >>> y.shape
    (5, 3)
  """
  if isinstance(module, nnx.Module):
    template = module
    make = None
  else:
    make = module
    template = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, params, stats, rest = nnx.split(
      template, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise ValueError(
        f"{type(template).__name__} holds variables other than nnx.Param "
        "and nnx.BatchStat; from_nnx needs a module whose only other state "
        "is batch-norm statistics")
  stateful = bool(jax.tree.leaves(stats))

  def split(key):
    if make is None:
      return nnx.split(module, nnx.Param, nnx.BatchStat, ...)[1:3]
    return nnx.split(make(nnx.Rngs(key)), nnx.Param, nnx.BatchStat,
                     ...)[1:3]

  def init(key: jax.Array, x: jax.Array) -> PyTree:
    del x
    return split(key)[0]

  def run(params, state, x, training):
    # Fresh variables at the current trace level (the state may come from
    # an outer trace: a scan carry under a gradient), which NNX needs to
    # let the module update them.
    params, state = jax.tree.map(lambda a: a, (params, state))
    net = nnx.merge(graphdef, params, state, rest)
    if training:
      net.train()
    else:
      net.eval()
    y = net(x)
    return y, jax.lax.stop_gradient(nnx.state(net, nnx.BatchStat))

  def apply(params, x):
    # Training outputs use batch statistics only: any stored values do.
    zeros = jax.tree.map(lambda v: jax.numpy.zeros(v.shape, v.dtype), stats)
    return run(params, zeros, x, True)[0]

  if not stateful:
    return Model(init, apply, transductive=transductive)

  def init_state(key, x):
    del x
    return split(key)[1]

  return Model(init, apply, None, init_state, run, transductive)
