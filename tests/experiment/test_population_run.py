"""``population.*``: a sweep as one program writes the runs it stands for."""

import json

import jax
import numpy as np
import pytest

from metalearn import experiment

SINUSOID = (
    "experiment=sinusoid_maml", "logger=none", "trainer.meta_batch_size=4",
    "trainer.log_every=2", "trainer.checkpoint_every=2",
    "trainer.num_steps=4", "trainer.eval_every=2", "trainer.val_episodes=8",
    "trainer.test_episodes=8", "trainer.progress=false",
    "trainer.steps_per_call=1",
    "model.hidden=[16,16]",
)
POPULATION = ("population.seeds=[0,1]", "population.inner_lr=[0.01,0.05]",
              "population.member_map=map")


def _params(run_dir):
  _, state = experiment.load_checkpoint(run_dir / "checkpoints")
  return state["meta_params"]


def test_each_member_equals_its_own_run(compose_train, tmp_path):
  summary = experiment.run_population(
      compose_train(*SINUSOID, *POPULATION), tmp_path / "pop")
  assert summary["size"] == 4
  members = summary["members"]
  assert [(m["seed"], m["hparams"]["inner_lr"]) for m in members] == [
      (0, 0.01), (1, 0.01), (0, 0.05), (1, 0.05)]
  assert json.loads((tmp_path / "pop" / "population.json").read_text()) == (
      json.loads(json.dumps(summary)))
  _, stacked = experiment.load_checkpoint(tmp_path / "pop" / "checkpoints")
  for i in (1, 2):  # Another seed; another step size.
    member_dir = tmp_path / "pop" / f"member_{i:03d}"
    own = json.loads((member_dir / "config.json").read_text())
    assert own["seed"] == members[i]["seed"]
    assert own["learner"]["inner_lr"] == members[i]["hparams"]["inner_lr"]
    alone = experiment.run_experiment(own, tmp_path / f"alone{i}")
    ours = json.loads((member_dir / "results.json").read_text())
    assert ours["status"] == "ok" and ours["population"]["index"] == i
    for name in ("train/outer/loss", "objective_value", "test/outer/loss"):
      assert ours[name] == pytest.approx(alone[name], rel=1e-4), name
    member_params = [x[i] for x in jax.tree.leaves(stacked["meta_params"])]
    for a, b in zip(member_params,
                    jax.tree.leaves(_params(tmp_path / f"alone{i}")),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    lines = experiment.read_metrics(member_dir)
    assert [r["step"] for r in lines] == [2, 4]
    assert "val/outer/loss" in lines[-1]
  # The members are not one run copied four times.
  losses = [m["test/outer/loss"] for m in members]
  assert len(set(losses)) == 4


def test_resumed_population_equals_an_uninterrupted_one(compose_train,
                                                        tmp_path):
  experiment.run_population(
      compose_train(*SINUSOID, *POPULATION), tmp_path / "full")
  experiment.run_population(
      compose_train(*SINUSOID, *POPULATION, "trainer.num_steps=2"),
      tmp_path / "parts")
  experiment.run_population(
      compose_train(*SINUSOID, *POPULATION, "trainer.resume=true"),
      tmp_path / "parts")
  _, a = experiment.load_checkpoint(tmp_path / "full" / "checkpoints")
  _, b = experiment.load_checkpoint(tmp_path / "parts" / "checkpoints")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  lines = experiment.read_metrics(tmp_path / "parts" / "member_003")
  assert [r["step"] for r in lines] == [2, 4]


@pytest.mark.parametrize("override, message", [
    ("population.inner_lr=[0.1,-1]", "population.inner_lr must hold numbers"),
    ("population.seeds=[0.5]", "population.seeds must hold ints"),
    ("+population.width=[1]", "population.width is not a field"),
    ("population.member_map=pmap", "population.member_map must be one of"),
    ("trainer.select=best_val", "trainer.select=best_val is not supported"),
])
def test_bad_populations_fail_in_one_line(compose_train, tmp_path, override,
                                          message):
  cfg = compose_train(*SINUSOID, "population.seeds=[0,1]", override)
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.run_population(cfg, tmp_path)


def test_a_distilling_population_fails_in_one_line(compose_train, tmp_path):
  cfg = compose_train("experiment=omniglot_5w1s_rfs", "debug=smoke",
                      "learner.kd_weight=0.5", "population.seeds=[0,1]")
  with pytest.raises(experiment.ConfigError,
                     match=r"self-distillation, learner.kd_weight > 0"):
    experiment.run_population(cfg, tmp_path)


def test_protonet_has_no_inner_lr_to_sweep(compose_train, tmp_path):
  cfg = compose_train("debug=smoke", "learner=protonet",
                      "model=conv4_protonet", "population.inner_lr=[0.1]")
  with pytest.raises(experiment.ConfigError,
                     match="learner protonet does not have"):
    experiment.run_population(cfg, tmp_path)


def test_run_experiment_refuses_a_population(compose_train, tmp_path):
  with pytest.raises(experiment.ConfigError, match="run_population"):
    experiment.run_experiment(
        compose_train(*SINUSOID, "population.seeds=[0,1]"), tmp_path)
