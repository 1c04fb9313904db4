"""Validation is for selection, the test is for reporting: validation
episodes have their own key, ``trainer.select`` picks the tested state,
and what ``metalearn-train`` returns (to a sweeper) is a validation metric.
"""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import metalearn.train  # noqa: F401  (registers ${metalearn.direction:...})
from metalearn import experiment, training
from metalearn.experiment import _select

# Sinusoid MAML validated every step; at this meta learning rate the
# validation loss is lowest at step 2 of 6, not at the last step.
BEST_VAL = (
    "experiment=sinusoid_maml", "logger=none", "trainer.meta_batch_size=4",
    "trainer.log_every=1", "trainer.checkpoint_every=1",
    "trainer.steps_per_call=1", "trainer.progress=false",
    "trainer.eval_every=1", "trainer.val_episodes=4",
    "trainer.test_episodes=4", "trainer.eval_batch_size=4",
    "trainer.max_to_keep=10", "trainer.select=best_val",
    "optimizer.learning_rate=0.03",
)


def _episodes(sampler, key, num):
  """The first ``num`` episodes :func:`metalearn.training.evaluate` draws
  from ``key`` (episode ``i``: the first half of ``split(fold_in(key, i))``).
  """
  return [
      sampler.sample(jax.random.split(jax.random.fold_in(key, i))[0],
                     sampler.data)
      for i in range(num)
  ]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_sinusoid_validation_draws_other_tasks_than_the_test(
    compose_train, tmp_path, monkeypatch
):
  calls = []
  evaluate = training.evaluate

  def spy(learner, meta_params, sampler, key, **kwargs):
    calls.append((sampler, key))
    return evaluate(learner, meta_params, sampler, key, **kwargs)

  monkeypatch.setattr(training, "evaluate", spy)
  experiment.run_experiment(
      compose_train(*BEST_VAL, "trainer.num_steps=2", "trainer.select=last"),
      tmp_path,
  )
  # Validations at steps 1 and 2, then the test.
  assert len(calls) == 3
  *val, (test_sampler, test_key) = calls
  test_episodes = _episodes(test_sampler, test_key, 4)
  for sampler, key in val:
    assert not np.array_equal(jax.random.key_data(key),
                              jax.random.key_data(test_key))
    for episode in _episodes(sampler, key, 4):
      assert not any(_same(episode, t) for t in test_episodes)


def test_omniglot_validation_and_test_episodes_differ(compose_train):
  cfg = experiment.validate_config(
      compose_train("experiment=omniglot_5w1s_maml"))
  seeds = [_select.eval_seed(cfg["trainer"], s) for s in ("val", "test")]
  assert seeds == [1, 0]
  samplers = experiment.build_samplers(cfg["task"])
  assert not set(np.asarray(samplers.val.data.class_ids).tolist()) & set(
      np.asarray(samplers.test.data.class_ids).tolist())
  val = _episodes(samplers.val, jax.random.key(1), 2)
  test = _episodes(samplers.test, jax.random.key(0), 2)
  assert not any(_same(v, t) for v in val for t in test)


@pytest.mark.parametrize("overrides, message", [
    (("trainer.select=best_val", "trainer.eval_every=0"),
     "trainer.select=best_val .* trainer.eval_every=0"),
    (("trainer.val_seed=0",), "trainer.val_seed must be null or an int other"),
    (("trainer.select=best",), "trainer.select='best' is not one of last"),
    (("trainer.objective=accuracy",), "trainer.objective='accuracy' is not"),
    (("trainer.objective=val_accuracy", "experiment=sinusoid_maml"),
     "sinusoid regression task has no accuracy"),
])
def test_selection_config_errors_are_one_line(compose_train, overrides,
                                              message):
  with pytest.raises(experiment.ConfigError, match=message) as error:
    experiment.validate_config(compose_train(*overrides))
  assert "\n" not in str(error.value)


def _val_records(run_dir, metric):
  return {r["step"]: r[metric] for r in experiment.read_metrics(run_dir)
          if metric in r}


@pytest.mark.slow
def test_best_val_tests_the_best_validated_step(compose_train, tmp_path):
  results = experiment.run_experiment(
      compose_train(*BEST_VAL, "trainer.num_steps=6"), tmp_path)
  val = _val_records(tmp_path, "val/outer/loss")
  assert sorted(val) == [1, 2, 3, 4, 5, 6]
  best = min(val, key=val.get)
  assert best < 6  # a run where the best is not the last state
  assert results["select"] == "best_val"
  assert results["objective"] == "val/outer/loss"
  assert results["tested_step"] == best
  assert results["objective_value"] == val[best]
  assert experiment.load_checkpoint(tmp_path / "checkpoints" / "best")[0] == (
      best)
  # The test is of that step's parameters, not of the last ones.
  tested, last = experiment.evaluate_run(tmp_path, steps=[best, 6])
  assert results["test/outer/loss"] == tested["test/outer/loss"]
  assert results["test/outer/loss"] != last["test/outer/loss"]
  # A fresh run in the same directory never inherits that best state.
  for step in range(1, 7):
    shutil.rmtree(tmp_path / "checkpoints" / str(step))
  again = experiment.run_experiment(
      compose_train(*BEST_VAL, "trainer.num_steps=1",
                    "optimizer.learning_rate=0.001"), tmp_path)
  assert again["tested_step"] == 1


@pytest.mark.slow
def test_a_resumed_best_val_run_selects_as_an_uninterrupted_one(
    compose_train, tmp_path
):
  full, parts = tmp_path / "full", tmp_path / "parts"
  expected = experiment.run_experiment(
      compose_train(*BEST_VAL, "trainer.num_steps=6"), full)
  experiment.run_experiment(
      compose_train(*BEST_VAL, "trainer.num_steps=3"), parts)
  # As if the run died after keeping step 2 as its best but before its
  # checkpoints of steps 2 and 3 were written: it resumes from step 1.
  assert experiment.load_checkpoint(parts / "checkpoints" / "best")[0] == 2
  for step in ("2", "3"):
    shutil.rmtree(parts / "checkpoints" / step)
  resumed = experiment.run_experiment(
      compose_train(*BEST_VAL, "trainer.num_steps=6", "trainer.resume=true"),
      parts)
  for field in ("tested_step", "objective_value", "test/outer/loss"):
    assert resumed[field] == expected[field], field
  assert _val_records(parts, "val/outer/loss") == _val_records(
      full, "val/outer/loss")


@pytest.mark.slow
def test_metalearn_train_returns_the_validation_objective(
    compose_train, tmp_path, caplog
):
  overrides = ("experiment=sinusoid_maml", "debug=smoke")
  HydraConfig.instance().set_config(compose_train(
      *overrides, f"hydra.runtime.output_dir={tmp_path}", hydra=True))
  try:
    with caplog.at_level("INFO", logger="metalearn.experiment"):
      value = experiment.run_hydra(compose_train(*overrides))
  finally:
    HydraConfig.instance().cfg = None
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["objective"] == "val/outer/loss"
  assert value == results["objective_value"]
  assert value != results["test/outer/loss"]
  # No validation during training (eval_every=0): the final state was
  # validated once, on 4 episodes (debug=smoke).
  assert "step 2: val/num_episodes=4 val/outer/loss=" in caplog.text


def test_optuna_val_sets_the_direction_from_the_objective(compose_train):
  def direction(*overrides):
    cfg = compose_train("hydra/sweeper=optuna_val", *overrides, hydra=True)
    return cfg.hydra.sweeper.direction

  assert direction() == "maximize"  # Omniglot: validation accuracy
  assert direction("trainer.objective=val_loss") == "minimize"
  assert direction("experiment=sinusoid_maml") == "minimize"


@pytest.mark.slow
def test_an_optuna_sweep_optimises_the_validation_objective(tmp_path):
  # README.md's sweep at smoke size, on sinusoid (the cheapest task):
  # there the objective is the validation loss, minimised.
  sweep = tmp_path / "sweep"
  result = subprocess.run(
      [sys.executable, "-m", "metalearn.train", "-m",
       "experiment=sinusoid_maml", "debug=smoke",
       "hydra/sweeper=optuna_val", "hydra.sweeper.n_trials=2",
       "learner.inner_lr=interval(0.001,0.1)",
       "optimizer.learning_rate=tag(log,interval(1e-4,1e-2))",
       f"hydra.sweep.dir={sweep}"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  assert "Directions: ['minimize']" in result.stderr + result.stdout
  trials = [json.loads((sweep / job / "results.json").read_text())
            for job in ("0", "1")]
  rates = {json.loads((sweep / job / "config.json").read_text())["learner"][
      "inner_lr"] for job in ("0", "1")}
  assert len(rates) == 2  # two trials, two sampled inner rates
  assert all(t["objective"] == "val/outer/loss" for t in trials)
  best = OmegaConf.load(sweep / "optimization_results.yaml")
  assert best.best_value == min(t["objective_value"] for t in trials)
  assert best.best_value not in [t["test/outer/loss"] for t in trials]
