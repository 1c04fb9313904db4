"""The one inner loop: any optax transformation on one task's data."""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn import models
from metalearn.metalearners._base import task_loss
from metalearn.models import Model

PyTree = Any
Mask = str | PyTree | Callable[[PyTree], PyTree] | None


class InnerResult(NamedTuple):
  """What :func:`inner_optimize` returns.

  Attributes:
    params: the adapted parameters (the frozen leaves of a ``mask``
      unchanged).
    opt_state: the inner transformation's final state (over the masked
      parameters only, see :func:`inner_optimize`).
    model_state: the model's state after the forward passes (``None`` in,
      ``None`` out).
  """

  params: PyTree
  opt_state: PyTree
  model_state: PyTree


def scale_by_rates(rates: PyTree) -> optax.GradientTransformation:
  r"""SGD with a step size per parameter: the update :math:`-\alpha \odot g`.

  Meta-SGD's inner step. ``rates`` is closed over, so the result is
  differentiable with respect to it (the meta-gradient of the rates).

  Args:
    rates: step sizes, a pytree shaped like the parameters it updates.

  Returns:
    A stateless ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_rates(jnp.array([0.1, 1.0]))
    >>> tx.update(jnp.array([1.0, 2.0]), tx.init(None))[0]
    Array([-0.1, -2. ], dtype=float32)
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g, a: -(a * g), updates, rates), state

  return optax.GradientTransformation(init, update)


def _leaf_mask(mask: Mask, params: PyTree) -> list[bool]:
  """One bool per leaf of ``params``: whether it adapts."""
  if callable(mask):
    mask = mask(params)
  if isinstance(mask, str):
    if not isinstance(params, dict) or mask not in params:
      names = sorted(params) if isinstance(params, dict) else None
      raise ValueError(
          f"mask={mask!r} names no top-level sub-tree of the parameters "
          f"(they have {names})")
    mask = {k: k == mask for k in params}
  full = jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, params)
  return jax.tree.leaves(full)


def _partition(mask: Mask, params: PyTree):
  """``(fast, join)``: the adapted part of ``params``, frozen leaves replaced
  by ``optax.MaskedNode()``, and the function that puts them back."""
  if mask is None:
    return params, lambda fast: fast
  flags = _leaf_mask(mask, params)
  leaves, treedef = jax.tree.flatten(params)
  fast = treedef.unflatten(
      [p if m else optax.MaskedNode() for p, m in zip(leaves, flags,
                                                        strict=True)])

  def join(fast):
    adapted = iter(jax.tree.leaves(fast))
    return treedef.unflatten(
        [next(adapted) if m else p for p, m in zip(leaves, flags,
                                                   strict=True)])

  return fast, join


def _batches(x, num_steps, batch_size, key):
  """``[num_steps, batch_size]`` row indices walking through reshuffled
  passes over the ``n`` examples, or ``None`` for full-batch steps."""
  n = jax.tree.leaves(x)[0].shape[0]  # x may be a pytree (MLTI)
  if batch_size is None or batch_size >= n:
    return None
  if key is None:
    raise ValueError("mini-batched inner steps need a key to shuffle by")
  passes = -(-num_steps * batch_size // n)  # ceil
  order = jnp.concatenate([jax.random.permutation(k, n)
                           for k in jax.random.split(key, passes)])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def _take(tree, rows):
  """The rows of every leaf; scalar leaves (MLTI's lam, layer) have none."""
  return jax.tree.map(lambda a: a[rows] if jnp.ndim(a) else a, tree)


def inner_optimize(
    model: Model,
    tx: optax.GradientTransformation,
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    num_steps: int,
    first_order: bool = False,
    mask: Mask = None,
    opt_state: PyTree = None,
    model_state: PyTree = None,
    training: bool = True,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    remat: bool | str = False,
) -> InnerResult:
  r"""Runs ``num_steps`` of ``tx`` on one task's data, as a ``lax.scan``.

  The inner loop of every adapting learner. Each step computes the task
  loss (:func:`~metalearn.metalearners.task_loss`) of the model on ``x``,
  its gradient with respect to the adapted parameters, and applies
  ``tx``'s update; the loss is passed to ``tx.update`` as the ``value``
  extra argument (``optax.with_extra_args_support``), which a learned
  optimiser reads and any other transformation ignores. What each
  learner plugs in:

  - MAML: ``optax.sgd(inner_lr)``, :math:`\phi \leftarrow \phi - \alpha
    \nabla L(\phi)`;
  - Meta-SGD: :func:`scale_by_rates` of the meta-learned rates;
  - ANIL: ``mask="head"``;
  - Reptile: any transformation (Adam), ``batch_size`` and ``key``, and
    optionally the carried ``opt_state``;
  - learned optimisers (Meta-LSTM): ``lopt.opt_fn(theta)``.

  Args:
    model: the network, run with :func:`metalearn.models.forward`.
    tx: any optax transformation.
    params: the starting parameters.
    x: inputs (a pytree of arrays sharing a leading axis is fine).
    y: targets (int labels or float regression targets).
    num_steps: number of steps (static).
    first_order: stop the gradient through the inner gradients and the
      loss values fed to ``tx``, which drops the second-order (Hessian)
      term of a meta-gradient through the loop.
    mask: which parameters adapt: ``None`` for all; the name of a
      top-level sub-tree (``"head"`` for ANIL); a pytree of bools shaped
      like ``params`` or a prefix of it; or a function of ``params``
      returning one. Only the masked leaves are differentiated (no
      gradient is computed for the others) and updated; the others come
      back bit-identical. ``tx`` sees ``params`` with the frozen leaves
      replaced by ``optax.MaskedNode()``, as under ``optax.masked``.
    opt_state: ``tx``'s starting state (over the masked parameters);
      ``None`` for ``tx.init``.
    model_state: the model's state (batch-norm running statistics),
      threaded through every forward pass in order; ``None`` for a
      stateless model.
    training: run the model in training mode (batch statistics, moving
      ``model_state``) or with the stored statistics.
    batch_size: examples per step, drawn without replacement and
      reshuffled each pass over the ``n`` examples (Nichol et al.'s
      sampling); ``None`` or ``>= n`` uses every example every step.
    key: the shuffling key; needed with ``batch_size < n``.
    remat: rematerialise each inner step when differentiating through
      the loop (``jax.checkpoint`` of the step, saving nothing inside
      it): the backward pass keeps only each step's carry (parameters,
      optimiser and model state) and recomputes the step's forward and
      inner gradient from it, so memory no longer holds every step's
      activations, for about one more forward-and-gradient per step.
      ``"nested"`` also groups the steps into about ``sqrt(num_steps)``
      rematerialised chunks, so the backward pass keeps only one carry per
      chunk and those of the chunk it is in (about ``2 sqrt(num_steps)``
      instead of ``num_steps``), for one more forward pass per step.
      Results are unchanged.

  Returns:
    :class:`InnerResult` ``(params, opt_state, model_state)``.

  Raises:
    ValueError: if mini-batches are asked for without a key, or ``mask``
      names no sub-tree.

  Examples:
    >>> import jax, optax
    >>> from metalearn import models, tasks
    >>> ep = tasks.sinusoid_sampler(num_shots=5, num_queries=5).sample(
    ...     jax.random.key(0), None)
    >>> model = models.mlp()
    >>> params = model.init(jax.random.key(1), ep.support_x)
    >>> result = inner_optimize(model, optax.sgd(0.01), params,
    ...                         ep.support_x, ep.support_y, num_steps=2)
    >>> result.params.keys() == params.keys()
    True
  """
  tx = optax.with_extra_args_support(tx)
  fast, join = _partition(mask, params)
  if opt_state is None:
    opt_state = tx.init(fast)
  rows = _batches(x, num_steps, batch_size, key)

  def loss_fn(fast, model_state, xb, yb):
    out, model_state = models.forward(model, join(fast), model_state, xb,
                                      training=training)
    return task_loss(out, yb, prefix="inner/")[0], model_state

  def step(carry, batch):
    fast, opt_state, model_state = carry
    xb, yb = (x, y) if batch is None else (_take(x, batch), _take(y, batch))
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        fast, model_state, xb, yb)
    if first_order:
      loss, grads = jax.lax.stop_gradient((loss, grads))
    updates, opt_state = tx.update(grads, opt_state, fast, value=loss)
    return (optax.apply_updates(fast, updates), opt_state, model_state), None

  if remat not in REMATS:
    raise ValueError(f"remat must be one of {REMATS}, got {remat!r}")
  carry = (fast, opt_state, model_state)
  if remat:
    # Only the carry is a residual: a step's activations and inner
    # gradient are recomputed in the backward pass.
    step = jax.checkpoint(step, policy=_SAVE_NOTHING)
  if remat == "nested" and num_steps > 1:
    carry = _nested_scan(step, carry, rows, num_steps)
  else:
    carry, _ = jax.lax.scan(step, carry, rows,
                            length=num_steps if rows is None else None)
  fast, opt_state, model_state = carry
  return InnerResult(join(fast), opt_state, model_state)


REMATS = (False, True, "nested")
_SAVE_NOTHING = jax.checkpoint_policies.nothing_saveable


def _nested_scan(step, carry, rows, num_steps):
  """``lax.scan(step)`` over ``num_steps`` as rematerialised chunks of
  ``ceil(sqrt(num_steps))`` steps (then the remainder)."""
  size = math.isqrt(num_steps - 1) + 1  # ceil(sqrt(n))
  chunks, rest = divmod(num_steps, size)

  def span(start, stop):
    return None if rows is None else rows[start:stop]

  @functools.partial(jax.checkpoint, policy=_SAVE_NOTHING)
  def chunk(carry, chunk_rows):
    return jax.lax.scan(step, carry, chunk_rows,
                        length=size if chunk_rows is None else None)[0], None

  grouped = span(0, chunks * size)
  if grouped is not None:
    grouped = grouped.reshape(chunks, size, *grouped.shape[1:])
  carry, _ = jax.lax.scan(chunk, carry, grouped,
                          length=chunks if grouped is None else None)
  if rest:
    carry, _ = jax.lax.scan(step, carry, span(chunks * size, num_steps),
                            length=rest if rows is None else None)
  return carry


def inner_sgd(
    model: Model,
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    inner_lr: float | PyTree,
    num_steps: int,
    first_order: bool = False,
    trainable: str | None = None,
) -> PyTree:
  """Gradient descent on one task's data: MAML's inner loop.

  :func:`inner_optimize` with ``optax.sgd(inner_lr)`` (or
  :func:`scale_by_rates` for per-parameter step sizes).

  Args:
    model: the network.
    params: the starting parameters (a nested dict).
    x: inputs.
    y: targets (int labels or float regression targets).
    inner_lr: a step size, or a pytree of step sizes shaped like the
      trainable parameters (Meta-SGD).
    num_steps: number of steps (static).
    first_order: stop the gradient through the inner gradients, which drops
      the second-order (Hessian) term of the meta-gradient.
    trainable: ``None`` to adapt every parameter, or the name of the one
      top-level sub-tree to adapt (``"head"`` for ANIL); the rest is held
      fixed.

  Returns:
    The adapted parameters.
  """
  return inner_optimize(model, _sgd(inner_lr, trainable), params, x, y,
                        num_steps=num_steps, first_order=first_order,
                        mask=trainable).params


def _sgd(inner_lr: float | PyTree,
        trainable: str | None = None) -> optax.GradientTransformation:
  """:func:`inner_sgd`'s transformation.

  Args:
    inner_lr: a step size (``optax.sgd``), or a pytree of step sizes
      (:func:`scale_by_rates`) shaped like the parameters, or like
      ``params[trainable]``.
    trainable: the one top-level sub-tree adapted (the ``mask``), if any.

  Returns:
    The transformation.
  """
  if isinstance(inner_lr, (int, float)) or (
      isinstance(inner_lr, jax.Array) and inner_lr.ndim == 0):
    return optax.sgd(inner_lr)
  if trainable is None:
    return scale_by_rates(inner_lr)

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params  # The other sub-trees are masked: they have no leaves.
    sub = scale_by_rates(inner_lr).update(updates[trainable], state)[0]
    return {**updates, trainable: sub}, state

  return optax.GradientTransformation(init, update)
