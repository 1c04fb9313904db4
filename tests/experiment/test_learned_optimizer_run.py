"""``metalearn-train --config-name learned_optimizer``: meta-train a learned
optimiser on a task family, then compare it with tuned Adam and SGD."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from metalearn import experiment
from metalearn.experiment import _lopt

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _compose(*overrides):
  with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    return compose("learned_optimizer",
                   overrides=["debug=smoke_lopt", *overrides])


def test_default_config_is_the_benchmark_family():
  with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = _lopt.validate_lopt_config(compose("learned_optimizer"))
  assert cfg["task"]["dataset"] == "sinusoid"
  assert (cfg["task"]["num_shots"], cfg["family"]["batch_size"]) == (50, 10)
  assert (cfg["outer"]["horizon"], cfg["outer"]["truncation"]) == (200, 20)
  assert cfg["outer"]["estimator"] == "pes"


@pytest.mark.slow
@pytest.mark.parametrize("estimator,logger", [("pes", "wandb"),
                                              ("tbptt", "none"),
                                              ("bmg", "none")])
def test_meta_trains_compares_and_writes_curves(tmp_path, monkeypatch,
                                               estimator, logger):
  # wandb offline: files only, no network.
  monkeypatch.setenv("WANDB_MODE", "offline")
  results = _lopt.run_learned_optimizer(
      _compose(f"outer.estimator={estimator}", f"logger={logger}"), tmp_path)
  if logger == "wandb":  # The curves went to wandb: a line plot and the PNG.
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/*/*"))
    for prefix in ("held_out_loss_png", "held_out_loss_table"):
      assert any(p.name.startswith(prefix) for p in media), media
  assert results["outer_steps"] == 2 and results["estimator"] == estimator
  for name in ("adam", "sgd", "learned"):
    for metric in ("final_train", "final_held_out", "mean_train"):
      assert np.isfinite(results[f"{name}/{metric}"]) or (
          results[f"{name}/{metric}"] == 1e6)
  # Each baseline's rate is the grid's best on the training tasks.
  for name, lr in results["tuned_learning_rates"].items():
    table = results["tuning_final_train"][name]
    assert table[str(lr)] == min(table.values())
  assert results["verdict"].startswith("the learned optimiser ")
  records = [json.loads(line) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["meta_loss"]) for r in records)
  curves = json.loads((tmp_path / "curves.json").read_text())
  assert set(curves) == {"adam", "sgd", "learned"}
  assert len(curves["learned"]["curve_held_out"]) == 4 + 1  # horizon + 1
  assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((tmp_path / "results.json").read_text()) == results


@pytest.mark.parametrize("override,message", [
    ("outer.estimator=sgd",
     "outer.estimator='sgd' is not one of bmg, pes, tbptt"),
    ("outer.bmg_steps=-1", "outer.bmg_steps must be an int >= 0"),
    ("outer.bmg_target_lr=-0.1",
     "outer.bmg_target_lr must be null or a number >= 0"),
    ("outer.bmg_steps=0 outer.bmg_target_lr=null",
     "outer.bmg_steps=0 needs outer.bmg_target_lr > 0"),
    ("outer.bmg_particles=0", "outer.bmg_particles must be an int >= 1"),
    ("outer.horizon=5",
     "outer.horizon=5 must be a multiple of outer.truncation=2"),
    ("outer.meta_lr=0", "outer.meta_lr must be a number > 0"),
    ("eval.learning_rates=[]", "eval.learning_rates must be a non-empty list"),
    ("eval.learning_rates=[0.1,-1]",
     "eval.learning_rates[1] must be a number > 0"),
    ("family.batch_size=0", "family.batch_size must be an int >= 1"),
    ("outer.checkpoint_every=0", "outer.checkpoint_every must be an int >= 1"),
    ("outer.resume=maybe", "outer.resume"),
])
def test_bad_fields_are_named(override, message):
  with pytest.raises(experiment.ConfigError, match=message.replace(
      "[", r"\[").replace("]", r"\]")):
    _lopt.validate_lopt_config(_compose(*override.split()))


@pytest.mark.slow
def test_command_line_run_equals_an_in_process_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "metalearn.train", "--config-name",
       "learned_optimizer", "debug=smoke_lopt",
       f"hydra.run.dir={tmp_path / 'cli'}"],
      capture_output=True, text=True, timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  cli = json.loads((tmp_path / "cli" / "results.json").read_text())
  # Same seed, same config: the same numbers, bit for bit.
  here = _lopt.run_learned_optimizer(_compose(), tmp_path / "here")
  drop = ("train_seconds",)
  assert ({k: v for k, v in cli.items() if k not in drop}
          == {k: v for k, v in here.items() if k not in drop})


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
  # PES: its particles (inner runs carried across truncations) are part of
  # the checkpointed state.
  def run(run_dir, *overrides):
    return _lopt.run_learned_optimizer(
        _compose("outer.estimator=pes", "outer.checkpoint_every=2",
                 *overrides), run_dir)

  whole = run(tmp_path / "whole", "outer.num_steps=4")
  run(tmp_path / "cut", "outer.num_steps=2")  # Stopped after step 2.
  with pytest.raises(experiment.ConfigError, match="outer.resume=true"):
    run(tmp_path / "cut", "outer.num_steps=4")  # Would overwrite the run.
  resumed = run(tmp_path / "cut", "outer.num_steps=4", "outer.resume=true")
  drop = ("train_seconds",)
  assert ({k: v for k, v in resumed.items() if k not in drop}
          == {k: v for k, v in whole.items() if k not in drop})
  _, a = experiment.load_checkpoint(tmp_path / "whole" / "checkpoints")
  step, b = experiment.load_checkpoint(tmp_path / "cut" / "checkpoints")
  assert step == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  records = [json.loads(line) for line in
             (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  with pytest.raises(experiment.ConfigError, match="do not fit|differ"):
    run(tmp_path / "cut", "outer.num_steps=6", "outer.resume=true",
        "learned_optimizer.hidden_sizes=[5]")
