"""The meta-training loop and few-shot evaluation, on cheap synthetic tasks."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training
from metalearn.types import ClassPool

META_BATCH = 4


def _sinusoid_maml():
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  learner = metalearners.maml(models.mlp(hidden=(16, 16)), 0.01, 1)
  return learner, sampler


def _train(num_steps, **kwargs):
  learner, sampler = _sinusoid_maml()
  kwargs.setdefault("log_every", 1)
  return training.meta_train(
      learner,
      optax.adam(1e-2),
      sampler,
      key=jax.random.key(0),
      num_steps=num_steps,
      meta_batch_size=META_BATCH,
      progress=False,
      **kwargs,
  )


def test_callback_runs_every_log_every_and_at_the_end():
  calls = []

  def callback(state, metrics):
    calls.append((int(state.step), metrics))

  state, history = _train(5, log_every=2, callback=callback)
  assert [step for step, _ in calls] == [2, 4, 5]
  assert [m["step"] for _, m in calls] == [2, 4, 5]
  assert [m for _, m in calls] == history
  assert int(state.step) == 5
  for metrics in history:
    assert set(metrics) == {"outer/loss", "step", "tasks_per_sec"}
    assert math.isfinite(metrics["outer/loss"])


def _diverging_learner():
  """Loss log(1 - w): SGD pushes w past 1, where the loss is NaN.

  With ``optax.sgd(0.3)`` from ``w = 0``, ``w`` goes 0, 0.3, 0.73, 1.83:
  meta-steps 1-3 are finite and step 4 is NaN.
  """

  def init(key, episode):
    del key, episode
    return jnp.zeros(())

  def adapt(meta_params, episode, key, training=True):
    del episode, key, training
    return meta_params

  def evaluate(meta_params, task_params, episode):
    del meta_params, episode
    loss = jnp.log(1.0 - task_params)
    return loss, {"outer/loss": loss}

  return metalearners.make_learner(init, adapt, evaluate)


def test_non_finite_loss_raises_and_skips_the_callback():
  steps = []
  with pytest.raises(training.NonFiniteLossError, match="meta-step 4"):
    training.meta_train(
        _diverging_learner(),
        optax.sgd(0.3),
        tasks.sinusoid_sampler(),
        key=jax.random.key(0),
        num_steps=10,
        meta_batch_size=2,
        log_every=1,
        callback=lambda state, metrics: steps.append(int(state.step)),
        progress=False,
    )
  assert steps == [1, 2, 3]


def test_huge_learning_rate_raises():
  learner, sampler = _sinusoid_maml()
  with pytest.raises(training.NonFiniteLossError):
    training.meta_train(
        learner,
        optax.sgd(1e30),
        sampler,
        key=jax.random.key(0),
        num_steps=4,
        meta_batch_size=2,
        log_every=1,
        progress=False,
    )


def test_resumed_run_is_bitwise_identical():
  saved = {}

  def checkpoint(state, metrics):
    if metrics["step"] == 3:
      saved["state"] = jax.device_get(state)  # As a checkpoint would.

  full, full_history = _train(6)
  _, first_half = _train(3, callback=checkpoint)
  restored = jax.tree.map(jnp.asarray, saved["state"])
  resumed, second_half = _train(6, state=restored)
  assert int(resumed.step) == 6
  chex.assert_trees_all_equal(
      jax.device_get(resumed), jax.device_get(full)
  )

  def losses(history):
    return [m["outer/loss"] for m in history]

  assert losses(first_half + second_half) == losses(full_history)


def test_several_steps_per_call_match_one_step_per_call():
  one, one_history = _train(4, log_every=2)
  two, two_history = _train(4, log_every=2, steps_per_call=2)
  assert int(two.step) == 4
  chex.assert_trees_all_close(
      jax.device_get(one.meta_params),
      jax.device_get(two.meta_params),
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      [m["outer/loss"] for m in two_history],
      [m["outer/loss"] for m in one_history],
      rtol=1e-5,
  )
  with pytest.raises(ValueError, match="steps_per_call"):
    _train(4, log_every=3, steps_per_call=2)


def _flat_linear_embedding(dim=8):
  def init(key, x):
    size = int(np.prod(x.shape[1:]))
    return {"head": {"kernel": jax.random.normal(key, (size, dim)) * 0.05}}

  def apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["head"]["kernel"]

  return models.Model(init, apply)


@pytest.fixture(scope="module")
def protonet_setup():
  rng = np.random.default_rng(0)
  prototypes = rng.integers(0, 256, (10, 1, 8, 8, 1))
  noise = rng.integers(-60, 60, (10, 6, 8, 8, 1))
  images = np.clip(prototypes + noise, 0, 255).astype(np.uint8)
  pool = ClassPool(jnp.asarray(images), jnp.arange(10, dtype=jnp.int32))
  sampler = tasks.episode_sampler(
      pool, num_ways=3, num_shots=1, num_queries=2
  )
  learner = metalearners.protonet(_flat_linear_embedding())
  example = sampler.sample(jax.random.key(0), pool)
  params = learner.init(jax.random.key(1), example)
  return learner, sampler, params


def _evaluate(setup, key=0, **kwargs):
  learner, sampler, params = setup
  return training.evaluate(
      learner, params, sampler, jax.random.key(key), **kwargs
  )


def test_evaluate_is_deterministic_and_batch_size_independent(
    protonet_setup,
):
  ref = _evaluate(protonet_setup, num_episodes=50, batch_size=10)
  assert set(ref) == {
      "num_episodes",
      *(
          f"outer/{m}{s}"
          for m in ("loss", "accuracy")
          for s in ("", "_std", "_ci95")
      ),
  }
  assert ref["num_episodes"] == 50
  assert _evaluate(protonet_setup, num_episodes=50, batch_size=10) == ref
  for batch_size in (25, 15):  # 15 leaves a partial last batch.
    other = _evaluate(protonet_setup, num_episodes=50, batch_size=batch_size)
    assert other.keys() == ref.keys()
    for name, value in ref.items():
      np.testing.assert_allclose(other[name], value, rtol=1e-6, err_msg=name)
  # A different key draws different episodes.
  assert _evaluate(protonet_setup, key=1, num_episodes=50, batch_size=10) != ref


def test_evaluate_confidence_interval_by_hand(protonet_setup):
  learner, sampler, params = protonet_setup
  num_episodes, key = 50, jax.random.key(3)
  fn = training.make_eval_fn(learner, sampler, batch_size=num_episodes)
  keys = jnp.stack(
      [jax.random.fold_in(key, i) for i in range(num_episodes)]
  )
  per_episode = jax.device_get(fn(params, sampler.data, keys))
  result = training.evaluate(
      learner, params, sampler, key, num_episodes=num_episodes, batch_size=50
  )
  for name in ("outer/accuracy", "outer/loss"):
    values = np.asarray(per_episode[name], np.float64)
    assert values.shape == (num_episodes,)
    assert values.std() > 0, "all episodes scored alike: the check is vacuous"
    std = np.sqrt(np.sum((values - values.mean()) ** 2) / (num_episodes - 1))
    np.testing.assert_allclose(result[name], values.mean(), rtol=1e-6)
    np.testing.assert_allclose(result[f"{name}_std"], std, rtol=1e-6)
    np.testing.assert_allclose(
        result[f"{name}_ci95"], 1.96 * std / np.sqrt(num_episodes), rtol=1e-6
    )


def test_evaluate_rejects_no_episodes(protonet_setup):
  with pytest.raises(ValueError, match="num_episodes"):
    _evaluate(protonet_setup, num_episodes=0)


def test_repeated_evaluation_does_not_recompile(protonet_setup):
  """Validation every few hundred steps must reuse the compiled function."""
  learner, sampler, params = protonet_setup
  traces = []

  def counted_adapt(*args, **kwargs):
    traces.append(1)
    return learner.adapt(*args, **kwargs)

  counted = learner._replace(adapt=counted_adapt)
  first = training.evaluate(
      counted, params, sampler, jax.random.key(5), num_episodes=20
  )
  traced = len(traces)
  assert traced > 0
  shifted = jax.tree.map(lambda p: p * 1.5, params)
  second = training.evaluate(
      counted, shifted, sampler, jax.random.key(6), num_episodes=20
  )
  assert len(traces) == traced, "evaluate recompiled for new parameters"
  assert second != first
