"""Fixtures of the experiment tests: composed configs, wandb off, data dir.

Configs are composed from the repository's ``configs/`` with
``hydra.compose``, as ``metalearn-train`` composes them. wandb is disabled
and the data directory points at the test data, for in-process runs and
for the subprocesses the tests start (they inherit the environment).
"""

import pathlib

import pytest
from hydra import compose, initialize_config_dir

from metalearn.data import DATA_DIR_ENV

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


@pytest.fixture(autouse=True)
def _experiment_env(monkeypatch, data_dir):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))


@pytest.fixture
def compose_train():
  """``compose_train(*overrides, hydra=False)`` composes ``train.yaml``."""

  def fn(*overrides: str, hydra: bool = False):
    with initialize_config_dir(
        config_dir=str(CONFIG_DIR), version_base="1.3"
    ):
      return compose(
          "train", overrides=list(overrides), return_hydra_config=hydra
      )

  return fn
