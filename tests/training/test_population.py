"""A population of runs as one program equals the separate runs."""

import chex
import jax
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training

SAMPLER = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
MODEL = models.mlp(hidden=(16, 16))


def _make_member(hparams):
  learner = metalearners.maml(MODEL, hparams["inner_lr"], 2)
  return learner, optax.adam(hparams["lr"])


def _separate_run(seed, inner_lr, lr, num_steps):
  learner, tx = _make_member({"inner_lr": inner_lr, "lr": lr})
  state, history = training.meta_train(
      learner, tx, SAMPLER, key=jax.random.key(seed), num_steps=num_steps,
      meta_batch_size=4, log_every=num_steps, progress=False,
  )
  return state, history[-1]


POPULATION = training.make_population(
    seeds=[0, 1, 0], hparams={"inner_lr": [0.01, 0.01, 0.05],
                              "lr": [1e-3, 1e-3, 3e-3]}
)


@pytest.fixture(scope="module")
def separate():
  return [_separate_run(s, POPULATION.member(i)["inner_lr"],
                        POPULATION.member(i)["lr"], 4)
          for i, s in enumerate([0, 1, 0])]


@pytest.mark.parametrize("member_map", ["map", "vmap"])
def test_members_equal_their_separate_runs(separate, member_map):
  states, history = training.meta_train_population(
      _make_member, SAMPLER, POPULATION, num_steps=4, meta_batch_size=4,
      steps_per_call=2, log_every=2, member_map=member_map, progress=False,
  )
  assert len(history) == 2
  # A traced step size is not constant-folded as a separate run's is, so
  # even one member at a time agrees up to float rounding only.
  tol = dict(rtol=1e-5, atol=1e-7) if member_map == "map" else dict(
      rtol=1e-4, atol=1e-6)
  for i, (state, metrics) in enumerate(separate):
    member = training.member_state(states, i)
    assert int(member.step) == 4
    chex.assert_trees_all_close(member.meta_params, state.meta_params, **tol)
    chex.assert_trees_all_close(member.opt_state, state.opt_state, **tol)
    np.testing.assert_allclose(history[-1]["outer/loss"][i],
                               metrics["outer/loss"], **tol)
  # The members differ (seeds, step sizes), so equality is not trivial.
  p = [training.member_state(states, i).meta_params for i in range(3)]
  for a, b in [(p[0], p[1]), (p[0], p[2])]:
    diff = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)
    assert max(jax.tree.leaves(diff)) > 1e-3


def test_resumed_population_equals_an_uninterrupted_one():
  kwargs = dict(meta_batch_size=4, log_every=1, progress=False,
                member_map="map")
  full, _ = training.meta_train_population(
      _make_member, SAMPLER, POPULATION, num_steps=3, **kwargs)
  half, _ = training.meta_train_population(
      _make_member, SAMPLER, POPULATION, num_steps=1, **kwargs)
  resumed, _ = training.meta_train_population(
      _make_member, SAMPLER, POPULATION, num_steps=3, states=half, **kwargs)
  chex.assert_trees_all_equal(resumed, full)


def test_a_diverging_member_does_not_stop_the_others():
  population = training.make_population(
      [0, 0], {"inner_lr": [0.01, 0.01], "lr": [1e-3, 1e30]})
  states, history = training.meta_train_population(
      _make_member, SAMPLER, population, num_steps=6, meta_batch_size=4,
      log_every=3, member_map="map", progress=False)
  assert training.nonfinite_members(history) == [1]
  good = training.member_state(states, 0)
  state, _ = _separate_run(0, 0.01, 1e-3, 6)
  chex.assert_trees_all_close(good.meta_params, state.meta_params,
                              rtol=1e-5, atol=1e-7)


def test_grid_orders_seeds_fastest():
  population = training.grid([0, 1], inner_lr=[0.1, 0.4], lr=[1.0])
  assert population.size == 4
  assert [population.member(i)["inner_lr"] for i in range(4)] == pytest.approx(
      [0.1, 0.1, 0.4, 0.4])
  seeds = [int(jax.random.key_data(k)[-1]) for k in population.keys]
  assert seeds == [0, 1, 0, 1]


def test_bad_members_fail_before_tracing():
  population = training.make_population(
      [0, 1], {"inner_lr": [0.1, -0.1], "lr": [1e-3, 1e-3]})
  with pytest.raises(ValueError, match=r"member 1 .*inner_lr must be > 0"):
    training.meta_train_population(
        _make_member, SAMPLER, population, num_steps=1, meta_batch_size=2,
        progress=False)
  with pytest.raises(ValueError, match="one value per member"):
    training.make_population([0, 1], {"lr": [1e-3]})
  with pytest.raises(ValueError, match="at least one member"):
    training.make_population([])
  with pytest.raises(ValueError, match="member_map"):
    training.make_population_step(_make_member, SAMPLER, meta_batch_size=2,
                                  member_map="pmap")


def test_population_evaluation_equals_each_members_own():
  states = training.init_population(_make_member, SAMPLER, POPULATION)
  key = jax.random.key(7)
  results = training.evaluate_population(
      _make_member, states.meta_params, POPULATION, SAMPLER, key,
      num_episodes=6, batch_size=4, member_map="map")
  assert len(results) == POPULATION.size
  for i, result in enumerate(results):
    learner, _ = _make_member(POPULATION.member(i))
    own = training.evaluate(
        learner, training.member_state(states, i).meta_params, SAMPLER, key,
        num_episodes=6, batch_size=4)
    assert result.keys() == own.keys()
    for name, value in own.items():
      assert result[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
  # Members 0 and 2 start alike (seed 0) but adapt with other step sizes.
  assert results[0]["outer/loss"] != pytest.approx(results[2]["outer/loss"])
