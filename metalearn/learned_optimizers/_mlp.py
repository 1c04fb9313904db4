"""A per-parameter MLP optimiser fed with momentum and second moments."""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metalearn.learned_optimizers._base import (
    LearnedOptimizer,
    second_moment_normalize,
    segment_ids,
)

_TIMESCALES = (10.0, 100.0, 1000.0)


class MLPOptimizerParams(NamedTuple):
  """Meta-parameters of :func:`mlp_optimizer`: the layers of one small MLP
  shared by all coordinates (``weights[i]: [in, out]``, ``biases[i]:
  [out]``)."""

  weights: tuple[jax.Array, ...]
  biases: tuple[jax.Array, ...]


class MLPOptimizerState(NamedTuple):
  """Accumulators of :func:`mlp_optimizer`.

  Attributes:
    count: the number of updates so far (int32 scalar).
    mu: ``[num_decays, num_coordinates]``, the momentum at each decay of
      every coordinate (all parameters concatenated in the order of
      ``jax.flatten_util.ravel_pytree``).
    nu: the same for the second moment of the gradient.
  """

  count: jax.Array
  mu: jax.Array
  nu: jax.Array


def num_mlp_features(num_decays: int) -> int:
  """The number of per-coordinate inputs of :func:`mlp_optimizer`: the
  gradient, the parameter, then momentum, root second moment and their
  ratio at each decay, then the training-step features."""
  return 2 + 3 * num_decays + len(_TIMESCALES)


def _features(g, p, mu, nu, count, segments, eps, eps_root):
  """Per-coordinate features ``[n, num_features]`` of the concatenated
  gradient ``g [n]``, parameters ``p [n]`` and moments ``mu, nu [K, n]``."""
  # eps_root keeps the derivative of the square root finite at nu = 0, as
  # meta-gradients through Adam-like statistics need.
  rms = jnp.sqrt(nu + eps_root)
  coordinate = jnp.concatenate(
      [g[:, None], p[:, None], mu.T, rms.T, (mu / (rms + eps)).T], axis=1
  )
  # Every feature is normalised over its tensor: the network sees the shape
  # of the distribution of gradients, not their absolute scale.
  coordinate = second_moment_normalize(coordinate, segments)
  time = jnp.tanh(count.astype(jnp.float32) / jnp.asarray(_TIMESCALES))
  return jnp.concatenate(
      [coordinate, jnp.broadcast_to(time, (g.size, len(_TIMESCALES)))], axis=1
  )


def mlp_optimizer(
    hidden_sizes: Sequence[int] = (32, 32),
    decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999),
    *,
    step_mult: float = 1e-3,
    exp_mult: float = 1e-3,
    eps: float = 1e-8,
    eps_root: float = 1e-12,
    adam_lr: float | None = None,
    adam_decays: tuple[float, float] = (0.9, 0.999),
) -> LearnedOptimizer:
  r"""A per-parameter MLP optimiser over momentum and second-moment features.

  For every coordinate :math:`j`, the optimiser keeps momenta
  :math:`m_k^j` and second moments :math:`v_k^j` of its gradient at each
  decay :math:`\beta_k`. Its inputs are :math:`g^j`, :math:`\phi^j`,
  :math:`m_k^j`, :math:`\sqrt{v_k^j}` and :math:`m_k^j / (\sqrt{v_k^j} +
  \epsilon)`, each normalised by its root mean square over the tensor, plus
  :math:`\tanh(t / \tau)` for :math:`\tau \in \{10, 100, 1000\}`. One MLP,
  shared by every coordinate, outputs a direction :math:`d^j` and a
  log-magnitude :math:`a^j`, and the update is

  .. math::
    \phi^j \leftarrow \phi^j - d^j \exp(a^j\, \eta_{exp})\, \eta.

  With ``adam_lr`` set, the network corrects Adam instead of replacing it
  (a residual parametrisation; Metz et al. 2022 build on Adam similarly):

  .. math::
    \phi^j \leftarrow \phi^j - \alpha \exp(a^j\, \eta_{exp})
    \frac{\hat m^j}{\sqrt{\hat v^j} + \epsilon} - d^j\, \eta,

  with Adam's bias-corrected moments at ``adam_decays`` (both must be in
  ``decays``), and the network's last layer starts at zero, so that before
  meta-training the optimiser *is* Adam with learning rate
  :math:`\alpha` (give it the tuned one). Meta-training then starts from
  a strong baseline and learns per-coordinate step-size changes and
  corrections to it.

  Args:
    hidden_sizes: hidden widths of the MLP (ReLU).
    decays: the decays :math:`\beta_k` of the moment accumulators.
    step_mult: :math:`\eta`, the scale of the step.
    exp_mult: :math:`\eta_{exp}`, the scale of the log-magnitude.
    eps: added to :math:`\sqrt{v}` in the ratio features.
    eps_root: added to :math:`v` under the square root, so that
      meta-gradients through it stay finite.
    adam_lr: :math:`\alpha`; ``None`` (default) is the plain MLP update.
    adam_decays: Adam's :math:`(\beta_1, \beta_2)`, taken from ``decays``.

  Returns:
    A :class:`LearnedOptimizer` with :class:`MLPOptimizerParams`; its
    transformation keeps an :class:`MLPOptimizerState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> lopt = mlp_optimizer()
    >>> tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> state.mu.shape
    (4, 6)
    >>> updates, state = jax.jit(tx.update)(params, state, params)
    >>> updates["w"].shape, int(state.count)
    ((3, 2), 1)

  References:
    Metz et al., `Tasks, stability, architecture, and compute: Training
    more effective learned optimizers, and using them to train themselves
    <https://arxiv.org/abs/2009.11243>`_, 2020; Metz et al., `VeLO:
    Training Versatile Learned Optimizers by Scaling Up
    <https://arxiv.org/abs/2211.09760>`_, 2022.
  """
  hidden_sizes = tuple(hidden_sizes)
  decays = tuple(float(d) for d in decays)
  if not decays or not all(0.0 <= d < 1.0 for d in decays):
    raise ValueError(f"decays must be non-empty, each in [0, 1), got {decays}")
  if not all(isinstance(w, int) and w >= 1 for w in hidden_sizes):
    raise ValueError(f"hidden_sizes must be ints >= 1, got {hidden_sizes}")
  if not step_mult > 0:
    raise ValueError(f"step_mult must be > 0, got {step_mult}")
  if adam_lr is not None:
    if not adam_lr > 0:
      raise ValueError(f"adam_lr must be > 0 or None, got {adam_lr}")
    missing = [d for d in adam_decays if float(d) not in decays]
    if len(adam_decays) != 2 or missing:
      raise ValueError(
          f"adam_decays must be two of decays {decays}, got {adam_decays}")
    b1, b2 = (float(d) for d in adam_decays)
    i1, i2 = decays.index(b1), decays.index(b2)
  sizes = (num_mlp_features(len(decays)), *hidden_sizes, 2)
  beta = jnp.asarray(decays)[:, None]

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    weights = tuple(
        jax.random.normal(k, (m, n)) / jnp.sqrt(m)
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    )
    if adam_lr is not None:
      # The output layer starts at zero: the optimiser starts as Adam.
      weights = (*weights[:-1], jnp.zeros_like(weights[-1]))
    biases = tuple(jnp.zeros(n) for n in sizes[1:])
    return MLPOptimizerParams(weights, biases)

  def opt_fn(theta: MLPOptimizerParams):

    def init_fn(params):
      flat, _ = ravel_pytree(params)
      zeros = jnp.zeros((len(decays), flat.size), flat.dtype)
      return MLPOptimizerState(jnp.zeros((), jnp.int32), zeros, zeros)

    def network(x):
      for i, (w, b) in enumerate(zip(theta.weights, theta.biases,
                                     strict=True)):
        x = x @ w + b
        if i < len(theta.weights) - 1:
          x = jax.nn.relu(x)
      return x

    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      if params is None:
        raise ValueError("mlp_optimizer needs params (a feature)")
      # All coordinates of all tensors go through the network at once.
      g, unravel = ravel_pytree(updates)
      p, _ = ravel_pytree(params)
      count = state.count + 1
      mu = beta * state.mu + (1 - beta) * g
      nu = beta * state.nu + (1 - beta) * g * g
      x = _features(g, p, mu, nu, count, segment_ids(updates), eps, eps_root)
      out = network(x)
      direction, magnitude = out[:, 0], out[:, 1]
      if adam_lr is None:
        step = direction * jnp.exp(magnitude * exp_mult) * step_mult
      else:
        t = count.astype(g.dtype)
        m_hat = mu[i1] / (1 - b1**t)
        v_hat = nu[i2] / (1 - b2**t)
        adam = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
        step = (adam_lr * jnp.exp(magnitude * exp_mult) * adam
                + direction * step_mult)
      return unravel(-step), MLPOptimizerState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return LearnedOptimizer(init, opt_fn)
