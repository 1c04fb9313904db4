"""Batch-norm modes and models with state: conv4/resnet12 ``norm=``,
``from_flax`` with ``batch_stats``, ``from_nnx``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metalearn import metalearners, models, tasks, training
from metalearn.types import ClassPool


def _images(n=6, size=28, channels=1, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, channels))


@pytest.mark.parametrize("norm", models.NORMS)
def test_conv4_norm_modes(norm):
  model = models.conv4(5, features=8, norm=norm)
  x = _images()
  params = model.init(jax.random.key(0), x)
  assert models.has_state(model) == (norm in ("running", "support"))
  assert models.uses_support_statistics(model) == (norm == "support")
  assert model.transductive == (norm == "transductive")
  assert ("BatchNorm_0" in params["block0"]) == (norm != "none")
  state = (model.init_state(jax.random.key(0), x)
           if models.has_state(model) else None)
  out, new = models.forward(model, params, state, x, training=True)
  assert out.shape == (6, 5)
  # Training outputs are the batch-statistics outputs, layer by layer too.
  np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-6)
  h = x
  for stage in model.layers:
    h = stage(params, h)
  np.testing.assert_allclose(h, out, rtol=1e-6)
  if norm == "running":
    stats = new["block0"]["BatchNorm_0"]
    # One training batch moves the estimates from (0, 1) by 1 - momentum:
    # the first block's are 0.1 times its batch statistics (plus 0.9).
    conv = jax.lax.conv_general_dilated(
        x, params["block0"]["Conv_0"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + params["block0"]["Conv_0"]["bias"]
    np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv.var((0, 1, 2)),
                               rtol=1e-4)
  if norm == "support":
    # The state is the batch's own statistics: the support set normalised
    # with them gives its training outputs again.
    stats = models.support_statistics(model, params, x)
    conv = jax.lax.conv_general_dilated(
        x, params["block0"]["Conv_0"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + params["block0"]["Conv_0"]["bias"]
    np.testing.assert_allclose(stats["block0"]["BatchNorm_0"]["var"],
                               conv.var((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(models.bind(model, stats).apply(params, x),
                               out, rtol=1e-5, atol=1e-6)


def test_running_norm_uses_stored_statistics_at_test():
  model = models.conv4(5, features=8, norm="running")
  x = _images()
  params = model.init(jax.random.key(0), x)
  state = model.init_state(jax.random.key(0), x)
  for _ in range(3):
    state = models.forward(model, params, state, x, training=True)[1]
  test = jax.jit(lambda x: models.bind(model, state).apply(params, x))
  # Each input alone gives its outputs in the batch, bit for bit when the
  # batch shape is kept, and the state is not touched.
  other = x.at[1:].set(_images(seed=1)[1:])
  np.testing.assert_array_equal(test(x)[0], test(other)[0])
  _, same = models.forward(model, params, state, x, training=False)
  jax.tree.map(np.testing.assert_array_equal, same, state)
  # Transductive outputs differ from the running-statistics ones.
  assert not np.allclose(test(x), model.apply(params, x))


def test_resnet12_running_norm():
  model = models.resnet12(5, widths=(4, 4, 4, 4), norm="running")
  x = _images(2, 16, 3)
  params = model.init(jax.random.key(0), x)
  state = model.init_state(jax.random.key(0), x)
  out, new = models.forward(model, params, state, x, training=True)
  assert out.shape == (2, 5)
  assert jax.tree.structure(new) == jax.tree.structure(state)


@pytest.mark.parametrize("factory", [models.conv4, models.resnet12])
def test_bad_norm(factory):
  with pytest.raises(ValueError, match="norm must be one of"):
    factory(5, norm="batch")


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3, name="head")(nn.relu(x))


def test_from_flax_with_batch_stats():
  model = models.from_flax(_LinenNet(), train_arg="train")
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = model.init(jax.random.key(1), x)
  state = model.init_state(jax.random.key(1), x)
  out, new = models.forward(model, params, state, x, training=True)
  expected, updates = _LinenNet().apply(
      {"params": params, "batch_stats": state}, x, train=True,
      mutable=["batch_stats"])
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  jax.tree.map(np.testing.assert_allclose, new, updates["batch_stats"])
  test_out = models.bind(model, new).apply(params, x)
  np.testing.assert_allclose(
      test_out, _LinenNet().apply({"params": params, "batch_stats": new}, x,
                                  train=False), rtol=1e-6)
  # Without train_arg, a module with batch_stats is refused in one line.
  with pytest.raises(ValueError, match="train_arg"):
    models.from_flax(_LinenNet()).init(jax.random.key(1), x)


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.dense(x))))


def test_from_nnx_matches_the_module():
  model = models.from_nnx(_NNXNet)
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = model.init(jax.random.key(1), x)
  state = model.init_state(jax.random.key(1), x)
  out, new = jax.jit(model.apply_with_state, static_argnums=3)(
      params, state, x, True)
  net = _NNXNet(nnx.Rngs(1))
  net.train()
  # Jitted against eager: equal up to float rounding (the fused kernels
  # XLA:CPU picks differ between CPUs by an ulp or so).
  tol = {"rtol": 1e-5, "atol": 1e-6}
  np.testing.assert_allclose(out, net(x), **tol)
  np.testing.assert_allclose(new["norm"]["mean"][...],
                             net.norm.mean[...], **tol)
  net.eval()
  np.testing.assert_allclose(models.bind(model, new).apply(params, x),
                             net(x), **tol)
  # init follows its key.
  assert not all(
      np.allclose(a, b) for a, b in zip(
          jax.tree.leaves(model.init(jax.random.key(2), x)),
          jax.tree.leaves(params), strict=True))


def test_from_nnx_trains_with_maml():
  pool = ClassPool(
      jnp.asarray(np.random.default_rng(0).integers(
          0, 256, (6, 4, 2, 2, 1), dtype=np.uint8)),
      jnp.arange(6, dtype=jnp.int32))
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
                                  num_queries=1)
  net = models.from_nnx(_NNXNet)
  model = net._replace(
      apply=lambda p, x: net.apply(p, x.reshape(x.shape[0], -1)),
      apply_with_state=lambda p, s, x, t: net.apply_with_state(
          p, s, x.reshape(x.shape[0], -1), t))
  learner = metalearners.maml(model, 0.1)
  tx = optax.adam(1e-2)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  step = training.make_meta_step(learner, tx, sampler, meta_batch_size=2)
  new, metrics = step(state, sampler.data, jax.random.key(1))
  assert isinstance(new.meta_params, metalearners.WithModelState)
  assert np.isfinite(float(metrics["outer/loss"]))
  assert not np.allclose(new.meta_params.model_state["norm"]["mean"][...],
                         0.0)
