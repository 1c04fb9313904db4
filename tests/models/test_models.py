"""Conv-4 variants, fast max-pooling and per-batch BatchNorm."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import models


def _normal(shape, seed=0):
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def test_conv4_stride_variant_averages_features_over_space():
  """28x28 -> 14 -> 7 -> 4 -> 2 with stride-2 convs, then a spatial mean."""
  module = models.Conv4(None, features=8, downsample="stride")
  x = _normal((3, 28, 28, 1))
  variables = module.init(jax.random.key(0), x)
  out, state = module.apply(
      variables, x, capture_intermediates=True, mutable=["intermediates"]
  )
  last_block = state["intermediates"]["block3"]["__call__"][0]
  assert last_block.shape == (3, 2, 2, 8)
  np.testing.assert_allclose(out, last_block.mean(axis=(1, 2)), rtol=1e-6)
  model = models.conv4(5, features=8, downsample="stride")
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (3, 5)
  assert params["head"]["kernel"].shape == (8, 5)
  for i in range(4):
    assert params[f"block{i}"]["Conv_0"]["kernel"].shape[:2] == (3, 3)


def test_conv4_max_pool_variant_flattens_800_features_on_84px():
  """84 -> 42 -> 21 -> 10 -> 5 with 2x2 pooling: 5 * 5 * 32 = 800."""
  x = jnp.zeros((2, 84, 84, 3))
  embed = models.conv4(None, features=32)
  shapes = jax.eval_shape(embed.init, jax.random.key(0), x)
  assert jax.eval_shape(embed.apply, shapes, x).shape == (2, 800)
  model = models.conv4(5, features=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert shapes["head"]["kernel"].shape == (800, 5)
  assert jax.eval_shape(model.apply, shapes, x).shape == (2, 5)


def test_conv4_stride_with_flattened_readout():
  """Nichol et al.'s Reptile network: the last 2x2x8 map flattened, 32
  features; its layers compose to apply."""
  x = _normal((3, 28, 28, 1))
  model = models.conv4(5, features=8, downsample="stride", readout="flatten")
  params = model.init(jax.random.key(0), x)
  assert params["head"]["kernel"].shape == (32, 5)
  h = x
  for layer in model.layers:
    h = layer(params, h)
  np.testing.assert_allclose(h, model.apply(params, x), rtol=1e-6)
  mean = models.conv4(5, features=8, downsample="stride", readout="mean")
  assert mean.init(jax.random.key(0), x)["head"]["kernel"].shape == (8, 5)


def test_conv6_pools_in_its_first_four_blocks_only():
  """Chen et al.'s Conv-6 on 84px: 84 -> 42 -> 21 -> 10 -> 5 -> 5 -> 5,
  5 * 5 * 64 = 1600 features; one block pools once; the layers compose."""
  x = jnp.zeros((2, 84, 84, 3))
  conv6 = models.conv4(None, num_blocks=6)
  shapes = jax.eval_shape(conv6.init, jax.random.key(0), x)
  assert sorted(shapes) == [f"block{i}" for i in range(6)]
  assert jax.eval_shape(conv6.apply, shapes, x).shape == (2, 1600)
  one = models.conv4(5, features=8, num_blocks=1)
  x = _normal((3, 28, 28, 1))
  params = one.init(jax.random.key(0), x)
  assert params["head"]["kernel"].shape == (14 * 14 * 8, 5)
  h = x
  for layer in one.layers:
    h = layer(params, h)
  np.testing.assert_allclose(h, one.apply(params, x), rtol=1e-6)


def test_conv4_rejects_bad_arguments():
  with pytest.raises(ValueError, match="downsample"):
    models.conv4(5, downsample="avg_pool")
  with pytest.raises(ValueError, match="readout"):
    models.conv4(5, readout="max")
  with pytest.raises(ValueError, match="readout"):  # the module itself too
    models.Conv4(5, readout="max").init(jax.random.key(0),
                                        jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="num_outputs"):
    models.conv4(0)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="num_blocks"):
      models.conv4(5, num_blocks=bad)


@pytest.mark.parametrize(
    "shape", [(2, 8, 6, 3), (7, 5, 2), (2, 3, 9, 9, 4)], ids=str
)
def test_max_pool_2x2_equals_flax(shape):
  x = _normal(shape)
  want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  got = models.max_pool_2x2(x)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  grad = jax.grad(lambda x, f: jnp.sum(f(x) * jnp.cos(f(x))))
  flax_pool = lambda x: nn.max_pool(x, (2, 2), (2, 2), "VALID")  # noqa: E731
  # Ties (rounded inputs, and all-zero windows as after a ReLU) give the
  # gradient to the window's first maximum, as reduce_window does.
  for inputs in (x, jnp.round(x), jnp.maximum(jnp.round(x), 0.0)):
    np.testing.assert_allclose(
        grad(inputs, models.max_pool_2x2), grad(inputs, flax_pool),
        rtol=1e-6,
    )
  # Second order (the gradient differentiated again) and forward mode.
  grad2 = jax.grad(lambda x, f: jnp.sum(jnp.sin(grad(x, f))))
  np.testing.assert_allclose(
      grad2(x, models.max_pool_2x2), grad2(x, flax_pool), rtol=1e-6
  )
  t = _normal(shape, 1)
  np.testing.assert_allclose(
      jax.jvp(models.max_pool_2x2, (x,), (t,))[1],
      jax.jvp(flax_pool, (x,), (t,))[1],
      rtol=1e-6,
  )


def _batch_norm(x, scale=None, bias=None):
  module = models.BatchNorm()
  params = module.init(jax.random.key(0), x)["params"]
  if scale is not None:
    params = {"scale": scale, "bias": bias}
  return module.apply({"params": params}, x)


def _assert_standardised(y, axes):
  np.testing.assert_allclose(y.mean(axes), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axes), 1.0, rtol=1e-3)


def test_batch_norm_uses_the_statistics_of_each_call():
  channels = jnp.array([0.5, 3.0, 10.0])
  a = _normal((4, 5, 5, 3), 0) * channels + 7.0
  b = _normal((6, 5, 5, 3), 1) * 2.0 - 4.0
  for x in (a, b):
    _assert_standardised(_batch_norm(x), (0, 1, 2))
  scale, bias = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, -1.0, 3.0])
  np.testing.assert_allclose(
      _batch_norm(a, scale, bias), _batch_norm(a) * scale + bias, rtol=1e-5,
      atol=1e-5,
  )
  # No running statistics are kept: only scale and bias are parameters.
  variables = models.BatchNorm().init(jax.random.key(0), a)
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {"scale", "bias"}


def test_batch_norm_under_vmap_normalises_each_task_separately():
  offsets = jnp.array([-5.0, 0.0, 20.0])[:, None, None, None, None]
  spreads = jnp.array([0.5, 1.0, 8.0])[:, None, None, None, None]
  tasks = _normal((3, 4, 5, 5, 2)) * spreads + offsets
  params = models.BatchNorm().init(jax.random.key(0), tasks[0])
  apply = lambda x: models.BatchNorm().apply(params, x)  # noqa: E731
  batched = jax.vmap(apply)(tasks)
  for t in range(3):
    _assert_standardised(batched[t], (0, 1, 2))
    np.testing.assert_allclose(batched[t], apply(tasks[t]), atol=1e-5)


def _standardize_by_formula(x, axes, epsilon):
  mean = x.mean(axes, keepdims=True)
  var = jnp.square(x - mean).mean(axes, keepdims=True)
  h = (x - mean) * jax.lax.rsqrt(var + epsilon)
  return h, jnp.squeeze(mean, axes), jnp.squeeze(var, axes)


@pytest.mark.parametrize("axes", [(0, 1, 2), (0,)], ids=["nhw", "n"])
def test_standardize_derivatives_equal_the_formula(axes):
  """Values, gradients (of the output and of the statistics), the
  gradient differentiated again, and forward mode: the closed-form JVP
  against autodiff of the formula, in float64."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 2)) * [0.5, 4.0] + [1.0, -3.0])
    c = [jnp.asarray(rng.normal(size=s.shape))
         for s in _standardize_by_formula(x, axes, 1e-5)]

    def loss(fn):
      def f(x):
        h, mean, var = fn(x, axes, 1e-5)
        # Nonlinear in h, so second derivatives are not trivially zero.
        return (jnp.sum(c[0] * jnp.tanh(h)) + jnp.sum(c[1] * mean)
                + jnp.sum(c[2] * var))
      return f

    ours, ref = loss(models.standardize), loss(_standardize_by_formula)
    for a, b in zip(models.standardize(x, axes, 1e-5),
                    _standardize_by_formula(x, axes, 1e-5), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x),
                               rtol=1e-9, atol=1e-12)
    v = jnp.asarray(rng.normal(size=x.shape))
    hvp = lambda f: jax.grad(lambda y: jnp.vdot(jax.grad(f)(y), v))(x)  # noqa: E731
    np.testing.assert_allclose(hvp(ours), hvp(ref), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        jax.jvp(jax.grad(ours), (x,), (v,))[1],
        jax.jvp(jax.grad(ref), (x,), (v,))[1], rtol=1e-8, atol=1e-10)


def test_batch_norm_gradient_equals_flax():
  """The module's gradient (through the custom JVP) is flax's."""
  x = _normal((6, 5, 5, 3)) * 3.0 + 1.0
  c = _normal((6, 5, 5, 3), 1)
  ours = lambda x: jnp.sum(c * jnp.tanh(_batch_norm(x)))  # noqa: E731
  module = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
  variables = module.init(jax.random.key(0), x)

  def flax_loss(x):
    y, _ = module.apply(variables, x, mutable=["batch_stats"])
    return jnp.sum(c * jnp.tanh(y))

  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(flax_loss)(x),
                             rtol=1e-4, atol=1e-5)


_RESNET_PROTONET_GRAD = """
import jax, numpy as np
from metalearn import metalearners, models, tasks
from metalearn.types import ClassPool
images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 16, 3),
                                           dtype=np.uint8)
pool = ClassPool(images, np.arange(5, dtype=np.int32))
sampler = tasks.episode_sampler(pool, num_ways=5, num_shots=1,
                                num_queries=15)
episode = sampler.sample(jax.random.key(0), pool)
learner = metalearners.protonet(models.resnet12(None, widths=(64,)))
params = learner.init(jax.random.key(1), episode)
_, metrics = jax.jit(learner.meta_grad)(params, episode, jax.random.key(2))
assert np.isfinite(float(metrics["outer/loss"]))
"""


def test_resnet_protonet_gradient_runs_on_cpu():
  """A ProtoNet meta-gradient through a 64-wide residual block and its
  max-pool, in its own process: jaxlib 0.10.2's XLA:CPU killed such a
  process when max_pool_2x2 reduced over reshaped windows
  (jax-ml/jax#40412)."""
  proc = subprocess.run([sys.executable, "-c", _RESNET_PROTONET_GRAD],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
