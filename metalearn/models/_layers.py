"""Layers chosen for meta-learning: per-batch normalisation, fast pooling."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _window_slices(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four strided slices of ``x``'s 2x2 windows, in row-major window
  order (top left, top right, bottom left, bottom right)."""
  *_, h, w, _ = x.shape
  x = x[..., : h - h % 2, : w - w % 2, :]
  return (x[..., 0::2, 0::2, :], x[..., 0::2, 1::2, :],
          x[..., 1::2, 0::2, :], x[..., 1::2, 1::2, :])


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 (floor mode).

  Equivalent to ``flax.linen.max_pool(x, (2, 2), (2, 2))`` with VALID
  padding, values and gradients alike: the gradient of a window goes to
  its first maximum in row-major order (as ``lax.reduce_window`` and
  PyTorch's ``max_pool2d`` give it), and it is several times faster on
  XLA:CPU (``benchmarks/README.md``, "Speed and memory").

  How, and why:

  - The forward pass is the element-wise maximum of the window's four
    strided slices. A ``max`` over the window axes of a reshape to
    ``[..., H/2, 2, W/2, 2, C]`` puts a reduction in the backward pass,
    which jaxlib 0.10.2's XLA:CPU fused with the surrounding dots into a
    YNN fusion that crashed (jax-ml/jax#40412; it killed ResNet-12
    ProtoNet meta-gradients).
  - The derivative is a custom JVP: the tangent of the window's first
    maximum, picked by a one-hot mask over the reshaped windows. Its
    transpose, the gradient, is then one element-wise pass over the
    input's shape (broadcast the cotangent to the window, keep it at the
    mask). Differentiating the slices instead (``jnp.maximum``'s rule)
    transposes into four interior-padded pads, and their sum, with the
    batch norm and ReLU before the pool recomputed in each, was the
    costliest non-convolution fusion of a Conv-4 meta-gradient.
  - Being a JVP, it serves forward mode and every order of reverse mode
    (second-order MAML differentiates the gradient again; the mask is
    piecewise constant, so it contributes nothing further).

  Args:
    x: ``[..., H, W, C]``.

  Returns:
    ``[..., H // 2, W // 2, C]``.
  """
  a, b, c, d = _window_slices(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  a, b, c, d = _window_slices(x)
  y = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  # Which of the four holds the window's first maximum (3 also for NaN).
  first = jnp.where(a == y, 0, jnp.where(b == y, 1, jnp.where(c == y, 2, 3)))
  first = first.astype(jnp.int8)[..., :, None, :, None, :]
  position = jnp.arange(4, dtype=jnp.int8).reshape(2, 1, 2, 1)
  *lead, h, w, ch = t.shape
  h2, w2 = h // 2, w // 2
  windows = t[..., : 2 * h2, : 2 * w2, :].reshape(*lead, h2, 2, w2, 2, ch)
  return y, jnp.sum(jnp.where(first == position, windows, 0), axis=(-4, -2))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def standardize(x: jax.Array, axes: tuple[int, ...], epsilon: float
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Standardises ``x`` by its own mean and variance over ``axes``.

  Values are those of ``(x - mean) * rsqrt(var + epsilon)`` with ``mean``
  and ``var`` (the biased variance, two-pass) taken over ``axes``, and so
  are the derivatives of every order, forward and reverse. The derivative
  is a custom JVP in closed form: with ``h`` the output, ``s = sqrt(var +
  epsilon)`` and ``t`` the tangent of ``x``,

      dh = (t - mean(t) - h * mean(t * h)) / s,

  so the gradient is the same three-term expression of the cotangent
  (two reductions and one element-wise pass). Differentiating the
  formula instead goes through the square, the rsqrt and two broadcasts
  of the mean, which XLA:CPU ran as about ten passes over the activation:
  the costliest element-wise work of a Conv-4 meta-gradient
  (``benchmarks/README.md``, "Speed and memory").

  Args:
    x: the input.
    axes: the axes the statistics are taken over (static).
    epsilon: added to the variance (static).

  Returns:
    ``(h, mean, var)``, the statistics with ``axes`` reduced; they have
    derivatives too (the support-set normalisation reuses them).
  """
  h, mean, var, _ = _moments(x, axes, epsilon)
  return h, jnp.squeeze(mean, axes), jnp.squeeze(var, axes)


def _moments(x, axes, epsilon):
  """``(h, mean, var, 1 / s)`` of :func:`standardize`, statistics kept
  with their reduced axes."""
  mean = x.mean(axes, keepdims=True)
  var = jnp.square(x - mean).mean(axes, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  return (x - mean) * inv, mean, var, inv


@standardize.defjvp
def _standardize_jvp(axes, epsilon, primals, tangents):
  (x,), (t,) = primals, tangents
  h, mean, var, inv = _moments(x, axes, epsilon)
  t_mean = t.mean(axes, keepdims=True)
  t_h = (t * h).mean(axes, keepdims=True)
  dh = (t - t_mean - h * t_h) * inv
  # d var = 2 mean((x - mean) t) = 2 s mean(h t).
  d_var = 2 * t_h / inv
  out = (h, jnp.squeeze(mean, axes), jnp.squeeze(var, axes))
  return out, (dh, jnp.squeeze(t_mean, axes), jnp.squeeze(d_var, axes))


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
      y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      y, mean, var = standardize(x, axes, self.epsilon)
      if stored and self.support and not self.is_initializing():
        ra_mean.value, ra_var.value = mean, var
      elif stored and not self.is_initializing():
        m = self.momentum
        ra_mean.value = (m * ra_mean.value
                         + (1 - m) * jax.lax.stop_gradient(mean))
        ra_var.value = (m * ra_var.value
                        + (1 - m) * jax.lax.stop_gradient(var))
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
