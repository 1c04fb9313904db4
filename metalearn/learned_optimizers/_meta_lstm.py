"""The meta-learner LSTM update rule of Ravi & Larochelle (2017)."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metalearn.learned_optimizers._base import (
    LearnedOptimizer,
    log_sign_features,
)

NUM_GATE_FEATURES = 6


class MetaLSTMOptimizerParams(NamedTuple):
  """Gate weights shared by every coordinate.

  Attributes:
    w_input: ``[6]``, input-gate weights over the features
      ``[pre(g), pre(loss), phi, previous input gate]``.
    b_input: ``[]``, input-gate bias.
    w_forget: ``[6]``, forget-gate weights over the features
      ``[pre(g), pre(loss), phi, previous forget gate]``.
    b_forget: ``[]``, forget-gate bias.
  """

  w_input: jax.Array
  b_input: jax.Array
  w_forget: jax.Array
  b_forget: jax.Array


class MetaLSTMOptimizerState(NamedTuple):
  """The previous gates, ``[num_coordinates]`` each (all parameters
  concatenated in the order of ``jax.flatten_util.ravel_pytree``)."""

  input_gate: jax.Array
  forget_gate: jax.Array


def meta_lstm_optimizer(
    init_lr: float = 0.1,
    init_forget_bias: float = 5.0,
    *,
    p: float = 10.0,
    init_scale: float = 0.01,
) -> LearnedOptimizer:
  r"""The LSTM-cell update of Ravi & Larochelle, as an optax transform.

  The learner's parameters :math:`\phi` are the cell state of an LSTM whose
  candidate is the negative gradient:

  .. math::
    \phi_t = f_t \odot \phi_{t-1} + i_t \odot (-\nabla_t), \qquad
    i_t = \sigma(W_I \cdot [\tilde\nabla_t, \tilde L_t, \phi_{t-1},
                            i_{t-1}] + b_I), \qquad
    f_t = \sigma(W_F \cdot [\tilde\nabla_t, \tilde L_t, \phi_{t-1},
                            f_{t-1}] + b_F),

  per coordinate, with :math:`\tilde x` the log-magnitude and sign
  preprocessing (:func:`log_sign_features`). The input gate is a learned,
  adaptive step size; the forget gate a learned shrinkage. The update
  returned is :math:`\phi_t - \phi_{t-1} = (f_t - 1)\phi_{t-1} - i_t
  \nabla_t`.

  Deviations from the paper, for simplicity: the gates read the
  preprocessed gradient and loss directly, without the paper's first,
  ordinary LSTM layer over them; and there is no batch normalisation of
  the inputs.

  Args:
    init_lr: the initial input gate, :math:`\sigma(b_I)` (the weights start
      near zero, so this is the initial step size).
    init_forget_bias: :math:`b_F` at initialisation; large, so that
      :math:`f \approx 1` (the paper uses 4 to 6).
    p: the preprocessing scale.
    init_scale: weights start uniform in ``[-init_scale, init_scale]``.

  Returns:
    A :class:`LearnedOptimizer` with :class:`MetaLSTMOptimizerParams`. Its
    ``update(grads, state, params, value=loss)`` needs ``params``; the loss
    ``value`` is optional (its features are zero without it).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> lopt = meta_lstm_optimizer(init_lr=0.5)
    >>> tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
    >>> params = jnp.zeros(2)
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(params), params,
    ...                        value=1.0)
    >>> updates.round(1)
    Array([-0.5, -0.5], dtype=float32)

  References:
    Ravi & Larochelle, `Optimization as a Model for Few-Shot Learning
    <https://openreview.net/forum?id=rJY0-Kcll>`_, 2017.
  """
  if not 0 < init_lr < 1:
    raise ValueError(f"init_lr must be in (0, 1), got {init_lr}")

  def init(key):
    k_i, k_f = jax.random.split(key)
    uniform = lambda k: jax.random.uniform(  # noqa: E731
        k, (NUM_GATE_FEATURES,), minval=-init_scale, maxval=init_scale
    )
    return MetaLSTMOptimizerParams(
        uniform(k_i),
        jnp.asarray(math.log(init_lr / (1 - init_lr)), jnp.float32),
        uniform(k_f),
        jnp.asarray(init_forget_bias, jnp.float32),
    )

  def opt_fn(theta: MetaLSTMOptimizerParams):

    def init_fn(params):
      flat, _ = ravel_pytree(params)
      return MetaLSTMOptimizerState(jnp.zeros_like(flat), jnp.zeros_like(flat))

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
      del extra_args
      if params is None:
        raise ValueError("meta_lstm_optimizer needs params (the cell state)")
      g, unravel = ravel_pytree(updates)
      phi, _ = ravel_pytree(params)
      loss = jnp.zeros(()) if value is None else jnp.asarray(value)
      shared = jnp.concatenate(
          [
              log_sign_features(g, p),
              jnp.broadcast_to(log_sign_features(loss, p), (g.size, 2)),
              phi[:, None],
          ],
          axis=-1,
      )

      def gate(w, b, previous):
        features = jnp.concatenate([shared, previous[:, None]], axis=-1)
        return jax.nn.sigmoid(features @ w + b)

      i = gate(theta.w_input, theta.b_input, state.input_gate)
      f = gate(theta.w_forget, theta.b_forget, state.forget_gate)
      return unravel((f - 1.0) * phi - i * g), MetaLSTMOptimizerState(i, f)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return LearnedOptimizer(init, opt_fn)
