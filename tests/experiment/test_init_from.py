"""``trainer.init_from``: a run starts from another run's network."""

import logging
import pathlib

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from metalearn import experiment, metalearners, training
from metalearn.experiment import _init_from, _run
from metalearn.experiment._checks import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def test_transplant_matches_by_name_inside_the_network_and_shape():
  source = {
      "params": {
          "embed": {"block0": {"kernel": np.full((3, 2), 7.0)},
                    "head": {"kernel": np.ones((2, 40))}},
          "log_lam": np.float32(3.0),
      },
      "model_state": {"block0": {"mean": np.full((2,), 5.0)}},
  }
  target = metalearners.WithModelState(
      {"block0": {"kernel": np.zeros((3, 2), np.float32)},
       "head": {"kernel": np.zeros((2, 5), np.float32)}},
      {"block0": {"mean": np.zeros((2,), np.float32)}},
  )
  target = (target, {"log_lam": np.float32(0.0)})  # a learner's own field
  out, copied, kept = _init_from.transplant(target, source,
                                            {"block0", "head"})
  (net, own) = out
  np.testing.assert_array_equal(net.params["block0"]["kernel"], 7.0)
  assert net.params["block0"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(net.model_state["block0"]["mean"], 5.0)
  np.testing.assert_array_equal(net.params["head"]["kernel"], 0.0)
  assert float(own["log_lam"]) == 0.0  # not the network's: untouched
  assert sorted(copied) == ["block0/kernel", "block0/mean"]
  assert kept == ["head/kernel"]  # 40 classes there, 5 ways here


def _net(value, classes=4):
  return metalearners.WithModelState(
      metalearners.SupervisedParams(
          {"block0": {"kernel": np.full((3, 2), value, np.float32)}},
          metalearners.Head(np.full((2, classes), value, np.float32),
                            np.full((classes,), value, np.float32))),
      {"block0": {"mean": np.full((2,), value, np.float32)}})


def test_transplant_loads_a_teacher_whole_and_reads_a_students_network():
  modules = {"block0", "head"}
  fresh = metalearners.Distilled(_net(0.0), _net(0.0))
  out, copied, kept = _init_from.transplant(fresh, _net(3.0), modules)
  assert _init_from.has_teacher(fresh) and not kept and len(copied) == 4
  for leaf in jax.tree.leaves(out.teacher):
    np.testing.assert_array_equal(leaf, 3.0)
  for leaf in jax.tree.leaves(out.student):  # born again: fresh
    np.testing.assert_array_equal(leaf, 0.0)
  # A distilled checkpoint provides its student, not its own teacher.
  source = metalearners.Distilled(_net(5.0), _net(3.0))
  out, _, _ = _init_from.transplant(fresh, source, modules)
  for leaf in jax.tree.leaves(out.teacher):
    np.testing.assert_array_equal(leaf, 5.0)
  plain, _, _ = _init_from.transplant(_net(0.0), source, modules)
  for leaf in jax.tree.leaves(plain):
    np.testing.assert_array_equal(leaf, 5.0)
  # A teacher with a head of another size would be half loaded.
  with pytest.raises(ValueError, match="teacher must be loaded whole.*"
                     "head/weights"):
    _init_from.transplant(fresh, _net(3.0, classes=6), modules)


def test_ambiguous_checkpoint_names_are_refused():
  source = {"model": {"block0": {"k": np.ones(2)}},
            "embed": {"block0": {"k": np.ones(2)}}}
  with pytest.raises(ValueError, match="two leaves named block0/k"):
    _init_from.transplant({"block0": {"k": np.zeros(2)}}, source,
                          {"block0"})


# Sinusoid runs, the cheapest real ones: 2 meta-steps, no test episodes.
FAST = ("logger=none", "trainer.meta_batch_size=4", "trainer.num_steps=2",
        "trainer.log_every=1", "trainer.checkpoint_every=1",
        "trainer.steps_per_call=1", "trainer.test_episodes=0",
        "trainer.progress=false")


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
  """A checkpointed MAML run on sinusoids (Finn et al.'s 40-40 MLP)."""
  run_dir = tmp_path_factory.mktemp("maml_run")
  with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("train", overrides=["experiment=sinusoid_maml", *FAST])
  experiment.run_experiment(cfg, run_dir)
  return run_dir


def test_metasgd_starts_from_a_maml_network(compose_train, tmp_path,
                                            maml_run, caplog):
  _, saved = experiment.load_checkpoint(maml_run / "checkpoints")
  source = saved["meta_params"]
  cfg = experiment.validate_config(compose_train(
      "experiment=sinusoid_metasgd", *FAST,
      f"trainer.init_from={maml_run}"))
  learner = experiment.build_learner(cfg)
  tx = experiment.build_optimizer(cfg)
  samplers = _run._samplers(cfg, learner)
  key = jax.random.key(cfg["seed"])
  state = _run._pretrained_state(cfg, learner, tx, samplers, key)
  fresh = training.init_state(learner, tx, samplers.train,
                              jax.random.split(key)[0])
  # The network comes from the checkpoint (after its 2 meta-steps, so it
  # differs from the fresh one), leaf for leaf ...
  jax.tree.map(np.testing.assert_array_equal, state.meta_params.model,
               source)
  assert not np.array_equal(state.meta_params.model["head"]["kernel"],
                            fresh.meta_params.model["head"]["kernel"])
  # ... and Meta-SGD's own step sizes keep their initialisation.
  jax.tree.map(np.testing.assert_array_equal, state.meta_params.inner_lr,
               fresh.meta_params.inner_lr)
  # The whole run: trained from there and saying what it did.
  with caplog.at_level(logging.INFO, logger="metalearn.experiment"):
    results = experiment.run_experiment(cfg, tmp_path)
  assert results["steps"] == 2
  assert "loaded 6 network leaves of checkpoint 2" in caplog.text


def test_zero_steps_test_the_loaded_network_untrained(compose_train,
                                                     tmp_path, maml_run):
  _, saved = experiment.load_checkpoint(maml_run / "checkpoints")
  cfg = compose_train("experiment=sinusoid_metasgd", *FAST,
                      "trainer.num_steps=0", "trainer.test_episodes=4",
                      f"trainer.init_from={maml_run}")
  results = experiment.run_experiment(cfg, tmp_path)
  assert (results["steps"], results["tested_step"]) == (0, 0)
  assert results["test/num_episodes"] == 4
  step, tested = experiment.load_checkpoint(tmp_path / "checkpoints")
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal,
               tested["meta_params"]["model"], saved["meta_params"])


def test_the_best_validated_state_can_be_loaded(compose_train, tmp_path):
  """``init_from=<run>/checkpoints/best`` loads the state that a
  ``best_val`` run tested, not its last one."""
  cfg = compose_train("experiment=sinusoid_maml", *FAST,
                      "trainer.num_steps=3", "trainer.select=best_val",
                      "trainer.eval_every=1", "trainer.val_episodes=4")
  experiment.run_experiment(cfg, tmp_path / "source")
  best = tmp_path / "source" / "checkpoints" / "best"
  _, saved = experiment.load_checkpoint(best)
  cfg = compose_train("experiment=sinusoid_maml", *FAST,
                      "trainer.num_steps=0", f"trainer.init_from={best}")
  experiment.run_experiment(cfg, tmp_path / "loaded")
  _, loaded = experiment.load_checkpoint(tmp_path / "loaded" / "checkpoints")
  jax.tree.map(np.testing.assert_array_equal, loaded["meta_params"],
               saved["state"]["meta_params"])


def test_a_network_of_another_width_fails_in_one_line(compose_train,
                                                      tmp_path, maml_run):
  cfg = compose_train("experiment=sinusoid_metasgd", *FAST,
                      "model.hidden=[20,20]",
                      f"trainer.init_from={maml_run}")
  with pytest.raises(ConfigError, match=r"trainer.init_from=.*4 network "
                     r"leaves have other shapes .*dense0/bias \(40,\) "
                     r"there, \(20,\) here"):
    experiment.run_experiment(cfg, tmp_path)


@pytest.mark.parametrize("make,match", [(False, "no such directory"),
                                        (True, "no checkpoint")])
def test_a_directory_without_checkpoints_fails_in_one_line(
    compose_train, tmp_path, make, match):
  if make:
    (tmp_path / "nothing").mkdir()
  cfg = compose_train("experiment=sinusoid_maml", *FAST,
                      f"trainer.init_from={tmp_path / 'nothing'}")
  with pytest.raises(ConfigError, match=f"trainer.init_from=.*{match}"):
    experiment.run_experiment(cfg, tmp_path / "run")


def test_meta_baseline_meta_trains_a_pretrained_baseline(
    compose_train, tmp_path, caplog):
  """The two stages of Chen et al. (2021) on real Omniglot, at smoke size:
  a Baseline pretraining run, then Meta-Baseline from its network."""
  small = ("debug=smoke", "model.features=8")
  pretrained = tmp_path / "baseline"
  experiment.run_experiment(
      compose_train("experiment=omniglot_5w1s_baseline", *small,
                    "trainer.test_episodes=0"), pretrained)
  # Without the pretraining run the experiment file says what it needs.
  with pytest.raises(ConfigError, match="init_from=<required: a run "
                     "directory of experiment=omniglot_5w1s_baseline>"):
    experiment.run_experiment(
        compose_train("experiment=omniglot_5w1s_meta-baseline", *small),
        tmp_path / "missing")
  cfg = compose_train("experiment=omniglot_5w1s_meta-baseline", *small,
                      f"trainer.init_from={pretrained}")
  with caplog.at_level(logging.INFO, logger="metalearn.experiment"):
    results = experiment.run_experiment(cfg, tmp_path / "meta")
  # The 4 blocks' conv, batch-norm parameters and running statistics (the
  # baseline's global head has no counterpart), tau kept at 10.
  assert "loaded 24 network leaves of checkpoint 2" in caplog.text
  assert results["steps"] == 2
  _, saved = experiment.load_checkpoint(tmp_path / "meta" / "checkpoints")
  scale = saved["meta_params"]["params"]["scale"]
  assert 9.0 < float(scale) < 11.0 and float(scale) != 10.0


def test_init_from_must_be_a_path(compose_train):
  with pytest.raises(ConfigError, match="trainer.init_from must be"):
    experiment.validate_config(
        compose_train("experiment=sinusoid_maml", "trainer.init_from=3"))


def test_test_time_fine_tuning_of_a_pretrained_baseline(compose_train,
                                                        tmp_path):
  """Fine-tuning the backbone on augmented support sets at test, from a
  Baseline pretraining run on real Omniglot (smoke size): a zero learning
  rate tests as the frozen backbone does, a positive one otherwise."""
  small = ("debug=smoke", "model.features=8")
  pretrained = tmp_path / "baseline"
  experiment.run_experiment(
      compose_train("experiment=omniglot_5w1s_baseline", *small,
                    "trainer.test_episodes=0"), pretrained)

  def test(name, *overrides):
    cfg = compose_train("experiment=omniglot_5w1s_baseline", *small,
                        "trainer.num_steps=0", "trainer.test_episodes=8",
                        f"trainer.init_from={pretrained}", *overrides)
    return experiment.run_experiment(cfg, tmp_path / name)["test/outer/loss"]

  tuning = ("learner.backbone_steps=3", "augment=omniglot_affine",
            "learner.backbone_augment=${augment}")
  frozen = test("frozen")
  assert test("lr0", *tuning, "learner.backbone_lr=0") == pytest.approx(
      frozen, rel=1e-5)
  tuned = test("tuned", *tuning, "learner.backbone_lr=0.1")
  assert np.isfinite(tuned) and abs(tuned - frozen) > 1e-4


def test_rfs_distill_generations_on_omniglot(compose_train, tmp_path,
                                             caplog):
  """RFS, then two born-again generations on real Omniglot (smoke size):
  each teacher is the previous run's (student) network, fixed."""
  small = ("debug=smoke", "model.features=8", "trainer.test_episodes=0")
  experiment.run_experiment(
      compose_train("experiment=omniglot_5w1s_rfs", *small),
      tmp_path / "gen0")
  with pytest.raises(ConfigError, match="init_from=<required: a run "
                     "directory of experiment=omniglot_5w1s_rfs>"):
    experiment.run_experiment(
        compose_train("experiment=omniglot_5w1s_rfs-distill", *small),
        tmp_path / "missing")
  with pytest.raises(ConfigError, match="trainer.init_from is required: "
                     "the learner distils"):
    experiment.run_experiment(
        compose_train("experiment=omniglot_5w1s_rfs", *small,
                      "learner.kd_weight=0.5"), tmp_path / "missing2")
  previous = experiment.load_checkpoint(tmp_path / "gen0" / "checkpoints")[1]
  previous = previous["meta_params"]
  for generation in ("gen1", "gen2"):
    cfg = compose_train("experiment=omniglot_5w1s_rfs-distill", *small,
                        f"trainer.init_from={tmp_path / 'gen0'}"
                        if generation == "gen1" else
                        f"trainer.init_from={tmp_path / 'gen1'}")
    with caplog.at_level(logging.INFO, logger="metalearn.experiment"):
      results = experiment.run_experiment(cfg, tmp_path / generation)
    # 4 blocks' conv and batch-norm leaves, running statistics, the head.
    assert "loaded 26 network leaves of checkpoint 2" in caplog.text
    assert "into the teacher" in caplog.text
    assert results["steps"] == 2
    _, saved = experiment.load_checkpoint(
        tmp_path / generation / "checkpoints")
    saved = saved["meta_params"]
    jax.tree.map(np.testing.assert_array_equal, saved["teacher"], previous)
    assert not np.allclose(saved["student"]["params"]["head"]["weights"],
                           saved["teacher"]["params"]["head"]["weights"])
    previous = saved["student"]
    caplog.clear()
