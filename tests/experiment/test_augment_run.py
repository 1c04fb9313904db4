"""The ``augment`` group in runs: checked fields, meta-training episodes
only, and an exact resume with augmentation on."""

import pathlib

import jax
import numpy as np
import pytest

from metalearn import experiment
from metalearn.experiment import _build as experiment_build
from metalearn.experiment import _run

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"

SMOKE = ("experiment=omniglot_5w1s_protonet", "debug=smoke",
         "model.features=8", "task.train_num_ways=5",
         "task.train_num_queries=2", "augment=omniglot_affine")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (("augment.affine.max_rotation=-1",),
         "augment.affine.max_rotation must be a number >= 0"),
        (("augment.apply_to=query",), "augment.apply_to='query' is not one"),
        (("+augment.blur=1",), "augment.blur is not a field of augment"),
        (("augment.crop={pad: 2}",), "augment.crop.pad is not an argument"),
        (("experiment=sinusoid_maml",),
         "augment.affine transforms images, but task.dataset=sinusoid"),
    ],
)
def test_bad_augment_fields_fail_before_loading(compose_train, overrides,
                                                match):
  cfg = compose_train("augment=omniglot_affine", *overrides)
  with pytest.raises(experiment.ConfigError, match=f"^{match}"):
    experiment.validate_config(cfg)


@pytest.mark.parametrize("option", sorted(
    p.stem for p in (CONFIG_DIR / "augment").glob("*.yaml")))
def test_every_augment_option_validates_and_builds(compose_train, option):
  task = "mini_imagenet_5w1s" if option == "natural" else "omniglot_5w1s"
  cfg = experiment.validate_config(
      compose_train(f"task={task}", f"augment={option}"))
  assert (experiment_build.build_augmentation(cfg) is None) == (
      option == "none")


def test_default_is_none_and_old_configs_get_none(compose_train):
  cfg = experiment.validate_config(compose_train())
  assert cfg["augment"]["affine"] is None
  assert experiment.validate_config(
      {k: v for k, v in cfg.items() if k != "augment"})["augment"] == (
          cfg["augment"])


def test_only_the_meta_training_episodes_are_augmented(compose_train):
  cfg = experiment.validate_config(compose_train(*SMOKE))
  learner = experiment.build_learner(cfg)
  augmented = _run._samplers(cfg, learner)
  plain = experiment.build_samplers(cfg["task"])
  splits = ("train", "val", "test")
  order = [getattr(s, split) for split in splits for s in (augmented, plain)]
  # One compiled call draws from all six samplers, the pools as arguments.
  episodes = jax.jit(lambda key, pools: [
      sampler.sample(key, pool)
      for sampler, pool in zip(order, pools, strict=True)
  ])(jax.random.key(0), [sampler.data for sampler in order])
  drawn = dict(zip(splits, zip(episodes[::2], episodes[1::2], strict=True),
                   strict=True))
  for split in ("val", "test"):
    a, b = drawn[split]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  a, b = drawn["train"]
  np.testing.assert_array_equal(a.support_y, b.support_y)
  assert not np.array_equal(a.support_x, b.support_x)
  assert not np.array_equal(a.query_x, b.query_x)  # apply_to: both


@pytest.mark.slow
def test_resume_with_augmentation_is_bitwise_identical(compose_train,
                                                       tmp_path):
  full, parts = tmp_path / "full", tmp_path / "parts"
  experiment.run_experiment(compose_train(*SMOKE), full)
  experiment.run_experiment(
      compose_train(*SMOKE, "trainer.num_steps=1"), parts)
  results = experiment.run_experiment(
      compose_train(*SMOKE, "trainer.resume=true"), parts)
  assert results["steps"] == 2
  _, a = experiment.load_checkpoint(full / "checkpoints")
  _, b = experiment.load_checkpoint(parts / "checkpoints")
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.array_equal(x, y)
             for x, y in zip(leaves_a, leaves_b, strict=True))
