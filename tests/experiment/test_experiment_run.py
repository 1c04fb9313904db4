"""End-to-end runs: every learner at smoke size, exact resume after SIGKILL,
a local multirun, checkpoints and the logger adapter."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from metalearn import data, experiment, metalearners, models, tasks, training

# (R2-D2 and the supervised learners run end to end in
# test_mini_imagenet_runs.py.)
LEARNERS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet",
            "imaml", "incontext")
# Experiment-file suffix -> the learner factory's name, where they differ.
FACTORIES = {"fomaml": "maml", "incontext": "in_context"}
# Sinusoid MAML, logged and checkpointed every step: the cheapest real run.
# The Omniglot experiments' Conv-4, one block of 8 filters: these tests
# check that runs compose, train, checkpoint and resume, which does not
# depend on the network's size, and XLA compiles it in half the time.
SMALL_CONV4 = ("model.features=8", "model.num_blocks=1")
SINUSOID = (
    "experiment=sinusoid_maml", "logger=none", "trainer.meta_batch_size=4",
    "trainer.log_every=1", "trainer.checkpoint_every=1",
    "trainer.steps_per_call=1", "trainer.test_episodes=0",
    "trainer.progress=false",
)


def _leaves_equal(a, b) -> bool:
  same_structure = jax.tree.structure(a) == jax.tree.structure(b)
  return same_structure and all(
      np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _finished_steps(directory: pathlib.Path) -> list[int]:
  """Steps of complete checkpoints (orbax renames a finished one to N)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("learner", LEARNERS)
def test_smoke_run_of_every_learner(compose_train, tmp_path, learner):
  cfg = compose_train(
      f"experiment=omniglot_5w1s_{learner}", "debug=smoke", *SMALL_CONV4
  )
  results = experiment.run_experiment(cfg, tmp_path)
  assert results["steps"] == 2
  assert results["name"] == f"omniglot_5w1s_{learner}"
  assert results["test/num_episodes"] == 4
  assert 0.0 <= results["test/outer/accuracy"] <= 1.0
  assert np.isfinite(results["test/outer/loss"])
  assert json.loads((tmp_path / "results.json").read_text()) == results
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["learner"]["_target_"].endswith(
      FACTORIES.get(learner, learner))
  assert _finished_steps(tmp_path / "checkpoints") == [1, 2]


# Reptile with its Adam state carried in the meta-parameters (an int count
# among them), which a resume must restore exactly too.
CARRIED = (
    "learner=reptile", "learner.carry_inner_state=true",
    "learner.inner_batch_size=3", "learner.num_inner_steps=2",
    "learner.eval_num_inner_steps=2",
    "learner.inner_optimizer={_target_: optax.adam, learning_rate: 0.01,"
    " b1: 0.0}",
)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), CARRIED], ids=["maml", "carried"])
def test_resume_in_process_matches_an_uninterrupted_run(
    compose_train, tmp_path, caplog, extra
):
  full, parts = tmp_path / "full", tmp_path / "parts"
  keep = "trainer.max_to_keep=10"
  experiment.run_experiment(
      compose_train(*SINUSOID, *extra, keep, "trainer.num_steps=6"), full
  )
  experiment.run_experiment(
      compose_train(*SINUSOID, *extra, keep, "trainer.num_steps=3"), parts
  )
  with caplog.at_level("INFO", logger="metalearn.experiment"):
    results = experiment.run_experiment(
        compose_train(*SINUSOID, *extra, keep, "trainer.num_steps=6",
                      "trainer.resume=true"),
        parts,
    )
  assert "resuming from the checkpoint at step 3" in caplog.text
  assert results["steps"] == 6
  step_a, a = experiment.load_checkpoint(full / "checkpoints")
  step_b, b = experiment.load_checkpoint(parts / "checkpoints")
  assert step_a == step_b == 6
  assert _leaves_equal(a, b)
  # Training did continue after the resume.
  _, middle = experiment.load_checkpoint(parts / "checkpoints", step=3)
  assert not _leaves_equal(middle["meta_params"], b["meta_params"])
  if extra:  # the carried Adam state advanced 2 inner steps per meta-step
    counts = [x for x in jax.tree.leaves(b["meta_params"])
              if np.issubdtype(np.asarray(x).dtype, np.integer)]
    assert [int(c) for c in counts] == [12]
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
    experiment.load_checkpoint(parts / "checkpoints", step=7)


@pytest.mark.slow
def test_validation_is_logged_every_eval_every(
    compose_train, tmp_path, caplog
):
  cfg = compose_train(
      *SINUSOID, "trainer.num_steps=4", "trainer.eval_every=2",
      "trainer.val_episodes=3", "trainer.eval_batch_size=3",
  )
  with caplog.at_level("INFO", logger="metalearn.experiment"):
    experiment.run_experiment(cfg, tmp_path)
  val_lines = [line for line in caplog.text.splitlines()
               if "val/outer/loss=" in line]
  assert [line.split("step ")[1].split(":")[0] for line in val_lines] == [
      "2", "4"]
  assert all("val/num_episodes=3" in line for line in val_lines)


def _train_command(run_dir, *overrides):
  return [
      sys.executable, "-m", "metalearn.train", *SINUSOID,
      "trainer.num_steps=40", "trainer.max_to_keep=2",
      f"hydra.run.dir={run_dir}", *overrides,
  ]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
  full = subprocess.Popen(
      _train_command(full_dir), cwd=tmp_path,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )
  killed = subprocess.Popen(
      _train_command(killed_dir), cwd=tmp_path,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 300
    while not _finished_steps(killed_dir / "checkpoints"):
      assert killed.poll() is None, "the run ended before its first checkpoint"
      assert time.monotonic() < deadline, "no checkpoint after 300 s"
      time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
  finally:
    if killed.poll() is None:
      killed.kill()
  at_kill = _finished_steps(killed_dir / "checkpoints")
  assert 1 <= at_kill[-1] < 40, at_kill

  resumed = subprocess.run(
      _train_command(killed_dir, "trainer.resume=true"), cwd=tmp_path,
      capture_output=True, text=True, timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr
  _, stderr = full.communicate(timeout=300)
  assert full.returncode == 0, stderr

  log = (killed_dir / "train.log").read_text()
  assert "resuming from the checkpoint at step" in log
  step_a, a = experiment.load_checkpoint(full_dir / "checkpoints")
  step_b, b = experiment.load_checkpoint(killed_dir / "checkpoints")
  assert step_a == step_b == 40
  assert _leaves_equal(a, b)


@pytest.mark.slow
def test_local_multirun_of_two_jobs(tmp_path):
  sweep = tmp_path / "sweep"
  result = subprocess.run(
      [sys.executable, "-m", "metalearn.train", "-m", "debug=smoke",
       "task=sinusoid", "model=mlp", "learner.inner_lr=0.01",
       "learner=maml,reptile", f"hydra.sweep.dir={sweep}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  names = set()
  for job in ("0", "1"):
    results = json.loads((sweep / job / "results.json").read_text())
    assert results["steps"] == 2
    assert results["run_dir"] == str(sweep / job)
    names.add(results["name"])
  assert names == {"sinusoid_maml", "sinusoid_reptile"}


def test_checkpoints_keep_the_newest_and_restore_exactly(tmp_path):
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  learner = metalearners.metasgd(models.mlp(hidden=(8,)), inner_lr=0.01)
  tx = optax.adam(1e-3)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  manager = experiment.checkpoint_manager(
      tmp_path, save_every=2, max_to_keep=2
  )
  saved = {}
  for step in range(1, 8):
    state = state._replace(
        step=state.step + 1,
        meta_params=jax.tree.map(lambda p: p + 1.0, state.meta_params),
    )
    if experiment.save_state(manager, state, force=step == 7):
      saved[step] = state
  manager.wait_until_finished()
  assert sorted(saved) == [2, 4, 6, 7]
  assert manager.all_steps() == [6, 7]
  like = training.init_state(learner, tx, sampler, jax.random.key(1))
  restored = experiment.restore_state(manager, like)
  manager.close()
  assert isinstance(restored, training.MetaTrainState)
  assert isinstance(restored.meta_params, metalearners.MetaSGDParams)
  assert _leaves_equal(restored, saved[7])


def test_restore_from_an_empty_directory_gives_none(tmp_path):
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  learner = metalearners.maml(models.mlp(hidden=(8,)), inner_lr=0.01)
  tx = optax.sgd(0.1)
  like = training.init_state(learner, tx, sampler, jax.random.key(0))
  with experiment.checkpoint_manager(tmp_path, save_every=1) as manager:
    assert experiment.restore_state(manager, like) is None
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    experiment.load_checkpoint(tmp_path)


def test_wandb_mode(monkeypatch, tmp_path):
  missing = tmp_path / "no_netrc"
  monkeypatch.delenv("WANDB_MODE")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  assert experiment.wandb_mode(netrc_path=missing) == "offline"
  assert experiment.wandb_mode("online", netrc_path=missing) == "online"
  netrc = tmp_path / "netrc"
  netrc.write_text("machine api.wandb.ai login user password not-a-key\n")
  netrc.chmod(0o600)
  assert experiment.wandb_mode(netrc_path=netrc) == "online"
  monkeypatch.setenv("WANDB_MODE", "disabled")
  assert experiment.wandb_mode(netrc_path=netrc) == "disabled"


def test_wandb_logger_runs_disabled(tmp_path):
  assert os.environ["WANDB_MODE"] == "disabled"
  logger = experiment.make_logger(
      {"kind": "wandb", "project": "metalearn-tests", "tags": ["test"]},
      run_dir=tmp_path, name="test", config={"seed": 0},
  )
  logger.log({"outer/loss": 1.0}, 1)
  logger.summary({"test/outer/accuracy": 0.5})
  logger.finish(0)


def test_console_logger_logs_metrics(caplog):
  logger = experiment.make_logger(
      {"kind": "none"}, run_dir=".", name="test", config={}
  )
  with caplog.at_level("INFO", logger="metalearn.experiment"):
    logger.log({"outer/loss": 0.25, "tasks_per_sec": 100.0}, 7)
  assert "step 7: outer/loss=0.25 tasks_per_sec=100" in caplog.text


def test_import_metalearn_leaves_the_experiment_stack_unloaded():
  code = (
      "import sys, metalearn; "
      "loaded = [m for m in ('metalearn.experiment', 'orbax', 'hydra', "
      "'omegaconf', 'wandb') if m in sys.modules]; "
      "assert not loaded, loaded"
  )
  result = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_time_limit_stops_checkpoints_tests_and_resumes(compose_train,
                                                        tmp_path):
  keep = ("trainer.max_to_keep=10", "trainer.test_episodes=3",
          "trainer.eval_batch_size=3")
  # Any positive limit is reached by the first metric record (step 1).
  stopped = experiment.run_experiment(
      compose_train(*SINUSOID, *keep, "trainer.num_steps=5",
                    "trainer.checkpoint_every=2", "trainer.max_time_s=1e-9"),
      tmp_path,
  )
  assert stopped["steps"] == 1 and stopped["num_steps"] == 5
  assert stopped["stopped_by_time_limit"] is True
  assert np.isfinite(stopped["test/outer/loss"])
  # Step 1 is not a multiple of checkpoint_every, but the stop saved it.
  assert _finished_steps(tmp_path / "checkpoints") == [1]
  finished = experiment.run_experiment(
      compose_train(*SINUSOID, *keep, "trainer.num_steps=5",
                    "trainer.checkpoint_every=2", "trainer.resume=true"),
      tmp_path,
  )
  assert finished["steps"] == 5 and not finished["stopped_by_time_limit"]
  records = experiment.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  walls = [r["wall_s"] for r in records]
  assert walls == sorted(walls) and walls[0] > 0
  assert all(np.isfinite(r["outer/loss"]) for r in records)


@pytest.mark.slow
def test_resume_drops_metric_lines_past_the_checkpoint(compose_train,
                                                       tmp_path):
  experiment.run_experiment(
      compose_train(*SINUSOID, "trainer.num_steps=4",
                    "trainer.checkpoint_every=2", "trainer.max_to_keep=1"),
      tmp_path,
  )
  # Keep only the checkpoint of step 2, as if the run died after step 3.
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  experiment.run_experiment(
      compose_train(*SINUSOID, "trainer.num_steps=4", "trainer.resume=true",
                    "trainer.checkpoint_every=2", "trainer.max_to_keep=1"),
      tmp_path,
  )
  assert [r["step"] for r in experiment.read_metrics(tmp_path)] == [
      1, 2, 3, 4]


@pytest.mark.slow
def test_evaluate_run_reproduces_the_test_and_changes_the_episodes(
    compose_train, tmp_path
):
  cfg = compose_train(
      "experiment=omniglot_5w1s_protonet", "debug=smoke",
      *SMALL_CONV4, "trainer.num_steps=2", "trainer.max_to_keep=5",
  )
  results = experiment.run_experiment(cfg, tmp_path)
  rows = experiment.evaluate_run(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[-1]["test/outer/accuracy"] == results["test/outer/accuracy"]
  assert rows[-1]["wall_s"] == experiment.read_metrics(tmp_path)[-1]["wall_s"]
  # Different checkpoints (the loss: accuracy on 4 episodes can tie).
  assert rows[0]["test/outer/loss"] != rows[1]["test/outer/loss"]
  # The same model on 20-way episodes: a harder test.
  twenty = experiment.evaluate_run(tmp_path, steps=[2],
                                   task={"num_ways": 20}, num_episodes=4)
  assert twenty[0]["test/num_episodes"] == 4
  assert (twenty[0]["test/outer/accuracy"]
          < rows[-1]["test/outer/accuracy"])
  with pytest.raises(FileNotFoundError, match="no checkpoint of steps"):
    experiment.evaluate_run(tmp_path, steps=[7])
  with pytest.raises(experiment.ConfigError, match="task.num_ways"):
    experiment.evaluate_run(tmp_path, task={"num_ways": 0})


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("experiment=omniglot_5w1s_metalstm",),
    ("learner=lopt",),
    ("learner=lopt", "learner.learned_optimizer._target_="
     "metalearn.learned_optimizers.lstm_optimizer",
     "~learner.learned_optimizer.hidden_sizes",
     "~learner.learned_optimizer.step_mult"),
], ids=["metalstm", "lopt-mlp", "lopt-lstm"])
def test_learned_optimizer_learners_run_from_configs(compose_train, tmp_path,
                                                     overrides):
  cfg = compose_train(*overrides, "debug=smoke", *SMALL_CONV4)
  results = experiment.run_experiment(cfg, tmp_path)
  assert results["steps"] == 2
  assert np.isfinite(results["test/outer/loss"])
  assert 0.0 <= results["test/outer/accuracy"] <= 1.0
  # The optimiser's meta-parameters are trained and checkpointed.
  _, first = experiment.load_checkpoint(tmp_path / "checkpoints", step=1)
  _, last = experiment.load_checkpoint(tmp_path / "checkpoints", step=2)
  theta_first, theta_last = (jax.tree.leaves(t["meta_params"]["theta"])
                             for t in (first, last))
  assert theta_first and not all(
      np.array_equal(a, b)
      for a, b in zip(theta_first, theta_last, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["mlti-maml", "mlti-protonet"])
def test_mlti_few_task_experiments_run(compose_train, tmp_path, learner):
  cfg = compose_train(f"experiment=omniglot50_5w1s_{learner}", "debug=smoke",
                      *SMALL_CONV4)
  results = experiment.run_experiment(cfg, tmp_path)
  assert results["steps"] == 2
  assert 0.0 <= results["test/outer/accuracy"] <= 1.0
  assert np.isfinite(results["test/outer/loss"])


def test_few_task_setting_restricts_only_the_training_classes(compose_train):
  cfg = experiment.validate_config(
      compose_train("experiment=omniglot50_5w1s_mlti-maml"))
  # MLTI declares that it trains on task pairs; the samplers follow it.
  learner = experiment.build_learner(cfg)
  assert learner.train_sampler is metalearners.paired_sampler
  samplers = experiment.build_samplers(
      cfg["task"], train_sampler=learner.train_sampler)
  pool = samplers.train.data
  # 50 characters x 4 rotations, whole characters (ids 4c .. 4c+3).
  ids = np.asarray(pool.class_ids)
  assert ids.shape == (200,)
  assert np.array_equal(ids.reshape(50, 4) // 4,
                        np.repeat((ids[::4] // 4)[:, None], 4, axis=1))
  assert samplers.test.data.class_ids.shape == (1692,)
  pair = samplers.train.sample(jax.random.key(0), pool)
  assert pair.episode.support_x.shape == pair.partner.support_x.shape
  cfg["task"]["train_classes"] = 5000
  with pytest.raises(experiment.ConfigError, match="task.train_classes"):
    experiment.build_samplers(cfg["task"])


def test_train_num_shots_shapes_only_the_meta_training_episodes(compose_train):
  cfg = experiment.validate_config(
      compose_train("experiment=omniglot_5w1s_reptile"))
  assert cfg["task"]["train_num_shots"] == 15  # Nichol et al.'s train shots.
  samplers = experiment.build_samplers(cfg["task"])
  train = samplers.train.sample(jax.random.key(0), samplers.train.data)
  test = samplers.test.sample(jax.random.key(0), samplers.test.data)
  assert train.support_x.shape[0] == 5 * 15 and train.query_x.shape[0] == 5
  np.testing.assert_array_equal(np.bincount(train.support_y), [15] * 5)
  assert test.support_x.shape[0] == 5 and test.query_x.shape[0] == 5 * 15
  # Without the field (configs of earlier releases), training uses num_shots.
  del cfg["task"]["train_num_shots"]
  samplers = experiment.build_samplers(cfg["task"])
  train = samplers.train.sample(jax.random.key(0), samplers.train.data)
  assert train.support_x.shape[0] == 5


def test_train_splits_meta_train_on_train_and_val_classes(compose_train,
                                                          tmp_path, caplog):
  cfg = experiment.validate_config(
      compose_train("experiment=omniglot_5w1s_protonet"))
  assert list(cfg["task"]["train_splits"]) == ["train", "val"]
  task = cfg["task"]
  splits = data.load_omniglot(
      task["data_dir"], image_size=task["image_size"],
      split_scheme=task["split_scheme"], rotations=task["rotations"])
  samplers = experiment.build_samplers(task)
  # Snell et al.: 1200 characters x 4 rotations; val and test keep theirs.
  ids = np.asarray(samplers.train.data.class_ids)
  assert ids.shape == (4800,)
  np.testing.assert_array_equal(
      ids, np.concatenate([splits.train.class_ids, splits.val.class_ids]))
  assert samplers.val.data.class_ids.shape == (688,)
  assert not set(ids.tolist()) & set(
      np.asarray(samplers.test.data.class_ids).tolist())
  with caplog.at_level(logging.WARNING, logger="metalearn.experiment"):
    experiment.run_experiment(
        compose_train("experiment=omniglot_5w1s_protonet", "debug=smoke",
                      *SMALL_CONV4, "trainer.eval_every=1",
                      "trainer.val_episodes=2"), tmp_path)
  assert "not held out" in caplog.text
  for bad in (["train", "test"], [], ["train", "train"], "train"):
    cfg["task"]["train_splits"] = bad
    with pytest.raises(experiment.ConfigError, match="task.train_splits"):
      experiment.validate_config(cfg)
