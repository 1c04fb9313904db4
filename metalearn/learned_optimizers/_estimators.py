"""Meta-gradient estimators over truncated unrolls: how theta's gradient is
estimated, apart from what is learned (:class:`TruncatedUnroll`)."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.learned_optimizers._unroll import InnerState, TruncatedUnroll

PyTree = Any
Metrics = dict[str, jax.Array]


class GradientEstimator(NamedTuple):
  """A meta-gradient estimator over particles of persistent inner runs.

  Attributes:
    init: ``init(theta, key, data) -> state``: the particles' inner runs
      (and any estimator memory).
    grad: ``grad(theta, state, key, data) -> (grads, state, metrics)``:
      advances every particle by one truncation and returns an estimate of
      the gradient of the meta-objective with respect to ``theta``, the
      new state and metrics (``"meta_loss"``, the mean meta-loss of the
      truncation). Pure and jittable.
  """

  init: Callable[[PyTree, jax.Array, PyTree], PyTree]
  grad: Callable[..., tuple[PyTree, PyTree, Metrics]]


class PESState(NamedTuple):
  """Particles of :func:`pes`, leading axis ``[num_pairs]``.

  Attributes:
    positive: the inner runs unrolled with ``theta + epsilon``.
    negative: their antithetic twins, unrolled with ``theta - epsilon``.
    accumulated: ``xi``, the sum of the perturbations each pair has seen
      since its task began (a tree shaped like ``theta``).
  """

  positive: InnerState
  negative: InnerState
  accumulated: PyTree


def _check_particles(name, value):
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _init_particles(unroll: TruncatedUnroll, theta, key, data, num, stagger):
  """Fresh inner runs; with ``stagger``, each starts a random number of
  truncations into its horizon, so that resets do not happen in lockstep
  (which would make every meta-step see the same phase of training)."""
  init_key, stagger_key = jax.random.split(key)
  keys = jax.random.split(init_key, num)
  states = jax.vmap(unroll.init, in_axes=(None, 0, None))(theta, keys, data)
  if stagger:
    num_truncations = unroll.horizon // unroll.truncation_length
    offset = jax.random.randint(stagger_key, (num,), 0, num_truncations)
    states = states._replace(
        step=(offset * unroll.truncation_length).astype(jnp.int32)
    )
  return states


def truncated_backprop(
    unroll: TruncatedUnroll, *, num_particles: int, stagger: bool = True
) -> GradientEstimator:
  r"""Truncated backpropagation through time.

  Each particle unrolls ``truncation_length`` inner steps from its carried
  state; the estimate is the exact gradient of the mean meta-loss of the
  truncation with respect to ``theta``, with the carried state treated as
  a constant. That cuts the dependence of later losses on earlier updates:
  cheap and low-variance, but biased towards short-horizon (greedy)
  optimisers.

  Args:
    unroll: what is learned.
    num_particles: inner runs, vmapped.
    stagger: start the particles at different points of their horizon.

  Returns:
    A :class:`GradientEstimator` whose state is a batched
    :class:`InnerState`.

  References:
    Williams & Peng, `An efficient gradient-based algorithm for on-line
    training of recurrent network trajectories
    <https://doi.org/10.1162/neco.1990.2.4.490>`_, 1990.
  """
  _check_particles("num_particles", num_particles)

  def init(theta, key, data):
    return _init_particles(unroll, theta, key, data, num_particles, stagger)

  def grad(theta, states: InnerState, key, data):
    keys = jax.random.split(key, num_particles)

    def mean_loss(theta):
      states_out, losses = jax.vmap(
          unroll.unroll, in_axes=(None, 0, 0, None)
      )(theta, jax.lax.stop_gradient(states), keys, data)
      return jnp.mean(losses), states_out

    (loss, states), grads = jax.value_and_grad(mean_loss, has_aux=True)(
        theta)
    return grads, states, {"meta_loss": loss}

  return GradientEstimator(init, grad)


def pes(
    unroll: TruncatedUnroll,
    *,
    num_pairs: int,
    sigma: float = 0.01,
    stagger: bool = True,
) -> GradientEstimator:
  r"""Persistent evolution strategies (antithetic).

  Each pair of particles draws :math:`\epsilon \sim N(0, \sigma^2 I)` per
  truncation and unrolls :math:`\theta + \epsilon` and :math:`\theta -
  \epsilon` from its own carried states, on the same task and minibatches.
  The pair accumulates :math:`\xi \leftarrow \xi + \epsilon` over the
  truncations of its task (reset with the task), and the estimate is

  .. math::
    \hat g = \frac{1}{2 \sigma^2 P} \sum_{p=1}^{P}
      \xi_p \, (L_p^+ - L_p^-).

  Summed over the truncations of a task, it is an unbiased estimate of the
  gradient of the Gaussian-smoothed meta-objective of the *whole* unroll,
  in which each truncation gets its own perturbation: accumulating
  :math:`\xi` credits a truncation's loss to the perturbations of every
  earlier truncation that shaped its inner state. Truncated ES (the same
  without accumulation) is biased in the same way as truncated backprop.
  No backward pass is needed, and the unroll may be non-differentiable or
  chaotic. Pairs with a non-finite loss are left out of the estimate (the
  ``"nonfinite"`` metric counts them).

  Args:
    unroll: what is learned.
    num_pairs: antithetic pairs :math:`P` (``2 P`` inner runs).
    sigma: the perturbation scale :math:`\sigma`.
    stagger: start the pairs at different points of their horizon.

  Returns:
    A :class:`GradientEstimator` whose state is a :class:`PESState`.

  References:
    Vicol, Metz & Sohl-Dickstein, `Unbiased Gradient Estimation in Unrolled
    Computation Graphs with Persistent Evolution Strategies
    <https://arxiv.org/abs/2112.13835>`_, 2021.
  """
  return _antithetic_es(unroll, num_pairs, sigma, stagger, persistent=True)


def truncated_es(
    unroll: TruncatedUnroll,
    *,
    num_pairs: int,
    sigma: float = 0.01,
    stagger: bool = True,
) -> GradientEstimator:
  r"""Truncated evolution strategies (antithetic), for comparison with PES.

  As :func:`pes`, but each truncation's estimate uses only its own
  perturbation (:math:`\xi = \epsilon`): it ignores how earlier
  perturbations shaped the carried inner state, so, like truncated
  backprop, it is biased on long unrolls. Arguments as in :func:`pes`.

  Returns:
    A :class:`GradientEstimator` whose state is a :class:`PESState`.

  References:
    Metz et al., `Understanding and correcting pathologies in the training
    of learned optimizers <https://arxiv.org/abs/1810.10180>`_, 2019.
  """
  return _antithetic_es(unroll, num_pairs, sigma, stagger, persistent=False)


def _antithetic_es(unroll, num_pairs, sigma, stagger, persistent):
  _check_particles("num_pairs", num_pairs)
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  vmapped_unroll = jax.vmap(unroll.unroll, in_axes=(0, 0, 0, None))

  def init(theta, key, data):
    states = _init_particles(unroll, theta, key, data, num_pairs, stagger)
    accumulated = jax.tree.map(
        lambda t: jnp.zeros((num_pairs, *jnp.shape(t)), jnp.result_type(t)),
        theta,
    )
    # The twins start equal, but as separate buffers (states are donated).
    return PESState(states, jax.tree.map(jnp.copy, states), accumulated)

  def grad(theta, state: PESState, key, data):
    noise_key, unroll_key = jax.random.split(key)
    leaves, treedef = jax.tree.flatten(theta)
    noise_keys = jax.random.split(noise_key, len(leaves))
    eps = treedef.unflatten([
        sigma * jax.random.normal(k, (num_pairs, *jnp.shape(t)))
        for k, t in zip(noise_keys, leaves, strict=True)
    ])
    # A pair whose task ends is reset inside the unroll; its memory of the
    # old task's perturbations must go with it.
    reset = state.positive.step >= unroll.horizon

    def restart(xi, e):
      if not persistent:
        return e
      keep = jnp.where(reset, 0.0, 1.0).reshape((-1,) + (1,) * (e.ndim - 1))
      return xi * keep + e

    accumulated = jax.tree.map(restart, state.accumulated, eps)
    keys = jax.random.split(unroll_key, num_pairs)
    plus = jax.tree.map(lambda t, e: t + e, theta, eps)
    minus = jax.tree.map(lambda t, e: t - e, theta, eps)
    positive, loss_pos = vmapped_unroll(plus, state.positive, keys, data)
    negative, loss_neg = vmapped_unroll(minus, state.negative, keys, data)
    # A pair whose inner run diverged (a non-finite loss) contributes
    # nothing; its inner state is replaced at the next reset.
    finite = jnp.isfinite(loss_pos) & jnp.isfinite(loss_neg)
    diff = jnp.where(finite, loss_pos - loss_neg, 0.0) / (2 * sigma**2)
    grads = jax.tree.map(
        lambda xi: jnp.tensordot(diff, xi, axes=1) / num_pairs, accumulated
    )
    mean_loss = jnp.where(finite, 0.5 * (loss_pos + loss_neg), 0.0)
    metrics = {
        "meta_loss": jnp.sum(mean_loss) / jnp.maximum(jnp.sum(finite), 1),
        "nonfinite": 1.0 - jnp.mean(finite),
    }
    return grads, PESState(positive, negative, accumulated), metrics

  return GradientEstimator(init, grad)


MATCHINGS = ("euclidean",)


def bootstrapped(
    unroll: TruncatedUnroll,
    *,
    num_particles: int,
    bootstrap_steps: int = 0,
    target_lr: float | None = 0.1,
    matching: str = "euclidean",
    stagger: bool = True,
) -> GradientEstimator:
  r"""Bootstrapped meta-gradients (BMG).

  Each particle unrolls :math:`K` (``truncation_length``) inner steps from
  its carried state :math:`x_0` (a constant) with :math:`\theta`, reaching
  :math:`x_K(\theta)`. A target is bootstrapped from there: :math:`L`
  (``bootstrap_steps``) further steps of the same optimiser from
  :math:`x_K`, then, if ``target_lr`` is set, one plain gradient step on
  the unroll's meta-objective :math:`f`,

  .. math::
    \tilde x = y_L - \alpha \nabla f(y_L), \qquad
    y_0 = x_K, \; y_{l+1} = y_l + u_\theta(y_l),

  all held constant (stop-gradient in :math:`\theta` and :math:`x_K`).
  The meta-objective is the distance from :math:`x_K(\theta)` to the
  target, here :math:`\mu = \tfrac12 \lVert \tilde x - x_K(\theta)
  \rVert^2` over the inner parameters, and the estimate is

  .. math::
    \hat g = \frac{1}{P} \sum_{p=1}^{P} \frac{\partial x_K^{(p)}}
      {\partial \theta}^{\top} \bigl(x_K^{(p)} - \tilde x^{(p)}\bigr),

  one backward pass through the :math:`K` steps, as in truncated
  backprop; the :math:`L` target steps need no backward pass. The target
  says where the optimiser itself gets to :math:`L` steps later (and a
  gradient step further), so the meta-gradient pulls :math:`K` steps
  towards what :math:`K + L` steps achieve: a horizon beyond the
  truncation at the cost of :math:`L` forward steps. The particle carries
  on from :math:`x_K` (the target steps are discarded), so its task's
  horizon counts :math:`K` steps per truncation, as in the other
  estimators.

  The paper's target bootstrap length is ``bootstrap_steps + 1`` when
  ``target_lr`` is set (its last step is the gradient step). With the
  default, its :math:`L = 1`, the target is one gradient step from
  :math:`x_K`, and the estimate is :math:`\alpha` times the gradient of
  the meta-objective at the end of the truncation alone. Matching in
  parameter space, as here, the optimiser's own steps in the target
  reward stepping further along its current direction; on the sinusoid
  benchmark (``benchmarks/learned_optimizers.py``) targets with
  ``bootstrap_steps >= 1`` made the meta-learned steps, and the inner
  runs, diverge within 200 outer steps, for ``target_lr`` up to 1.

  Args:
    unroll: what is learned; it must have ``advance`` and, if
      ``target_lr`` is set, ``meta_loss`` (:func:`truncated_unroll`
      provides both).
    num_particles: inner runs :math:`P`, vmapped.
    bootstrap_steps: :math:`L \ge 0`, the optimiser's steps from
      :math:`x_K` to the target.
    target_lr: :math:`\alpha`, the final gradient step on the target;
      ``None`` or ``0`` for none. With ``bootstrap_steps=0`` the target is
      one gradient step from :math:`x_K`.
    matching: ``"euclidean"`` (the only one so far).
    stagger: start the particles at different points of their horizon.

  Returns:
    A :class:`GradientEstimator` whose state is a batched
    :class:`InnerState`; its metrics are ``"meta_loss"`` (the mean
    meta-loss of the truncation, as truncated backprop reports) and
    ``"matching"`` (the mean :math:`\mu`).

  References:
    Flennerhag et al., `Bootstrapped Meta-Learning
    <https://arxiv.org/abs/2109.04504>`_, 2022.
  """
  _check_particles("num_particles", num_particles)
  if not isinstance(bootstrap_steps, int) or bootstrap_steps < 0:
    raise ValueError(f"bootstrap_steps must be an int >= 0, got "
                     f"{bootstrap_steps!r}")
  target_lr = target_lr or 0.0
  if not target_lr >= 0:
    raise ValueError(f"target_lr must be >= 0 or None, got {target_lr}")
  if bootstrap_steps == 0 and target_lr == 0:
    raise ValueError("bootstrap_steps=0 and no target_lr: the target would "
                     "be x_K itself, and the meta-gradient zero")
  if matching not in MATCHINGS:
    raise ValueError(f"matching must be one of {MATCHINGS}, got "
                     f"{matching!r}")
  if unroll.advance is None or (target_lr and unroll.meta_loss is None):
    raise ValueError("unroll must have advance (and meta_loss, for "
                     "target_lr): build it with truncated_unroll")
  vmapped_unroll = jax.vmap(unroll.unroll, in_axes=(None, 0, 0, None))

  def target(theta, state: InnerState, key, data):
    steps_key, grad_key = jax.random.split(key)
    if bootstrap_steps:
      state, _ = unroll.advance(theta, state, steps_key, data,
                                bootstrap_steps)
    params = state.params
    if target_lr:
      grads = jax.grad(unroll.meta_loss)(params, state.task, grad_key)
      params = jax.tree.map(lambda p, g: p - target_lr * g, params, grads)
    return params

  def init(theta, key, data):
    return _init_particles(unroll, theta, key, data, num_particles, stagger)

  def grad(theta, states: InnerState, key, data):
    unroll_key, target_key = jax.random.split(key)
    keys = jax.random.split(unroll_key, num_particles)

    def inner_params(theta):
      states_out, losses = vmapped_unroll(
          theta, jax.lax.stop_gradient(states), keys, data)
      return states_out.params, (states_out, losses)

    params, pullback, (states, losses) = jax.vjp(inner_params, theta,
                                                 has_aux=True)
    # The target is built outside the differentiated function: a constant
    # in theta and in x_K by construction.
    targets = jax.vmap(target, in_axes=(None, 0, 0, None))(
        jax.lax.stop_gradient(theta), states,
        jax.random.split(target_key, num_particles), data)
    diffs = jax.tree.map(jnp.subtract, params, targets)
    # x_K - target is d mu / d x_K; the mean over particles scales it.
    (grads,) = pullback(jax.tree.map(lambda d: d / num_particles, diffs))
    matching_loss = sum(0.5 * jnp.sum(d**2) for d in jax.tree.leaves(diffs))
    metrics = {"meta_loss": jnp.mean(losses),
               "matching": matching_loss / num_particles}
    return grads, states, metrics

  return GradientEstimator(init, grad)


# Estimators by name, as configs and scripts choose them.
ESTIMATORS = ("bmg", "pes", "tbptt")


def make_estimator(
    name: str,
    unroll: TruncatedUnroll,
    *,
    pes_pairs: int = 8,
    sigma: float = 0.01,
    tbptt_particles: int = 8,
    bmg_particles: int = 8,
    bmg_steps: int = 0,
    bmg_target_lr: float | None = 0.1,
) -> GradientEstimator:
  """The estimator :data:`ESTIMATORS` names, on ``unroll``.

  Args:
    name: ``"pes"`` (:func:`pes` with ``pes_pairs`` antithetic pairs of
      scale ``sigma``), ``"tbptt"`` (:func:`truncated_backprop` with
      ``tbptt_particles`` particles) or ``"bmg"`` (:func:`bootstrapped`
      with ``bmg_particles`` particles, targets ``bmg_steps`` steps on and
      a final gradient step of ``bmg_target_lr``).
    unroll: what is learned (:func:`truncated_unroll`).
    pes_pairs: PES's antithetic pairs.
    sigma: PES's perturbation scale.
    tbptt_particles: truncated backprop's particles.
    bmg_particles: BMG's particles.
    bmg_steps: BMG's bootstrap steps.
    bmg_target_lr: BMG's final gradient step on the target (``None``:
      none).

  Returns:
    The :class:`GradientEstimator`.

  Raises:
    ValueError: for a name outside :data:`ESTIMATORS`.
  """
  if name == "pes":
    return pes(unroll, num_pairs=pes_pairs, sigma=sigma)
  if name == "tbptt":
    return truncated_backprop(unroll, num_particles=tbptt_particles)
  if name == "bmg":
    return bootstrapped(unroll, num_particles=bmg_particles,
                        bootstrap_steps=bmg_steps, target_lr=bmg_target_lr)
  raise ValueError(
      f"estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}")
