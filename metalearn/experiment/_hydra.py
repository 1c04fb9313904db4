"""The body of ``metalearn-train``: which run a config asks for, and errors.

Above both kinds of run: a ``train.yaml`` config runs
:func:`~metalearn.experiment.run_experiment`, a ``learned_optimizer.yaml``
config :func:`~metalearn.experiment.run_learned_optimizer`. Errors a user
fixes end a single run in one line.
"""

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from metalearn import data, training
from metalearn.experiment._checks import ConfigError
from metalearn.experiment._lopt import run_learned_optimizer
from metalearn.experiment._population import is_population, run_population
from metalearn.experiment._run import run_experiment

log = logging.getLogger("metalearn.experiment")

# Errors a user fixes in the config or the data directory; the command line
# reports them in one line, without a traceback.
USER_ERRORS = (
    ConfigError,
    data.DatasetNotFoundError,
    data.DataChecksumError,
    training.NonFiniteLossError,
)


def _objective(results: Mapping[str, Any]) -> float | None:
  """The number a hydra sweeper optimises: the validation objective
  (``trainer.objective``) of the tested state, never a test metric; for a
  learned-optimiser run, its held-out loss."""
  for name in ("objective_value", "learned/final_held_out"):
    if name in results:
      return float(results[name])
  return None


def run_hydra(cfg) -> float | None:
  """The body of ``metalearn-train``: runs in hydra's run directory.

  A config with ``learned_optimizer`` and ``outer`` groups (``--config-name
  learned_optimizer``) meta-trains an optimiser on a task family
  (:func:`~metalearn.experiment.run_learned_optimizer`); any other runs a
  few-shot experiment (:func:`~metalearn.experiment.run_experiment`), or,
  with a ``population``, all its members as one program
  (:func:`~metalearn.experiment.run_population`).

  A config, data or non-finite-loss error ends a single run with one line
  on stderr and exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback).
  In a multirun the error is re-raised, so hydra records the failed job and
  the sweep's other jobs still run.

  Returns:
    The validation metric named by ``trainer.objective`` (accuracy by
    default for classification, to maximise; loss for regression, to
    minimise) of the tested state, for sweepers that optimise it.
  """
  from hydra.core.hydra_config import HydraConfig
  from hydra.types import RunMode

  hydra_cfg = HydraConfig.get()
  run = run_experiment
  if "learned_optimizer" in cfg and "outer" in cfg:
    run = run_learned_optimizer
  elif is_population(cfg):
    run = run_population
  # Joins a multi-host job when the launch environment describes one
  # (coordinator address, a multi-task srun step); a no-op otherwise.
  training.initialize_distributed()
  # Hydra logs INFO to the console; orbax's per-save INFO lines (through
  # absl) would drown the training log.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  try:
    results = run(cfg, hydra_cfg.runtime.output_dir)
  except USER_ERRORS as e:
    log.error("%s: %s", type(e).__name__, e)
    if (
        hydra_cfg.mode == RunMode.MULTIRUN
        or os.environ.get("HYDRA_FULL_ERROR") == "1"
    ):
      raise
    print(f"metalearn-train: error: {e}", file=sys.stderr)
    raise SystemExit(1) from e
  return _objective(results)
