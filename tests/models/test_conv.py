"""``models.conv2d`` against ``lax.conv_general_dilated``, to second order.

``conv2d`` computes its derivatives with hand-written transposed
convolutions, so every derivative that MAML uses is checked: numerically
(``jax.test_util.check_grads``, order 2, reverse mode) and against JAX's
own rules, in float64.
"""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from metalearn import models

# (strides, padding, rhs_dilation), on a 7x6 input so that odd sizes and
# uneven padding are exercised.
GEOMETRIES = [
    pytest.param((1, 1), "SAME", (1, 1), id="s1-same"),
    pytest.param((1, 1), "VALID", (1, 1), id="s1-valid"),
    pytest.param((2, 2), "SAME", (1, 1), id="s2-same"),
    pytest.param((2, 2), "VALID", (1, 1), id="s2-valid"),
    pytest.param((2, 1), ((2, 0), (1, 2)), (1, 1), id="s21-explicit"),
    pytest.param((1, 1), ((2, 0), (1, 2)), (1, 1), id="s1-explicit"),
    pytest.param((1, 1), ((-1, 1), (0, -1)), (1, 1), id="s1-negative"),
    pytest.param((1, 2), "SAME", (2, 1), id="dilated"),
]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _operands(seed=0, batch=2, in_ch=2, out_ch=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, 7, 6, in_ch)))
  w = jnp.asarray(rng.normal(size=(3, 3, in_ch, out_ch)))
  return x, w


def _convs(strides, padding, rhs_dilation):
  def ours(x, w):
    return models.conv2d(
        x, w, strides, padding, rhs_dilation=rhs_dilation
    )

  def reference(x, w):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  return ours, reference


def _derivatives(conv, x, w, seed=1):
  """Values, the VJP, and the gradient of a projection of the VJP with
  respect to ``x``, ``w`` and the cotangent (all second derivatives)."""
  out = conv(x, w)
  rng = np.random.default_rng(seed)
  ct = jnp.asarray(rng.normal(size=out.shape))
  u = jnp.asarray(rng.normal(size=x.shape))
  v = jnp.asarray(rng.normal(size=w.shape))

  def projected_vjp(x, w, ct):
    dx, dw = jax.vjp(conv, x, w)[1](ct)
    return jnp.sum(dx * u) + jnp.sum(dw * v)

  first = jax.vjp(conv, x, w)[1](ct)
  second = jax.grad(projected_vjp, (0, 1, 2))(x, w, ct)
  return out, first, second


@pytest.mark.parametrize("strides,padding,rhs_dilation", GEOMETRIES)
def test_derivatives_equal_lax(x64, strides, padding, rhs_dilation):
  ours, reference = _convs(strides, padding, rhs_dilation)
  x, w = _operands()
  got = jax.jit(lambda x, w: _derivatives(ours, x, w))(x, w)
  want = jax.jit(lambda x, w: _derivatives(reference, x, w))(x, w)
  assert got[0].dtype == jnp.float64
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "strides,padding,rhs_dilation", GEOMETRIES[:4]
)
def test_numerical_gradients(x64, strides, padding, rhs_dilation):
  ours, _ = _convs(strides, padding, rhs_dilation)
  x, w = _operands(batch=1, in_ch=1, out_ch=2)
  jax.test_util.check_grads(
      jax.jit(ours), (x, w), order=2, modes=["rev"], eps=1e-4
  )


def test_per_task_weights_under_vmap():
  """Per-task kernels (MAML's inner loop under vmap) differentiate like lax."""
  ours, reference = _convs((2, 2), "SAME", (1, 1))
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(3, 2, 7, 6, 2)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)

  def loss(conv):
    return lambda w, x: jnp.sum(jnp.sin(conv(x, w)))

  got = jax.jit(jax.vmap(jax.grad(loss(ours))))(ws, xs)
  want = jax.jit(jax.vmap(jax.grad(loss(reference))))(ws, xs)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_other_layouts_fall_back_to_lax():
  x, w = _operands()
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  nchw = jnp.transpose(x, (0, 3, 1, 2))
  got = models.conv2d(
      nchw, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW")
  )
  want = jnp.transpose(models.conv2d(x, w, (1, 1), "SAME"), (0, 3, 1, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Kernels larger than their inputs (the shape of MAML's second-order
# terms), which conv2d computes with the operands' roles exchanged.
LARGE_KERNELS = [
    pytest.param((1, 1), (1, 1), ((4, 4), (3, 5)), id="plain"),
    pytest.param((1, 1), (2, 1), ((6, 2), (4, 4)), id="rhs-dilated"),
    pytest.param((2, 1), (1, 1), ((4, 5), (4, 4)), id="lhs-dilated"),
    pytest.param((2, 2), (1, 2), ((1, 0), (7, 1)), id="both-dilated"),
]


@pytest.mark.parametrize("lhs_dilation,rhs_dilation,padding", LARGE_KERNELS)
def test_large_kernels_equal_lax_to_second_order(
    x64, lhs_dilation, rhs_dilation, padding
):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, 2, 2)))
  w = jnp.asarray(rng.normal(size=(5, 4, 2, 3)))

  def ours(x, w):
    return models.conv2d(x, w, (1, 1), padding, lhs_dilation, rhs_dilation)

  def reference(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, lhs_dilation, rhs_dilation,
        ("NHWC", "HWIO", "NHWC"),
    )

  got = jax.jit(lambda x, w: _derivatives(ours, x, w))(x, w)
  want = jax.jit(lambda x, w: _derivatives(reference, x, w))(x, w)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU only")
def test_second_order_maml_has_no_reversed_convolutions():
  # XLA swaps the operands of a convolution whose kernel outgrows its
  # input, leaving a window reversal that XLA:CPU runs slower (MAML k=5
  # 1.49x faster without it: benchmarks/README.md, throughput.py section).
  # conv2d swaps those itself.
  net = models.conv4(5, features=8, downsample="max_pool")
  x, y = jnp.ones((5, 28, 28, 1)), jnp.arange(5)
  params = net.init(jax.random.key(0), x)

  def loss(p):
    return -jnp.mean(jax.nn.log_softmax(net.apply(p, x))[y, y])

  def outer(p):
    return loss(jax.tree.map(lambda a, g: a - 0.4 * g, p, jax.grad(loss)(p)))

  hlo = jax.jit(jax.grad(outer)).lower(params).compile().as_text()
  assert hlo.count(" convolution(") == 42
  assert "rhs_reversal" not in hlo
