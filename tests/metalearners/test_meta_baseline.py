"""Meta-Baseline (ProtoNet's cosine metric with a learned temperature).

The logits must be the temperature times the cosine similarity of a query's
embedding to each class mean (computed here in float64 numpy), and the
meta-gradient of the temperature must match finite differences of the
query loss. (The conformance suite, common_test.py, covers jit, vmap,
retracing and query independence; test_init_from.py the two-stage run.)
"""

import functools

import jax
import numpy as np
import pytest

from metalearn import metalearners, models, tasks
from metalearn.types import ClassPool

TAU = 3.0


@functools.cache
def _setup():
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 28, 28, 1),
                                             dtype=np.uint8)
  pool = ClassPool(images, np.arange(6, dtype=np.int32))
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=2,
                                  num_queries=2)
  episode = sampler.sample(jax.random.key(0), pool)
  embed = models.conv4(None, features=4, norm="none")
  learner = metalearners.meta_baseline(embed, scale=TAU)
  params = jax.jit(learner.init)(jax.random.key(1), episode)
  return embed, learner, params, episode


def _numpy_cosine_logits(embed, params, episode, tau):
  apply = jax.jit(embed.apply)
  zs = np.asarray(apply(params.embed, episode.support_x), np.float64)
  zq = np.asarray(apply(params.embed, episode.query_x), np.float64)
  labels = np.asarray(episode.support_y)
  means = np.stack([zs[labels == k].mean(0) for k in range(3)])
  cos = (zq / np.linalg.norm(zq, axis=1, keepdims=True)) @ (
      means / np.linalg.norm(means, axis=1, keepdims=True)).T
  return tau * cos


def test_logits_are_the_temperature_times_cosine_to_class_means():
  embed, learner, params, episode = _setup()
  assert float(params.scale) == TAU
  protos = jax.jit(learner.adapt, static_argnames="training")(
      params, episode, None, training=False)
  logits = np.asarray(jax.jit(learner.predict)(params, protos,
                                               episode.query_x))
  # 6 support slots, 3 classes present: the other slots are -inf.
  assert logits.shape == (6, 6)
  assert np.all(np.isneginf(logits[:, 3:]))
  expected = _numpy_cosine_logits(embed, params, episode, TAU)
  np.testing.assert_allclose(logits[:, :3], expected, rtol=1e-4, atol=1e-5)
  # Euclidean prototypes (plain ProtoNet on the same network) score
  # otherwise, so the check above can fail.
  euclid = metalearners.protonet(embed)
  other = jax.jit(euclid.predict)(params.embed,
                                  euclid.adapt(params.embed, episode, None),
                                  episode.query_x)
  assert not np.allclose(other[:, :3], expected, atol=1e-2)


def test_temperature_gradient_matches_finite_differences():
  _, learner, params, episode = _setup()
  grads, metrics = jax.jit(learner.meta_grad)(params, episode, None)

  @jax.jit
  def loss(tau):
    p = params._replace(scale=tau)
    return learner.evaluate(p, learner.adapt(p, episode, None), episode)[0]

  h = 1e-2
  numeric = (loss(TAU + h) - loss(TAU - h)) / (2 * h)
  np.testing.assert_allclose(grads.scale, numeric, rtol=2e-2, atol=1e-5)
  assert abs(float(grads.scale)) > 1e-4
  np.testing.assert_allclose(metrics["outer/loss"], loss(TAU), rtol=1e-5)
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads.embed))


def test_a_fixed_temperature_keeps_protonet_parameters():
  embed, _, params, episode = _setup()
  fixed = metalearners.protonet(embed, metric="cosine", scale=TAU)
  plain = jax.jit(fixed.init)(jax.random.key(1), episode)
  jax.tree.map(np.testing.assert_array_equal, plain, params.embed)
  logits = jax.jit(lambda p: fixed.predict(p, fixed.adapt(p, episode, None),
                                           episode.query_x))(plain)
  expected = _numpy_cosine_logits(embed, params, episode, TAU)
  np.testing.assert_allclose(logits[:, :3], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"metric": "manhattan"}, "metric must be one of"),
    ({"scale": 0.0}, "scale must be > 0"),
])
def test_bad_arguments_fail_in_one_line(kwargs, match):
  with pytest.raises(ValueError, match=match):
    metalearners.protonet(models.conv4(None), **kwargs)


def test_a_zero_embedding_has_a_finite_gradient():
  """A ReLU network can embed an image to exactly zero (a narrow ResNet
  did, on generated data); its cosine similarity is 0 and the gradient
  must stay finite rather than 0 * inf."""
  from metalearn.metalearners._protonet import cosine_similarities

  a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5]], np.float32)
  b = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
  sims = cosine_similarities(a, b)
  np.testing.assert_allclose(sims[0], 0.0)
  np.testing.assert_allclose(sims[:, 1], 0.0)
  grads = jax.grad(lambda a, b: (3.0 * cosine_similarities(a, b)).sum(),
                   argnums=(0, 1))(a, b)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # Nonzero rows keep the cosine's gradient (checked by finite differences).
  eps = 1e-3
  bumped = a.copy()
  bumped[1, 0] += eps
  fd = (cosine_similarities(bumped, b).sum()
        - cosine_similarities(a, b).sum()) / eps
  np.testing.assert_allclose(grads[0][1, 0] / 3.0, fd, rtol=2e-2)
