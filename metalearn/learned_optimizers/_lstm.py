"""The coordinate-wise LSTM optimiser of Andrychowicz et al. (2016)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metalearn.learned_optimizers._base import (
    LearnedOptimizer,
    log_sign_features,
)


class LSTMOptimizerParams(NamedTuple):
  """Meta-parameters of :func:`lstm_optimizer`, shared by all coordinates.

  Attributes:
    kernels: per layer, ``[inputs + hidden, 4 * hidden]`` (gates i, f, g, o).
    biases: per layer, ``[4 * hidden]``.
    head_w: ``[hidden]``, the linear read-out.
    head_b: ``[]``.
  """

  kernels: tuple[jax.Array, ...]
  biases: tuple[jax.Array, ...]
  head_w: jax.Array
  head_b: jax.Array


class LSTMOptimizerState(NamedTuple):
  """Recurrent state, one LSTM per coordinate.

  Attributes:
    hidden: ``[num_layers, num_coordinates, hidden_size]``, where the
      coordinates are those of all parameters, concatenated in the order of
      ``jax.flatten_util.ravel_pytree``.
    cell: the LSTM cell states, same shape.
  """

  hidden: jax.Array
  cell: jax.Array


def lstm_cell(kernel, bias, x, h, c):
  """One LSTM step; ``x [n, in]``, ``h, c [n, hidden]``."""
  z = jnp.concatenate([x, h], axis=-1) @ kernel + bias
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _init_lstm(key, hidden_size, num_layers, num_inputs, head_std):
  keys = jax.random.split(key, num_layers + 1)
  kernels, biases = [], []
  for layer in range(num_layers):
    fan_in = (num_inputs if layer == 0 else hidden_size) + hidden_size
    kernels.append(
        jax.random.normal(keys[layer], (fan_in, 4 * hidden_size))
        / jnp.sqrt(fan_in)
    )
    # A forget-gate bias of 1 (Jozefowicz et al., 2015) keeps memory early.
    biases.append(jnp.zeros(4 * hidden_size).at[
        hidden_size:2 * hidden_size].set(1.0))
  head_w = head_std * jax.random.normal(keys[-1], (hidden_size,))
  return LSTMOptimizerParams(
      tuple(kernels), tuple(biases), head_w, jnp.zeros(())
  )


def lstm_optimizer(
    hidden_size: int = 20,
    num_layers: int = 2,
    *,
    p: float = 10.0,
    output_scale: float = 0.1,
    head_init_std: float = 0.1,
) -> LearnedOptimizer:
  r"""A small LSTM, shared by every coordinate, that outputs the update.

  Each coordinate :math:`j` of every parameter runs its own copy of the same
  LSTM :math:`m_\theta` (the weights are shared, the states are not):

  .. math::
    [u_t^j, h_{t+1}^j] = m_\theta(\mathrm{pre}(g_t^j), h_t^j), \qquad
    \phi_{t+1}^j = \phi_t^j + \lambda\, u_t^j,

  where :math:`\mathrm{pre}` is the log-magnitude and sign preprocessing
  (:func:`log_sign_features` with ``p``) and :math:`\lambda` is
  ``output_scale``. As in the paper: two layers of 20 units, output scaled
  by 0.1. The read-out is initialised small (``head_init_std``), so the
  untrained optimiser makes small random steps.

  Args:
    hidden_size: units per LSTM layer.
    num_layers: stacked LSTM layers.
    p: the preprocessing scale.
    output_scale: :math:`\lambda`.
    head_init_std: standard deviation of the initial read-out weights.

  Returns:
    A :class:`LearnedOptimizer` with :class:`LSTMOptimizerParams`; its
    transformation keeps an :class:`LSTMOptimizerState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> lopt = lstm_optimizer()
    >>> tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> state.hidden.shape
    (2, 6, 20)
    >>> updates, state = jax.jit(tx.update)(params, state, params)
    >>> updates["w"].shape
    (3, 2)

  References:
    Andrychowicz et al., `Learning to learn by gradient descent by gradient
    descent <https://arxiv.org/abs/1606.04474>`_, 2016.
  """
  for name, value in (("hidden_size", hidden_size),
                      ("num_layers", num_layers)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if not output_scale > 0:
    raise ValueError(f"output_scale must be > 0, got {output_scale}")

  def init(key):
    return _init_lstm(key, hidden_size, num_layers, 2, head_init_std)

  def opt_fn(theta: LSTMOptimizerParams):

    def init_fn(params):
      flat, _ = ravel_pytree(params)
      zeros = jnp.zeros((num_layers, flat.size, hidden_size), flat.dtype)
      return LSTMOptimizerState(zeros, zeros)

    def update_fn(updates, state, params=None, **extra_args):
      del params, extra_args
      # All coordinates of all tensors go through the network at once.
      g, unravel = ravel_pytree(updates)
      x = log_sign_features(g, p)
      hidden, cell = [], []
      for layer in range(num_layers):
        x, c = lstm_cell(theta.kernels[layer], theta.biases[layer], x,
                         state.hidden[layer], state.cell[layer])
        hidden.append(x)
        cell.append(c)
      out = output_scale * (x @ theta.head_w + theta.head_b)
      return unravel(out), LSTMOptimizerState(jnp.stack(hidden),
                                              jnp.stack(cell))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return LearnedOptimizer(init, opt_fn)
