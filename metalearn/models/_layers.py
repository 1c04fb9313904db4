"""Layers chosen for meta-learning: per-batch normalisation, fast pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 (floor mode), as the element-wise
  maximum of the window's four strided slices.

  Equivalent to ``flax.linen.max_pool(x, (2, 2), (2, 2))`` with VALID padding,
  but its gradient is several times faster on XLA:CPU than the
  ``lax.reduce_window`` that flax uses (see ``benchmarks/README.md``).
  Tied inputs share the gradient equally (``jnp.maximum``'s rule), rather
  than only the first one receiving it.

  The slices, rather than a reshape to ``[..., H/2, 2, W/2, 2, C]`` and a
  ``max`` over the two window axes, keep a reduction out of the gradient:
  jaxlib 0.10.2's XLA:CPU fuses that reduction's backward pass with the
  surrounding dots into a YNN fusion that crashes (jax-ml/jax#40412; it
  killed ResNet-12 ProtoNet meta-gradients), and the slices' gradient is
  also faster there.

  Args:
    x: ``[..., H, W, C]``.

  Returns:
    ``[..., H // 2, W // 2, C]``.
  """
  *_, h, w, _ = x.shape
  x = x[..., : h - h % 2, : w - w % 2, :]
  top = jnp.maximum(x[..., 0::2, 0::2, :], x[..., 0::2, 1::2, :])
  bottom = jnp.maximum(x[..., 1::2, 0::2, :], x[..., 1::2, 1::2, :])
  return jnp.maximum(top, bottom)


class BatchNorm(nn.Module):
  """Batch normalisation for meta-learning, transductive or with running
  statistics.

  By default (``running=False``) this is BatchNorm as Finn et al.'s MAML
  uses it: no running averages, the statistics of the data at hand are
  used in training and at test time alike. Under ``jax.vmap`` over tasks
  each task is normalised with its own statistics (per-task batch
  statistics), which keeps a task's prediction independent of the other
  tasks in the meta-batch; but a query's prediction depends on the other
  queries normalised with it (transductive).

  With ``running=True`` the layer also keeps running estimates of the mean
  and variance in the ``"batch_stats"`` collection. With ``train=True`` it
  normalises with the batch statistics and, when ``"batch_stats"`` is
  mutable, moves the running estimates towards them by ``1 - momentum``
  (flax's and PyTorch's convention); with ``train=False`` it normalises
  with the running estimates alone, so each input's output depends on that
  input only (Snell et al.'s and most libraries' test-time behaviour).

  With ``support=True`` the stored values are not running estimates but
  the statistics of the last training batch, gradients included: a task's
  support set run with ``train=True`` stores its statistics, and inputs
  run with ``train=False`` (the queries) are normalised with them, so each
  query's output depends on the support set and itself only, in
  meta-training and at test alike (the support-set moments of Bronskill et
  al., TaskNorm, 2020). Only the scale and offset are parameters.
  """

  epsilon: float = 1e-5
  momentum: float = 0.9
  running: bool = False
  support: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    # The running estimates exist from init on; a training forward that
    # cannot update them (a layer-by-layer stage) need not see them.
    keeps = self.running or self.support
    stored = keeps and (
        not train or self.is_mutable_collection("batch_stats"))
    if stored:
      ra_mean = self.variable("batch_stats", "mean", jnp.zeros,
                              (features,), jnp.float32)
      ra_var = self.variable("batch_stats", "var", jnp.ones,
                             (features,), jnp.float32)
    if keeps and not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = x.mean(axes)
      var = jnp.square(x - mean).mean(axes)
      if stored and self.support and not self.is_initializing():
        ra_mean.value, ra_var.value = mean, var
      elif stored and not self.is_initializing():
        m = self.momentum
        ra_mean.value = (m * ra_mean.value
                         + (1 - m) * jax.lax.stop_gradient(mean))
        ra_var.value = (m * ra_var.value
                        + (1 - m) * jax.lax.stop_gradient(var))
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    return y * scale + bias


def norm_layer(norm: str, x: jax.Array, train: bool) -> jax.Array:
  """Applies the normalisation ``norm`` names (inside a compact module).

  ``"transductive"``: :class:`BatchNorm` with batch statistics;
  ``"running"``: :class:`BatchNorm` with running statistics;
  ``"support"``: :class:`BatchNorm` with the support set's statistics;
  ``"none"``: the identity.
  """
  if norm == "none":
    return x
  return BatchNorm(running=norm == "running",
                   support=norm == "support")(x, train)
