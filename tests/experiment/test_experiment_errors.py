"""A bad config fails before anything compiles, in one line naming the field.

Also: a missing dataset says where to put it, and a NaN loss stops the run
and keeps the last good checkpoint.
"""

import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from metalearn import experiment, training
from metalearn.data import DataChecksumError, DatasetNotFoundError
from metalearn.experiment._hydra import USER_ERRORS

SINUSOID = ("experiment=sinusoid_maml", "debug=smoke")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("optimizer.learning_rate=-1",),
         "optimizer.learning_rate must be a number > 0, got -1"),
        (("optimizer.learning_rate=0",),
         "optimizer.learning_rate must be a number > 0, got 0"),
        (("experiment=omniglot_5w1s_protonet",
          "optimizer.learning_rate.init_value=-0.001"),
         "optimizer.learning_rate.init_value must be a number > 0"),
        (("learner.inner_lr=0",), "learner.inner_lr must be a number > 0"),
        (("learner.remat=maybe",),
         "learner.remat must be false, true or nested, got 'maybe'"),
        (("learner.inner_lr=-0.4",), "learner.inner_lr must be a number > 0"),
        (("learner.num_inner_steps=-1",),
         "learner.num_inner_steps must be an int >= 0"),
        (("model=conv4_protonet",),
         "model.num_outputs is null (an embedding without a head), but "
         "learner maml adapts a classification head"),
        (("model.num_outputs=10",),
         "model.num_outputs=10 does not match task.num_ways=5"),
        (("learner=anil", "task=omniglot_20w1s", "model.num_outputs=5"),
         "model.num_outputs=5 does not match task.num_ways=20"),
        (("task.train_num_ways=20",),
         "task.train_num_ways=20 differs from task.num_ways=5"),
        (("experiment=omniglot_5w1s_incontext", "task.train_num_ways=20"),
         "task.train_num_ways=20 exceeds learner.max_ways=5"),
        (("learner=mlti_maml", "model.num_outputs=10"),
         "model.num_outputs=10 does not match task.num_ways=5: the head of "
         "learner mlti needs one output per way"),
        (("task.dataset=cifar",),
         "task.dataset='cifar' is not registered; the registered datasets "
         "are "),
        (("task.image_size=2",),
         "task.image_size must be an int >= 4, got 2"),
        (("experiment=sinusoid_maml", "task.num_ways=5"),
         "task.num_ways must be None for 'sinusoid'"),
        (("+task.colour=true",),
         "task.colour is not an option of dataset 'omniglot'"),
        (("task.split_scheme=lake30",),
         "task.split_scheme: unknown Omniglot split scheme 'lake30'"),
        (("task.num_shots=0",), "task.num_shots must be an int >= 1, got 0"),
        (("task.train_num_shots=0",),
         "task.train_num_shots must be an int >= 1, got 0"),
        (("trainer.task_map=pmap",),
         "trainer.task_map='pmap' is not one of auto, vmap, scan"),
        (("trainer.num_steps=-1",), "trainer.num_steps must be an int >= 0"),
        (("trainer.checkpoint_every=150",),
         "trainer.checkpoint_every=150 must be a multiple of "
         "trainer.log_every=100"),
        (("trainer.steps_per_call=3",),
         "trainer.log_every=100 must be a multiple of "
         "trainer.steps_per_call=3"),
        (("trainer.resume=maybe",),
         "trainer.resume must be true or false, got 'maybe'"),
        (("logger.kind=tensorboard",),
         "logger.kind='tensorboard' is not one of wandb, none"),
        (("seed=1.5",), "seed must be an int, got 1.5"),
        (("trainer.devices=0",), "trainer.devices must be an int >= 1"),
        (("trainer.max_time_s=0",),
         "trainer.max_time_s must be a number > 0, got 0"),
        (("model.features=0",), "model.features must be an int >= 1, got 0"),
        (("experiment=sinusoid_maml", "model.hidden=[40,0]"),
         "model.hidden must be a list of ints >= 1, got [40, 0]"),
        (("trainer.devices=64",),
         "trainer.devices=64 exceeds the 1 available"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_bad_field_fails_validation_in_one_line(
    compose_train, tmp_path, overrides, message
):
  cfg = compose_train(*overrides)
  run_dir = tmp_path / "run"
  with pytest.raises(experiment.ConfigError) as info:
    experiment.run_experiment(cfg, run_dir)
  assert message in str(info.value)
  assert "\n" not in str(info.value)
  assert not run_dir.exists()  # Failed before doing anything.


@pytest.mark.parametrize(
    "target,message",
    [
        ("metalearn.metalearners.nope",
         "learner._target_='metalearn.metalearners.nope' cannot be imported"),
        ("metalearn.models.conv4",
         "learner._target_='metalearn.models.conv4' returned a Model, not a "
         "metalearn MetaLearner"),
    ],
)
def test_bad_learner_target(compose_train, target, message):
  cfg = experiment.validate_config(compose_train())
  cfg["learner"] = {"_target_": target, "num_outputs": 5}
  with pytest.raises(experiment.ConfigError, match="^learner") as info:
    experiment.build_learner(cfg)
  assert message in str(info.value)


def test_factory_error_names_the_group(compose_train):
  cfg = experiment.validate_config(compose_train("model.downsample=avg"))
  with pytest.raises(experiment.ConfigError) as info:
    experiment.build_learner(cfg)
  assert str(info.value).startswith(
      "learner: building metalearn.metalearners.maml failed: ValueError: "
      "downsample must be one of"
  )


def test_head_is_checked_before_the_data_are_looked_for(
    compose_train, tmp_path
):
  cfg = compose_train("model.num_outputs=10",
                      f"data_dir={tmp_path / 'nowhere'}")
  with pytest.raises(experiment.ConfigError, match="model.num_outputs=10"):
    experiment.run_experiment(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "overrides",
    [
        ("learner=protonet", "model=conv4_protonet", "task.train_num_ways=20"),
        ("learner=mlti_protonet", "model=conv4_protonet",
         "task.train_num_ways=20"),
        ("experiment=sinusoid_maml",),
    ],
    ids=("protonet", "mlti_protonet", "sinusoid"),
)
def test_learners_without_head_and_regression_take_any_ways(
    compose_train, overrides
):
  cfg = experiment.validate_config(compose_train(*overrides))
  learner = experiment.build_learner(cfg)
  assert not learner.head or cfg["task"]["num_ways"] is None


def _write_tiny_mini_imagenet(root, *, classes=3, per_class=8, size=16):
  """Mini-ImageNet's pickle layout, ``classes`` random classes per split."""
  rng = np.random.default_rng(0)
  folder = root / "mini-imagenet"
  folder.mkdir(parents=True)
  for s, split in enumerate(("train", "val", "test")):
    images = rng.integers(0, 256, (classes * per_class, size, size, 3),
                          np.uint8)
    class_dict = {
        f"n{100 * s + c:08d}": list(range(c * per_class, (c + 1) * per_class))
        for c in range(classes)
    }
    with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump({"image_data": images, "class_dict": class_dict}, f)
  return root


@pytest.fixture
def tiny_mini_imagenet(tmp_path):
  return _write_tiny_mini_imagenet(tmp_path / "data")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ((), "task.num_ways=5 exceeds the 3 classes in the mini_imagenet "
             "test split"),
        (("task.num_ways=3",),
         "task.num_shots + task.num_queries = 1 + 15 exceeds the 8 examples "
         "per class in the mini_imagenet test split"),
        (("learner=protonet", "model=conv4_protonet", "task.num_ways=3",
          "task.num_queries=2", "task.train_num_ways=4"),
         "task.train_num_ways=4 exceeds the 3 classes in the mini_imagenet "
         "train split"),
        (("learner=reptile", "task.num_ways=3", "task.num_queries=2",
          "task.train_num_shots=7"),
         "task.train_num_shots + task.train_num_queries = 7 + 2 exceeds the "
         "8 examples per class in the mini_imagenet train split"),
    ],
)
def test_episode_too_large_for_dataset(
    compose_train, tmp_path, tiny_mini_imagenet, overrides, message
):
  cfg = compose_train(
      "task=mini_imagenet_5w1s", "model=conv4_mini_imagenet",
      f"data_dir={tiny_mini_imagenet}", "task.image_size=16", *overrides
  )
  run_dir = tmp_path / "run"
  with pytest.raises(experiment.ConfigError) as info:
    experiment.run_experiment(cfg, run_dir)
  assert str(info.value) == message
  assert not (run_dir / "checkpoints").exists()  # Nothing trained.


def test_pretraining_head_smaller_than_the_pool_is_a_config_error(
    compose_train, tmp_path, tiny_mini_imagenet):
  cfg = compose_train(
      "experiment=mini_imagenet_5w1s_baseline", "learner.num_classes=2",
      f"data_dir={tiny_mini_imagenet}", "task.image_size=16", "debug=smoke",
      "task.num_ways=3", "task.num_queries=2")
  with pytest.raises(experiment.ConfigError,
                     match="learner.num_classes=2 is smaller than the 3 "
                     "classes of the meta-training pool"):
    experiment.run_experiment(cfg, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_directory_says_where_to_put_the_data(
    compose_train, tmp_path
):
  cfg = compose_train(f"data_dir={tmp_path / 'nowhere'}")
  with pytest.raises(DatasetNotFoundError) as info:
    experiment.run_experiment(cfg, tmp_path / "run")
  message = str(info.value)
  assert f"Omniglot was not found in {tmp_path / 'nowhere' / 'omniglot'}" in (
      message
  )
  assert "task.data_dir" in message and "METALEARN_DATA_DIR" in message


def _corrupt_omniglot(data_dir, tmp_path) -> pathlib.Path:
  """A data directory whose omniglot_background.npz has one byte flipped."""
  root = tmp_path / "data" / "omniglot"
  root.mkdir(parents=True)
  for name in ("omniglot_background.npz", "omniglot_evaluation.npz"):
    (root / name).write_bytes((data_dir / "omniglot" / name).read_bytes())
  bad = root / "omniglot_background.npz"
  raw = bytearray(bad.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  bad.write_bytes(bytes(raw))
  return bad


def test_corrupt_data_file_is_a_one_line_user_error(
    compose_train, data_dir, tmp_path
):
  bad = _corrupt_omniglot(data_dir, tmp_path)
  cfg = compose_train(f"data_dir={tmp_path / 'data'}")
  with pytest.raises(USER_ERRORS) as info:
    experiment.run_experiment(cfg, tmp_path / "run")
  assert isinstance(info.value, DataChecksumError)
  assert isinstance(info.value, ValueError)
  message = str(info.value)
  assert message.startswith(f"{bad} has sha256 ")
  assert "corrupt" in message and "\n" not in message


@pytest.mark.slow
def test_command_line_reports_a_corrupt_data_file_in_one_line(
    data_dir, tmp_path
):
  bad = _corrupt_omniglot(data_dir, tmp_path)
  script = pathlib.Path(sys.executable).with_name("metalearn-train")
  result = subprocess.run(
      [str(script), f"data_dir={tmp_path / 'data'}",
       f"hydra.run.dir={tmp_path / 'run'}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
  )
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"metalearn-train: error: {bad} has sha256 ")


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    compose_train, tmp_path
):
  # Adam's first step moves every weight by ~1e30: the next loss overflows.
  cfg = compose_train(
      *SINUSOID, "trainer.num_steps=5", "optimizer.learning_rate=1e30",
      "trainer.test_episodes=0",
  )
  with pytest.raises(training.NonFiniteLossError, match="meta-step 2"):
    experiment.run_experiment(cfg, tmp_path)
  step, tree = experiment.load_checkpoint(tmp_path / "checkpoints")
  assert step == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree))
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_resume_false_refuses_a_directory_with_checkpoints(
    compose_train, tmp_path
):
  cfg = compose_train(*SINUSOID, "trainer.test_episodes=0")
  experiment.run_experiment(cfg, tmp_path)
  config_json = (tmp_path / "config.json").read_text()
  with pytest.raises(experiment.ConfigError, match="trainer.resume=true"):
    experiment.run_experiment(compose_train(*SINUSOID, "seed=1"), tmp_path)
  assert (tmp_path / "config.json").read_text() == config_json


@pytest.mark.slow
def test_command_line_reports_a_config_error_in_one_line(tmp_path):
  # The installed console script (setup.cfg's entry point), which hydra
  # locates differently from `python -m metalearn.train`.
  script = pathlib.Path(sys.executable).with_name("metalearn-train")
  assert script.exists(), "pip install -e . creates metalearn-train"
  result = subprocess.run(
      [str(script), "optimizer.learning_rate=-1", f"hydra.run.dir={tmp_path}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
  )
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip() == (
      "metalearn-train: error: optimizer.learning_rate must be a number > 0, "
      "got -1"
  )


def test_devices_field_runs_on_a_one_device_mesh(compose_train, tmp_path):
  cfg = compose_train(*SINUSOID, "trainer.devices=all")
  results = experiment.run_experiment(cfg, tmp_path / "run")
  assert results["steps"] == 2
  assert np.isfinite(results["test/outer/loss"])
