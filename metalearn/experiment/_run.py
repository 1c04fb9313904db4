"""One experiment: data, learner, meta-training with checkpoints, test."""

import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax

from metalearn import data, training
from metalearn.experiment import _build, _checkpoint, _logging

log = logging.getLogger("metalearn.experiment")

# Errors a user fixes in the config or the data directory; the command line
# reports them in one line, without a traceback.
USER_ERRORS = (
    _build.ConfigError,
    data.DatasetNotFoundError,
    training.NonFiniteLossError,
)


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)  # Atomic: readers never see half a file.


def _mesh(trainer):
  """The task mesh of ``trainer.devices``: null (none), "all" or a count."""
  devices = trainer.get("devices")
  if devices is None:
    return None
  return training.task_mesh(None if devices == "all" else devices)


def _evaluate(trainer, learner, meta_params, sampler, num_episodes):
  """Accuracy (or loss) on fixed episodes of ``trainer.eval_seed``."""
  return training.evaluate(
      learner, meta_params, sampler, jax.random.key(trainer["eval_seed"]),
      num_episodes=num_episodes,
      batch_size=trainer["eval_batch_size"],
      task_map=trainer["task_map"],
      mesh=_mesh(trainer),
  )


def _make_callback(cfg, learner, samplers, manager, logger):
  """Logs, validates and checkpoints every ``trainer.log_every`` steps."""
  trainer = cfg["trainer"]

  def callback(state: training.MetaTrainState, metrics: dict[str, float]):
    step = int(metrics["step"])
    logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
    if trainer["eval_every"] and step % trainer["eval_every"] == 0:
      val = _evaluate(trainer, learner, state.meta_params, samplers.val,
                      trainer["val_episodes"])
      logger.log({f"val/{k}": v for k, v in val.items()}, step)
    _checkpoint.save_state(
        manager, state, force=step == trainer["num_steps"]
    )

  return callback


def _start_state(cfg, learner, tx, samplers, manager, key):
  """The state to continue from (``None`` for a fresh run)."""
  trainer = cfg["trainer"]
  latest = manager.latest_step()
  if not trainer["resume"]:
    if latest is not None:
      raise _build.ConfigError(
          f"trainer.resume=false but {manager.directory} already holds "
          f"checkpoints (latest step {latest}): pass trainer.resume=true to "
          "continue that run, or use a new run directory"
      )
    return None
  if latest is None:
    log.warning("trainer.resume=true but %s holds no checkpoint: starting "
                "from step 0", manager.directory)
    return None
  like = training.init_state(learner, tx, samplers.train, key)
  state = _checkpoint.restore_state(manager, like, latest)
  log.info("resuming from the checkpoint at step %d in %s", latest,
           manager.directory)
  return state


def run_experiment(
    config: Mapping[str, Any], run_dir: str | os.PathLike
) -> dict[str, Any]:
  """Runs one experiment from its config: meta-train, checkpoint, test.

  The steps: validate the whole config (no data read, nothing compiled);
  load the dataset and check the episodes fit it; build the learner and
  meta-optimizer; meta-train with :func:`metalearn.training.meta_train`,
  logging every ``trainer.log_every`` steps and checkpointing every
  ``trainer.checkpoint_every`` steps and at the end; evaluate on the test
  split with :func:`metalearn.training.evaluate`; write
  ``<run_dir>/results.json``.

  All randomness comes from ``jax.random.key(cfg.seed)``, so a run resumed
  from a checkpoint (``trainer.resume=true``) ends with the same parameters,
  bit for bit, as one that never stopped. Test episodes come from
  ``trainer.eval_seed``, the same for every run.

  Args:
    config: the composed config (a ``DictConfig`` or its plain form).
    run_dir: the run directory (results, checkpoints, logs).

  Returns:
    The results: ``name``, ``seed``, ``steps``, the last ``train/*``
    metrics, ``test/*`` metrics (accuracy and its 95% interval, loss),
    ``train_seconds`` and ``run_dir``.

  Raises:
    ConfigError: for a bad config value, naming the field.
    DatasetNotFoundError: if the data directory lacks the dataset.
    NonFiniteLossError: if the loss became NaN or infinite; the last
      checkpoint (before it) is kept.
  """
  cfg = _build.validate_config(config)
  trainer = cfg["trainer"]
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  samplers = _build.build_samplers(
      cfg["task"], _build.load_splits(cfg["task"])
  )
  learner = _build.build_learner(cfg)
  tx = _build.build_optimizer(cfg)
  key = jax.random.key(cfg["seed"])
  manager = _checkpoint.checkpoint_manager(
      trainer["checkpoint_dir"] or run_dir / "checkpoints",
      save_every=trainer["checkpoint_every"],
      max_to_keep=trainer["max_to_keep"],
  )
  logger = None
  try:
    state = _start_state(cfg, learner, tx, samplers, manager, key)
    _write_json(run_dir / "config.json", cfg)
    logger = _logging.make_logger(
        cfg["logger"], run_dir=run_dir, name=_build.run_name(cfg),
        config=cfg, resume=trainer["resume"],
    )
    start = time.perf_counter()
    state, history = training.meta_train(
        learner, tx, samplers.train, key=key,
        num_steps=trainer["num_steps"],
        meta_batch_size=trainer["meta_batch_size"],
        state=state,
        steps_per_call=trainer["steps_per_call"],
        task_map=trainer["task_map"],
        mesh=_mesh(trainer),
        log_every=trainer["log_every"],
        callback=_make_callback(cfg, learner, samplers, manager, logger),
        progress=trainer["progress"],
    )
    manager.wait_until_finished()
    results = {
        "name": _build.run_name(cfg),
        "seed": cfg["seed"],
        "steps": int(state.step),
        "train_seconds": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    if history:
      results.update({f"train/{k}": v for k, v in history[-1].items()
                      if k != "step"})
    if trainer["test_episodes"]:
      test = _evaluate(trainer, learner, state.meta_params, samplers.test,
                       trainer["test_episodes"])
      results.update({f"test/{k}": v for k, v in test.items()})
    _write_json(run_dir / "results.json", results)
    logger.summary(results)
    logger.finish(0)
    logger = None
    return results
  finally:
    if logger is not None:
      logger.finish(1)
    manager.wait_until_finished()
    manager.close()


def _objective(results: Mapping[str, Any]) -> float | None:
  """The number a hydra sweeper optimises: test accuracy, else test loss."""
  for name in ("test/outer/accuracy", "test/outer/loss"):
    if name in results:
      return float(results[name])
  return None


def run_hydra(cfg) -> float | None:
  """The body of ``metalearn-train``: runs in hydra's run directory.

  A config, data or non-finite-loss error ends a single run with one line
  on stderr and exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback).
  In a multirun the error is re-raised, so hydra records the failed job and
  the sweep's other jobs still run.

  Returns:
    The test accuracy (or loss), for sweepers that optimise it.
  """
  from hydra.core.hydra_config import HydraConfig
  from hydra.types import RunMode

  hydra_cfg = HydraConfig.get()
  # Joins a multi-host job when the launch environment describes one
  # (coordinator address, a multi-task srun step); a no-op otherwise.
  training.initialize_distributed()
  # Hydra logs INFO to the console; orbax's per-save INFO lines (through
  # absl) would drown the training log.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  try:
    results = run_experiment(cfg, hydra_cfg.runtime.output_dir)
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
