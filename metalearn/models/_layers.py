"""Layers chosen for meta-learning: per-batch normalisation, fast pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 (floor mode) by reshape and max.

  Equivalent to ``flax.linen.max_pool(x, (2, 2), (2, 2))`` with VALID padding,
  but its gradient is several times faster on XLA:CPU than the
  ``lax.reduce_window`` that flax uses (see ``benchmarks/README.md``).
  Ties pass the gradient to every maximal input, not only the first one.

  Args:
    x: ``[..., H, W, C]``.

  Returns:
    ``[..., H // 2, W // 2, C]``.
  """
  *lead, h, w, c = x.shape
  x = x[..., : h - h % 2, : w - w % 2, :]
  x = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
  return x.max(axis=(-4, -2))


class BatchNorm(nn.Module):
  """Normalisation with the statistics of the current batch, always.

  This is BatchNorm as Finn et al.'s MAML uses it: no running averages, the
  batch statistics of the data at hand are used in training and at test
  time alike. Under ``jax.vmap`` over tasks each task is normalised with its
  own statistics (per-task batch statistics), which keeps a task's
  prediction independent of the other tasks in the meta-batch. Only the
  scale and offset are parameters, so the model stays a pure function of
  its params and adapts in the inner loop like any other layer.

  Note that queries are normalised with the statistics of the query batch
  (transductive), as in the MAML reference implementation.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    return y * scale + bias
