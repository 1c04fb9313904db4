"""The learned-optimiser interface and the features learned optimisers share."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class LearnedOptimizer(NamedTuple):
  """A meta-learnable update rule: meta-parameters plus an optax transform.

  Attributes:
    init: ``init(key) -> theta``, the meta-parameters (a pytree of arrays).
    opt_fn: ``opt_fn(theta) -> optax.GradientTransformationExtraArgs``. The
      transformation maps gradients to updates (to be added to the
      parameters with ``optax.apply_updates``), so it composes with
      ``optax.chain`` and drives any inner loop. It is a pure function of
      ``theta``: differentiating an unroll of it with respect to ``theta``
      gives the meta-gradient. Transformations that read the loss take it
      as the ``value`` extra argument, as ``optax.polyak_sgd`` does.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> lopt = learnable_sgd(0.1)  # theta = log(0.1)
    >>> theta = lopt.init(jax.random.key(0))
    >>> tx = optax.chain(optax.clip(1.0), lopt.opt_fn(theta))
    >>> params = {"w": jnp.ones(3)}
    >>> updates, _ = tx.update({"w": jnp.full(3, 2.0)}, tx.init(params),
    ...                        params)
    >>> [round(float(u), 4) for u in updates["w"]]  # clipped gradient * -0.1
    [-0.1, -0.1, -0.1]

  References:
    Metz et al., `Practical tradeoffs between memory, compute, and
    performance in learned optimizers <https://arxiv.org/abs/2203.11860>`_,
    2022 (the ``init``/``opt_fn`` split of ``learned_optimization``).
  """

  init: Callable[[jax.Array], PyTree]
  opt_fn: Callable[[PyTree], optax.GradientTransformationExtraArgs]


class LearnableSGDParams(NamedTuple):
  """The meta-parameters of :func:`learnable_sgd`: a log step size."""

  log_lr: jax.Array


def learnable_sgd(init_lr: float = 0.01) -> LearnedOptimizer:
  r"""Gradient descent whose step size is meta-learned.

  The update is :math:`-e^{\theta} g`; :math:`\theta = \log \alpha` is
  meta-learned. It is the simplest learned optimiser, a baseline, and a
  reference to test meta-gradient estimators against.

  Args:
    init_lr: the initial step size.

  Returns:
    A :class:`LearnedOptimizer` with :class:`LearnableSGDParams`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> lopt = learnable_sgd(0.5)
    >>> tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
    >>> tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))[0]
    Array([-1.], dtype=float32)
  """
  if not init_lr > 0:
    raise ValueError(f"init_lr must be > 0, got {init_lr}")

  def init(key):
    del key
    return LearnableSGDParams(jnp.log(jnp.asarray(init_lr, jnp.float32)))

  def opt_fn(theta: LearnableSGDParams):
    lr = jnp.exp(theta.log_lr)

    def update_fn(updates, state, params=None, **extra_args):
      del params, extra_args
      return jax.tree.map(lambda g: -lr * g, updates), state

    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(), update_fn
    )

  return LearnedOptimizer(init, opt_fn)


def log_sign_features(x: jax.Array, p: float = 10.0) -> jax.Array:
  r"""The gradient preprocessing of Andrychowicz et al. (2016).

  Gradients span many orders of magnitude, so each coordinate becomes two
  features of order one:

  .. math::
    x \mapsto \begin{cases}
      (\log |x| / p, \; \mathrm{sgn}(x)) & |x| \ge e^{-p} \\
      (-1, \; e^{p} x) & \text{otherwise.}
    \end{cases}

  Args:
    x: any array.
    p: the scale; ``p = 10`` in the paper.

  Returns:
    ``x.shape + (2,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> log_sign_features(jnp.array([1.0, -jnp.e ** 5, 0.0]))
    Array([[ 0. ,  1. ],
           [ 0.5, -1. ],
           [-1. ,  0. ]], dtype=float32)

  References:
    Andrychowicz et al., `Learning to learn by gradient descent by gradient
    descent <https://arxiv.org/abs/1606.04474>`_, 2016 (Appendix A).
  """
  if not p > 0:
    raise ValueError(f"p must be > 0, got {p}")
  threshold = jnp.exp(-p)
  big = jnp.abs(x) >= threshold
  # The maximum keeps log's gradient finite in the branch that is not taken.
  log_mag = jnp.where(big, jnp.log(jnp.maximum(jnp.abs(x), threshold)) / p,
                      -1.0)
  sign = jnp.where(big, jnp.sign(x), jnp.exp(p) * x)
  return jnp.stack([log_mag, sign], axis=-1)


def second_moment_normalize(
    x: jax.Array, segments: np.ndarray, eps: float = 1e-5
) -> jax.Array:
  """Divides ``x [n, features]`` by its root mean square over the rows of
  each segment (each parameter tensor), as learned optimisers normalise
  their input features.

  Args:
    x: features of the concatenated coordinates of all tensors.
    segments: ``int [n]``, the tensor of each row (:func:`segment_ids`).
    eps: added to the mean square.

  Returns:
    ``x`` normalised per tensor and feature.
  """
  num = int(segments.max()) + 1 if segments.size else 0
  counts = np.bincount(segments, minlength=num).astype(np.float32)
  sums = jax.ops.segment_sum(jnp.square(x), segments, num_segments=num)
  mean_sq = sums / counts[:, None]
  return x * jax.lax.rsqrt(eps + mean_sq)[segments]



def segment_ids(tree: PyTree) -> np.ndarray:
  """For the concatenation of ``tree``'s leaves (the order of
  ``jax.flatten_util.ravel_pytree``), the index of the leaf each coordinate
  comes from: a static ``int32 [size]`` array."""
  sizes = [int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(tree)]
  return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
