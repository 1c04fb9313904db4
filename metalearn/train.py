"""``metalearn-train``: meta-train and test one hydra-composed experiment.

Examples (from the repository root)::

  metalearn-train experiment=omniglot_5w1s_maml
  metalearn-train learner=protonet model=conv4_protonet trainer.num_steps=2000
  metalearn-train debug=smoke                  # 2 meta-steps, console only
  metalearn-train -m learner=maml,protonet seed=0,1          # a sweep
  metalearn-train hydra.run.dir=outputs/my_run trainer.resume=true
  # Optuna on the validation objective (README.md, "Sweeps"):
  metalearn-train -m hydra/sweeper=optuna_val 'learner.inner_lr=interval(0.1,1)'

The logic lives in :mod:`metalearn.experiment`; this file only hands hydra's
config to :func:`metalearn.experiment.run_hydra`.
"""

import pathlib

import hydra
from omegaconf import DictConfig, OmegaConf

from metalearn import experiment

# The repository's top-level configs/ (../configs from this file). Absolute,
# because hydra reads a relative config_path as a Python package when the
# app is started through the console script rather than `python -m`.
CONFIG_DIR = str(pathlib.Path(__file__).resolve().parent.parent / "configs")

# ${metalearn.direction:<trainer.objective>,<task.num_ways>}: "maximize" or
# "minimize", for a sweeper's direction (configs/hydra/sweeper/optuna_val);
# a null task.num_ways is a regression task.
OmegaConf.register_new_resolver(
    "metalearn.direction",
    lambda objective, num_ways: experiment.objective_metric(
        objective, regression=num_ways is None)[1],
    replace=True,
)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
  """Runs the experiment; returns its validation objective for sweepers."""
  return experiment.run_hydra(cfg)


if __name__ == "__main__":
  main()
