"""MetaOptNet's SVM head against an independent QP solution.

The dual solution must be the minimiser of Crammer & Singer's dual with
MetaOptNet's jitter (computed here by scipy's SLSQP in float64), satisfy
its constraints, and be differentiated correctly (finite differences in
float64) by the implicit function theorem. (The conformance suite,
common_test.py, covers jit, vmap, retracing and query independence.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from metalearn import metalearners, models, tasks
from metalearn.types import ClassPool

C, JITTER = 0.1, 1.0
LABELS = np.array([0, 1, 2, 0, 1, 2])


def _reference_dual(kernel, labels, ways):
  """The dual over the present classes, by SLSQP."""
  n = len(labels)
  y = np.eye(ways)[labels]

  def objective(a):
    a = a.reshape(n, ways)
    return (0.5 * np.sum((kernel @ a) * a) + 0.5 * JITTER * np.sum(a * a)
            - np.sum(a * y))

  constraints = [
      {"type": "eq", "fun": lambda a: a.reshape(n, ways).sum(1)},
      {"type": "ineq", "fun": lambda a: (C * y - a.reshape(n, ways)).ravel()},
  ]
  found = scipy.optimize.minimize(
      objective, np.zeros(n * ways), method="SLSQP", constraints=constraints,
      options={"ftol": 1e-14, "maxiter": 1000})
  assert found.success, found.message
  return found.x.reshape(n, ways)


def _features(seed=0, n=6, d=8):
  """Non-negative features with a common mean, as ReLU embeddings are."""
  rng = np.random.default_rng(seed)
  return np.maximum(rng.normal(1.0, 1.0, size=(n, d)), 0.0)


def test_dual_is_the_qp_solution_and_feasible():
  x = _features()
  kernel = x @ x.T
  present = np.arange(6) < 3  # 6 label slots, 3 classes present
  alpha = np.asarray(jax.jit(
      metalearners.crammer_singer_dual, static_argnums=(3, 4, 5))(
          jnp.asarray(kernel, jnp.float32), jnp.asarray(LABELS),
          jnp.asarray(present), C, JITTER, 400))
  expected = _reference_dual(kernel, LABELS, 3)
  np.testing.assert_allclose(alpha[:, :3], expected, atol=2e-5)
  np.testing.assert_array_equal(alpha[:, 3:], 0.0)
  np.testing.assert_allclose(alpha.sum(1), 0.0, atol=1e-6)
  y = np.eye(6)[LABELS]
  assert np.all(alpha <= C * y + 1e-7)
  # The solution has support vectors on both sides of the box: the
  # constraints are active, so the check above is not the unconstrained
  # minimiser's.
  assert np.any(np.isclose(alpha[np.arange(6), LABELS], C, atol=1e-6))
  unconstrained = np.linalg.solve(
      np.kron(kernel, np.eye(3)) + JITTER * np.eye(18),
      np.eye(3)[LABELS].ravel()).reshape(6, 3)
  assert not np.allclose(unconstrained, expected, atol=1e-3)


def test_implicit_gradient_matches_finite_differences():
  x = _features(1)
  queries = _features(2, n=4)
  present = jnp.arange(6) < 3
  with jax.enable_x64(True):

    def loss(x):
      alpha = metalearners.crammer_singer_dual(
          x @ x.T, jnp.asarray(LABELS), present, C, JITTER, 2000)
      return jnp.sum(jnp.sin(jnp.asarray(queries) @ (x.T @ alpha)))

    loss = jax.jit(loss)
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    assert grad.dtype == np.float64
    rng = np.random.default_rng(3)
    for _ in range(3):
      direction = rng.normal(size=x.shape)
      h = 1e-5
      numeric = (loss(jnp.asarray(x + h * direction))
                 - loss(jnp.asarray(x - h * direction))) / (2 * h)
      np.testing.assert_allclose(np.sum(grad * direction), numeric,
                                 rtol=1e-5, atol=1e-9)


def test_learner_scores_queries_with_the_svm_weights():
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 28, 28, 1),
                                             dtype=np.uint8)
  pool = ClassPool(images, np.arange(6, dtype=np.int32))
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=2,
                                  num_queries=2)
  episode = sampler.sample(jax.random.key(0), pool)
  embed = models.conv4(None, features=4, norm="none")
  learner = metalearners.metaoptnet(embed, scale=2.0, num_steps=400)
  params = jax.jit(learner.init)(jax.random.key(1), episode)

  @jax.jit
  def run(params):
    head = learner.adapt(params, episode, None, training=False)
    zs = embed.apply(params.embed, episode.support_x)
    zq = embed.apply(params.embed, episode.query_x)
    return head, zs, zq, learner.predict(params, head, episode.query_x)

  _, zs, zq, logits = run(params)
  zs, zq = np.asarray(zs, np.float64), np.asarray(zq, np.float64)
  alpha = _reference_dual(zs @ zs.T, np.asarray(episode.support_y), 3)
  expected = 2.0 * zq @ (zs.T @ alpha)
  np.testing.assert_allclose(logits[:, :3], expected, rtol=2e-3, atol=2e-4)
  assert np.all(np.isneginf(logits[:, 3:]))
  grads, _ = jax.jit(learner.meta_grad)(params, episode, None)
  assert abs(float(grads.scale)) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["c", "jitter", "scale", "num_steps"])
def test_bad_arguments_fail_in_one_line(name):
  with pytest.raises(ValueError, match=f"{name} must be > 0"):
    metalearners.metaoptnet(models.conv4(None), **{name: 0})
