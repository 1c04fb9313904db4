"""Few-shot learners driven by a learned optimiser: the Meta-LSTM learner."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import learned_optimizers as lo
from metalearn import metalearners, models, tasks, training


@functools.cache
def _sinusoid_batch(num_tasks=3):
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  episodes = tasks.sample_batch(sampler, jax.random.key(0), num_tasks)
  return sampler, episodes


def _first(tree):
  return jax.tree.map(lambda x: x[0], tree)


def test_learnable_sgd_learner_is_maml():
  """With learned SGD as the inner optimiser, adaptation is MAML's, the
  meta-gradient of the initialisation is MAML's, and the one of the log
  step size is the step size times the sum of Meta-SGD's per-parameter
  step-size gradients."""
  model = models.mlp(hidden=(8,))
  lr, steps = 0.02, 3
  learner = lo.learned_optimizer_learner(model, lo.learnable_sgd(lr), steps)
  maml = metalearners.maml(model, lr, steps)
  meta_sgd = metalearners.metasgd(model, lr, steps)
  _, episodes = _sinusoid_batch()
  episode, key = _first(episodes), jax.random.key(1)
  meta_params = learner.init(jax.random.key(2), episode)
  init = meta_params.model

  @jax.jit
  def everything(meta_params):
    adapted = learner.adapt(meta_params, episode, key)
    grads, _ = learner.meta_grad(meta_params, episode, key)
    maml_adapted = maml.adapt(init, episode, key)
    maml_grads, _ = maml.meta_grad(init, episode, key)
    sgd_params = metalearners.MetaSGDParams(
        init, jax.tree.map(lambda p: jnp.full_like(p, lr), init)
    )
    sgd_grads, _ = meta_sgd.meta_grad(sgd_params, episode, key)
    return adapted, grads, maml_adapted, maml_grads, sgd_grads

  adapted, grads, maml_adapted, maml_grads, sgd_grads = everything(
      meta_params
  )
  chex.assert_trees_all_close(adapted, maml_adapted, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads.model, maml_grads, rtol=1e-4, atol=1e-6)
  lr_grad = sum(jnp.sum(g) for g in jax.tree.leaves(sgd_grads.inner_lr))
  np.testing.assert_allclose(grads.theta.log_lr, lr * lr_grad, rtol=1e-4)


@functools.cache
def _meta_lstm_grads():
  learner = lo.meta_lstm(models.mlp(hidden=(8,)), num_inner_steps=2,
                         init_lr=0.02)
  _, episodes = _sinusoid_batch()
  keys = jax.random.split(jax.random.key(3), 3)
  meta_params = learner.init(jax.random.key(4), _first(episodes))

  @jax.jit
  def grads(meta_params):
    single = learner.meta_grad(meta_params, _first(episodes), keys[0])
    batched = jax.vmap(learner.meta_grad, (None, 0, 0))(
        meta_params, episodes, keys
    )
    return single, batched

  return learner, meta_params, grads(meta_params)


def test_meta_lstm_meta_grad_reaches_the_init_and_the_gates():
  _, meta_params, ((grads, metrics), (batched, _)) = _meta_lstm_grads()
  assert isinstance(meta_params, lo.LearnedOptimizerLearnerParams)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, meta_params)
  chex.assert_tree_all_finite((grads, batched, metrics))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0.0, f"zero meta-gradient at {path}"
  chex.assert_trees_all_close(_first(batched), grads, rtol=1e-4, atol=1e-6)


def test_meta_lstm_is_first_order_by_default():
  """Ravi & Larochelle ignore the dependence of the inner gradients on the
  meta-parameters: with that approximation off, the meta-gradient of the
  initialisation changes (it gains the Hessian term)."""
  model = models.mlp(hidden=(8,))
  _, episodes = _sinusoid_batch()
  episode, key = _first(episodes), jax.random.key(5)
  first = lo.meta_lstm(model, num_inner_steps=2, init_lr=0.05)
  second = lo.meta_lstm(model, num_inner_steps=2, init_lr=0.05,
                        first_order=False)
  meta_params = first.init(jax.random.key(6), episode)
  g1, _ = jax.jit(first.meta_grad)(meta_params, episode, key)
  g2, _ = jax.jit(second.meta_grad)(meta_params, episode, key)
  diff = sum(float(jnp.sum(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(g1.model),
                             jax.tree.leaves(g2.model), strict=True))
  assert diff > 1e-6


def test_meta_step_trains_meta_lstm_unchanged():
  learner = lo.meta_lstm(models.mlp(hidden=(8,)), num_inner_steps=2,
                         init_lr=0.02)
  sampler, _ = _sinusoid_batch()
  tx = optax.adam(1e-3)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  step = training.make_meta_step(learner, tx, sampler, meta_batch_size=2)
  before = jax.device_get(state.meta_params)
  state, metrics = step(state, sampler.data, jax.random.key(1))
  state, metrics = step(state, sampler.data, jax.random.key(1))
  assert int(state.step) == 2
  chex.assert_tree_all_finite((state.meta_params, metrics))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before,
                       jax.device_get(state.meta_params))
  assert all(jax.tree.leaves(moved.theta)), "the gates were not trained"


def test_meta_test_adapt_uses_its_own_number_of_steps():
  learner = lo.meta_lstm(models.mlp(hidden=(8,)), num_inner_steps=1,
                         eval_num_inner_steps=0, init_lr=0.02)
  _, episodes = _sinusoid_batch()
  episode = _first(episodes)
  meta_params = learner.init(jax.random.key(0), episode)
  adapted = learner.adapt(meta_params, episode, None, training=False)
  chex.assert_trees_all_equal(adapted, meta_params.model)


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="num_inner_steps"):
    lo.meta_lstm(models.mlp(), num_inner_steps=-1)
  with pytest.raises(ValueError, match="init_lr"):
    lo.meta_lstm(models.mlp(), init_lr=0.0)


@pytest.mark.slow
def test_meta_lstm_learns_sinusoid_regression():
  """Meta-training lowers the post-adaptation query loss on new tasks well
  below that of the initial meta-parameters."""
  learner = lo.meta_lstm(models.mlp(), num_inner_steps=5, init_lr=0.01)
  sampler = tasks.sinusoid_sampler(num_shots=10, num_queries=10)
  tx = optax.adam(3e-3)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  evaluate = functools.partial(
      training.evaluate, learner, sampler=sampler, key=jax.random.key(7),
      num_episodes=200, batch_size=50,
  )
  before = evaluate(state.meta_params)["outer/loss"]
  state, _ = training.meta_train(
      learner, tx, sampler, key=jax.random.key(1), num_steps=1500,
      meta_batch_size=8, state=state, steps_per_call=50, log_every=500,
      progress=False,
  )
  after = evaluate(state.meta_params)["outer/loss"]
  # An untrained network predicts ~0: its loss is the signal's variance
  # (~4); MAML reaches well under 1 with this budget.
  assert after < 0.4 * before, (before, after)
