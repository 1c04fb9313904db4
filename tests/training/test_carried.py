"""Carried state: ``meta_grad`` returns its new value; the meta-step sets it
to the tasks' mean (integer leaves exactly) and optimises the rest."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training
from metalearn.types import Episode

META_BATCH = 4


def _sinusoid():
  return tasks.sinusoid_sampler(num_shots=5, num_queries=5)


def test_reptile_returns_the_new_inner_state():
  learner = metalearners.reptile(
      models.mlp(hidden=(8,)), num_inner_steps=3, inner_batch_size=2,
      inner_optimizer=optax.adam(1e-2, b1=0.0), carry_inner_state=True)
  ep = _sinusoid().sample(jax.random.key(0), None)
  meta = learner.init(jax.random.key(1), ep)
  grads, _ = learner.meta_grad(meta, ep, jax.random.key(2))
  expected = metalearners.inner_optimize(
      models.mlp(hidden=(8,)), optax.adam(1e-2, b1=0.0), meta.model,
      ep.support_x, ep.support_y, num_steps=3, opt_state=meta.inner_state,
      batch_size=2, key=jax.random.key(2))
  chex.assert_trees_all_equal(grads.inner_state, expected.opt_state)
  assert int(grads.inner_state[0].count) == 3
  chex.assert_trees_all_close(
      grads.model, jax.tree.map(jnp.subtract, meta.model, expected.params))


def _omniglot_like_episode():
  x = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
  y = jnp.arange(6, dtype=jnp.int32) % 3
  return Episode(x, y, x[::-1], y[::-1])


def test_running_statistics_come_back_as_their_new_value():
  ep = _omniglot_like_episode()
  model = models.conv4(3, features=4, norm="running")
  learner = metalearners.maml(model, 0.1, 2)
  meta = learner.init(jax.random.key(1), ep)
  # Jitted: op by op, a second-order meta-gradient takes many seconds.
  grads, _ = jax.jit(learner.meta_grad)(meta, ep, None)
  inner = metalearners.inner_optimize(
      model, optax.sgd(0.1), meta.params, ep.support_x, ep.support_y,
      num_steps=2, model_state=meta.model_state)
  _, new = models.forward(model, inner.params, inner.model_state,
                          ep.query_x, training=True)
  chex.assert_trees_all_close(grads.model_state, new, rtol=1e-5, atol=1e-6)
  # ProtoNet: one forward pass of the support and query sets together.
  embed = models.conv4(None, features=4, norm="running")
  proto = metalearners.protonet(embed)
  meta = proto.init(jax.random.key(1), ep)
  grads, _ = jax.jit(proto.meta_grad)(meta, ep, None)
  _, new = models.forward(embed, meta.params, meta.model_state,
                          jnp.concatenate([ep.support_x, ep.query_x]),
                          training=True)
  chex.assert_trees_all_close(grads.model_state, new, rtol=1e-5, atol=1e-6)


def _toy_learner(start_count):
  """Learned ``w`` (loss ``w**2``); carried ``count`` (int32, each task
  adds 3), ``flag`` (int32, the task's 0/1 vote) and ``stat`` (float, the
  task's mean target). Metrics report each task's new values."""

  def init(key, episode):
    del key, episode
    return {"w": jnp.float32(1.0), "count": jnp.int32(start_count),
            "flag": jnp.int32(0), "stat": jnp.float32(0.0)}

  def adapt(meta_params, episode, key, training=True):
    del episode, key, training
    return meta_params["w"]

  def evaluate(meta_params, task_params, episode):
    del meta_params, episode
    return task_params**2, {"outer/loss": task_params**2}

  def meta_grad(meta_params, episode, key):
    del key
    stat = jnp.mean(episode.support_y)
    flag = (stat > 0).astype(jnp.int32)
    new = {"w": 2.0 * meta_params["w"], "count": meta_params["count"] + 3,
           "flag": flag, "stat": stat}
    return new, {"stat": stat, "flag": flag.astype(jnp.float32)}

  def carried(meta_params):
    return {k: k != "w" for k in meta_params}

  return metalearners.make_learner(init, adapt, evaluate, meta_grad,
                                   carried)


@pytest.mark.parametrize("task_map", ["vmap", "scan"])
def test_meta_step_sets_carried_state_to_the_tasks_mean(task_map):
  start = 2**24 + 1  # not a float32: a float mean would lose it
  learner = _toy_learner(start)
  sampler = _sinusoid()
  tx = optax.adam(0.1)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  step = training.make_meta_step(learner, tx, sampler,
                                 meta_batch_size=META_BATCH,
                                 task_map=task_map)
  for i in range(1, 3):
    state, metrics = step(state, sampler.data, jax.random.key(i))
    params = state.meta_params
    assert params["count"].dtype == jnp.int32
    assert int(params["count"]) == start + 3 * i
    np.testing.assert_allclose(params["stat"], metrics["stat"], rtol=1e-6)
    # A 0/1 vote's mean, rounded to the nearest (halves up).
    assert int(params["flag"]) == int(np.floor(metrics["flag"] + 0.5))
  # The meta-optimizer saw w alone: Adam on w by itself, step for step.
  w, adam = jnp.float32(1.0), tx.init(jnp.float32(1.0))
  for _ in range(2):
    update, adam = tx.update(2.0 * w, adam, w)
    w = optax.apply_updates(w, update)
  np.testing.assert_allclose(state.meta_params["w"], w, rtol=1e-6)


def test_outer_optimizer_hides_carried_leaves_from_the_meta_optimizer():
  learner = _toy_learner(0)
  params = learner.init(None, None)
  tx = training.outer_optimizer(
      learner, optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)))
  opt_state = tx.init(params)
  means = {"w": jnp.float32(3.0), "count": jnp.float32(2.5),
           "flag": jnp.int32(1), "stat": jnp.float32(-7.0)}
  updates, _ = tx.update(means, opt_state, params)
  new = optax.apply_updates(params, updates)
  # Clipped by w's norm alone (3 -> 1), not by the carried values'.
  np.testing.assert_allclose(new["w"], 0.0, atol=1e-7)
  # A float mean of an integer leaf is rounded to the nearest, halves up.
  assert int(new["count"]) == 3 and new["count"].dtype == jnp.int32
  assert int(new["flag"]) == 1
  np.testing.assert_allclose(new["stat"], -7.0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(means, opt_state)


def test_integer_means_round_exactly():
  big = 2**26 + 1  # beyond float32's exact integers
  x = jnp.array([big, big, big, big + 1], jnp.int32)
  assert int(training.mean_over_tasks(x)) == big
  assert int(training.mean_over_tasks(x[2:])) == big + 1  # halves up
  np.testing.assert_allclose(
      training.mean_over_tasks(jnp.array([1.0, 2.0])), 1.5)
