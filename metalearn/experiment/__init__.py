"""Hydra experiments: config to objects, runs, checkpoints and logging.

This subpackage is the edge where hydra, omegaconf, orbax and wandb are
used; ``import metalearn`` does not import it. The command line is
``metalearn-train`` (:mod:`metalearn.train`); the same run is available
as :func:`run_experiment` for notebooks and tests:

>>> from hydra import compose, initialize_config_dir  # doctest: +SKIP
>>> with initialize_config_dir(config_dir="/path/to/configs",
...                            version_base="1.3"):  # doctest: +SKIP
...   cfg = compose("train", overrides=["debug=smoke"])
>>> run_experiment(cfg, "outputs/smoke")  # doctest: +SKIP
"""

from metalearn.experiment._build import build_learner, build_optimizer
from metalearn.experiment._checkpoint import (
    checkpoint_manager,
    load_checkpoint,
    restore_state,
    save_state,
)
from metalearn.experiment._checks import ConfigError, to_plain
from metalearn.experiment._config import (
    objective_metric,
    run_name,
    validate_config,
)
from metalearn.experiment._hydra import run_hydra
from metalearn.experiment._logging import (
    Logger,
    console_logger,
    make_logger,
    wandb_logger,
    wandb_mode,
)
from metalearn.experiment._lopt import (
    run_learned_optimizer,
    validate_lopt_config,
)
from metalearn.experiment._population import member_configs, run_population
from metalearn.experiment._records import read_metrics
from metalearn.experiment._run import evaluate_run, run_experiment
from metalearn.experiment._tasksets import Samplers, build_samplers

__all__ = (
    "ConfigError",
    "Logger",
    "Samplers",
    "build_learner",
    "build_optimizer",
    "build_samplers",
    "checkpoint_manager",
    "console_logger",
    "evaluate_run",
    "load_checkpoint",
    "make_logger",
    "member_configs",
    "objective_metric",
    "read_metrics",
    "restore_state",
    "run_experiment",
    "run_hydra",
    "run_learned_optimizer",
    "run_name",
    "run_population",
    "save_state",
    "to_plain",
    "validate_config",
    "validate_lopt_config",
    "wandb_logger",
    "wandb_mode",
)
