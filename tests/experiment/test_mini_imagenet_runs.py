"""Mini-ImageNet experiment files run end to end on generated data.

Mini-ImageNet cannot be shipped, so the files of the learners added since
the first paper rows are run at smoke size on pickles written here in the
layout users have (``mini-imagenet-cache-{train,val,test}.pkl``): enough
classes for each file's training ways, and enough images per class for
its shots and queries, at 16x16 so the run is cheap. The experiment's own
task, learner and optimiser settings are used; only the image size, the
network width and the schedule (``debug=smoke``) are shrunk.
"""

import json
import pickle

import numpy as np
import pytest

from metalearn import experiment

# Classes per split and images per class: 16-way training (R2-D2),
# 15 shots + 6 queries in training (MetaOptNet) and 5 shots + 15 queries at
# test.
CLASSES = {"train": 16, "val": 5, "test": 5}
PER_CLASS = 21
SIZE = 16
# The learners added since the first paper rows, by experiment-file suffix,
# with the overrides that narrow each file's network (and solver).
LEARNERS = {
    "r2d2": ("model.features=8",),
    "baseline": ("model.features=8",),
    "baseline-pp": ("model.features=8",),
    "rfs": ("model.widths=[8,8,8,8]",),
    "metaoptnet": ("model.widths=[8,8,8,8]", "learner.num_steps=20"),
}


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("mini_runs")
  folder = root / "mini-imagenet"
  folder.mkdir()
  rng = np.random.default_rng(0)
  first = 0
  for split, count in CLASSES.items():
    images = rng.integers(0, 256, (count * PER_CLASS, SIZE, SIZE, 3),
                          np.uint8)
    class_dict = {
        f"n{first + c:08d}": list(range(c * PER_CLASS, (c + 1) * PER_CLASS))
        for c in range(count)
    }
    first += count
    with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump({"image_data": images, "class_dict": class_dict}, f)
  return root


# The 5-shot file of each (the 1-shot one differs in the shot count only,
# and test_experiment_configs builds both).
@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_experiment_runs_on_generated_mini_imagenet(
    compose_train, tmp_path, mini_dir, learner
):
  shots = 5
  name = f"mini_imagenet_5w{shots}s_{learner}"
  cfg = compose_train(
      f"experiment={name}", "debug=smoke", f"data_dir={mini_dir}",
      f"task.image_size={SIZE}", *LEARNERS[learner],
      "trainer.val_episodes=2",
  )
  results = experiment.run_experiment(cfg, tmp_path)
  assert results["name"] == name
  assert results["steps"] == 2
  assert 0.0 <= results["test/outer/accuracy"] <= 1.0
  assert np.isfinite(results["test/outer/loss"])
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["task"]["dataset"] == "mini_imagenet"
  assert saved["task"]["num_shots"] == shots


@pytest.mark.parametrize("second", ["rfs-distill", "meta-baseline"])
def test_two_stage_files_run_from_an_rfs_run_on_generated_mini_imagenet(
    compose_train, tmp_path, mini_dir, second
):
  """The files that start from a pretraining run (``trainer.init_from``):
  RFS-distill's next generation and Meta-Baseline, from an RFS run."""
  small = ("debug=smoke", f"data_dir={mini_dir}", f"task.image_size={SIZE}",
           *LEARNERS["rfs"], "trainer.val_episodes=2")
  experiment.run_experiment(
      compose_train("experiment=mini_imagenet_5w5s_rfs", *small,
                    "trainer.test_episodes=0"), tmp_path / "rfs")
  name = f"mini_imagenet_5w5s_{second}"
  results = experiment.run_experiment(
      compose_train(f"experiment={name}", *small,
                    f"trainer.init_from={tmp_path / 'rfs'}"),
      tmp_path / "second")
  assert (results["name"], results["steps"]) == (name, 2)
  assert 0.0 <= results["test/outer/accuracy"] <= 1.0
