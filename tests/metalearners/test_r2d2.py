"""R2-D2 against an independent closed-form ridge solution.

The task parameters must be the primal ridge solution
:math:`(X^\\top X + n\\lambda I)^{-1} X^\\top Y` (computed here in float64
numpy) of the support embeddings with a bias feature, whichever form the
library solves, and the meta-gradient with respect to :math:`\\log\\lambda`
must match finite differences of the query loss. (The conformance suite,
common_test.py, covers jit, vmap, retracing and query independence.)
"""

import functools

import jax
import numpy as np
import pytest

from metalearn import metalearners, models, tasks
from metalearn.types import ClassPool

LAM = 0.7


def _numpy_ridge(x, y, lam):
  """The primal solution of the mean-squared-error ridge problem."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, d = x.shape
  return np.linalg.solve(x.T @ x + n * lam * np.eye(d), x.T @ y)


@functools.cache
def _setup(num_shots, norm="none"):
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 28, 28, 1),
                                             dtype=np.uint8)
  pool = ClassPool(images, np.arange(6, dtype=np.int32))
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=num_shots,
                                  num_queries=2)
  episode = sampler.sample(jax.random.key(0), pool)
  embed = models.conv4(None, features=4, norm=norm)
  learner = metalearners.r2d2(embed, lam=LAM, scale=3.0)
  params = jax.jit(learner.init)(jax.random.key(1), episode)
  return embed, learner, params, episode


@pytest.mark.parametrize("n,d", [(4, 9), (9, 4)], ids=["woodbury", "primal"])
def test_ridge_regression_matches_numpy(n, d):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.normal(size=(n, 3)).astype(np.float32)
  w = jax.jit(metalearners.ridge_regression)(x, y, LAM)
  np.testing.assert_allclose(w, _numpy_ridge(x, y, LAM), rtol=1e-4,
                             atol=1e-5)
  assert not np.allclose(w, _numpy_ridge(x, y, 2 * LAM), atol=1e-3)


# 3-way 1-shot: 3 support rows, 4 + 1 features (the Woodbury form);
# 3-way 2-shot: 6 rows (the primal form), 3 absent label slots.
@pytest.mark.parametrize("num_shots", [1, 2], ids=["woodbury", "primal"])
def test_adapted_weights_are_the_primal_ridge_solution(num_shots):
  embed, learner, params, episode = _setup(num_shots)
  head = jax.jit(learner.adapt, static_argnames="training")(
      params, episode, None, training=False)
  z = np.asarray(jax.jit(embed.apply)(params.embed, episode.support_x),
                 np.float64)
  x = np.concatenate([z, np.ones((len(z), 1))], 1)
  slots = len(z)
  y = np.eye(slots)[np.asarray(episode.support_y)]
  expected = _numpy_ridge(x, y, LAM)
  assert head.weights.shape == (z.shape[1] + 1, slots)
  np.testing.assert_allclose(head.weights, expected, rtol=1e-3, atol=1e-5)
  # A wrong regulariser gives other weights, so the check above can fail.
  wrong = _numpy_ridge(x, y, 3 * LAM)
  assert not np.allclose(head.weights, wrong, rtol=1e-3, atol=1e-5)
  np.testing.assert_array_equal(head.present, np.arange(slots) < 3)
  logits = jax.jit(learner.predict)(params, head, episode.query_x)
  assert np.all(np.isneginf(logits[:, 3:]))
  assert np.all(np.isfinite(logits[:, :3]))


def test_meta_gradient_of_log_lambda_matches_finite_differences():
  _, learner, params, episode = _setup(1)

  @jax.jit
  def outer_loss(log_lam):
    p = params._replace(log_lam=log_lam)
    return learner.evaluate(p, learner.adapt(p, episode, None), episode)[0]

  grads, _ = jax.jit(learner.meta_grad)(params, episode, None)
  eps = 1e-2
  numeric = (outer_loss(params.log_lam + eps)
             - outer_loss(params.log_lam - eps)) / (2 * eps)
  assert abs(float(numeric)) > 1e-4, "lambda does not move the loss"
  np.testing.assert_allclose(grads.log_lam, numeric, rtol=2e-2)
  # The logit offset beta cancels in the softmax (documented).
  np.testing.assert_allclose(grads.bias, 0.0, atol=1e-6)


def test_fixed_hyperparameters_are_not_meta_parameters():
  _, _, _, episode = _setup(1)
  learner = metalearners.r2d2(models.conv4(None, features=4, norm="none"),
                              lam=LAM, learn_lam=False, learn_scale=False)
  params = jax.jit(learner.init)(jax.random.key(1), episode)
  assert params.log_lam is None and params.log_scale is None
  assert params.bias is None
  grads, metrics = jax.jit(learner.meta_grad)(params, episode, None)
  assert grads.log_lam is None
  assert np.isfinite(metrics["outer/loss"])


@pytest.mark.parametrize("field", ["lam", "scale"])
def test_non_positive_hyperparameters_are_rejected(field):
  with pytest.raises(ValueError, match=f"{field} must be > 0"):
    metalearners.r2d2(models.conv4(None, features=4), **{field: 0.0})
