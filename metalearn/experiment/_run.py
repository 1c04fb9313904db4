"""One experiment: data, learner, meta-training with checkpoints, test."""

import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from metalearn import data, training
from metalearn.experiment import _build, _checkpoint, _logging, _select

log = logging.getLogger("metalearn.experiment")

# Errors a user fixes in the config or the data directory; the command line
# reports them in one line, without a traceback.
USER_ERRORS = (
    _build.ConfigError,
    data.DatasetNotFoundError,
    data.DataChecksumError,
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


def _evaluate(trainer, learner, meta_params, sampler, num_episodes, split):
  """Accuracy (or loss) on a split's fixed episodes: ``trainer.eval_seed``
  for test, ``trainer.val_seed`` for validation (:func:`_select.eval_seed`).
  """
  return training.evaluate(
      learner, meta_params, sampler,
      jax.random.key(_select.eval_seed(trainer, split)),
      num_episodes=num_episodes,
      batch_size=trainer["eval_batch_size"],
      task_map=trainer["task_map"],
      mesh=_mesh(trainer),
  )


class _MetricsFile:
  """``<run dir>/metrics.jsonl``: one JSON line per metric record, with
  ``step`` and ``wall_s``, the seconds since the run began (training,
  validation and checkpointing; a resumed run continues the clock of the
  lines it keeps)."""

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    kept, offset = [], 0.0
    if resume_step is not None and path.exists():
      for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["step"] <= resume_step:
          kept.append(line)
          offset = record["wall_s"]
    # Lines past the checkpoint belong to steps the resumed run redoes.
    path.write_text("".join(line + "\n" for line in kept))
    self.start = time.perf_counter() - offset

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    record = {"step": step,
              "wall_s": round(time.perf_counter() - self.start, 3),
              **metrics}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def _validate(trainer, learner, meta_params, samplers):
  """The ``val/*`` metrics of ``meta_params``."""
  val = _evaluate(trainer, learner, meta_params, samplers.val,
                  trainer["val_episodes"], "val")
  return {f"val/{k}": v for k, v in val.items()}


def _make_callback(cfg, learner, samplers, manager, logger, metrics_file,
                   selection):
  """Logs, validates (noting it in ``selection``) and checkpoints every
  ``trainer.log_every`` steps."""
  trainer = cfg["trainer"]

  def callback(state: training.MetaTrainState, metrics: dict[str, float]):
    step = int(metrics["step"])
    metrics = {k: v for k, v in metrics.items() if k != "step"}
    logger.log(metrics, step)
    if trainer["eval_every"] and step % trainer["eval_every"] == 0:
      val = _validate(trainer, learner, state.meta_params, samplers)
      logger.log(val, step)
      metrics.update(val)
      selection.record(state, val)
    metrics_file.write(step, metrics)
    _checkpoint.save_state(
        manager, state, force=step == trainer["num_steps"]
    )

  return callback


def _select_and_test(trainer, learner, samplers, state, selection, logger):
  """Validates the final state (unless it was at its step), picks the
  tested state (``trainer.select``) and tests it.

  Returns:
    The results' ``select``, ``tested_step``, ``objective`` (the ``val/*``
    metric name), ``objective_value`` (of the tested state) and ``test/*``.
  """
  step = int(state.step)
  final_val = selection.validation_of(step)
  if final_val is None:
    final_val = _validate(trainer, learner, state.meta_params, samplers)
    logger.log(final_val, step)
  tested, tested_step, value = selection.choose(state, final_val)
  if tested_step != step:
    log.info("trainer.select=%s: testing the state of step %d (%s=%.6g)",
             trainer["select"], tested_step, selection.metric, value)
  results = {
      "select": trainer["select"],
      "tested_step": tested_step,
      "objective": selection.metric,
      "objective_value": value,
      # A query's test outputs depend on the other queries of its episode.
      "transductive": learner.transductive,
  }
  if trainer["test_episodes"]:
    test = _evaluate(trainer, learner, tested.meta_params, samplers.test,
                     trainer["test_episodes"], "test")
    results.update({f"test/{k}": v for k, v in test.items()})
  return results


def _resume_state(manager, resume: bool, field: str, like: Callable[[], Any]):
  """The checkpointed state a run continues from, or ``None`` to start afresh.

  Args:
    manager: the run's checkpoint directory.
    resume: the run's ``field`` (``trainer.resume`` or ``outer.resume``).
    field: the config field, for messages.
    like: builds a fresh state of the run (structure, shapes and dtypes to
      restore into); called only when there is a checkpoint to restore.

  Raises:
    ConfigError: naming ``field``, if the run would start afresh over
      existing checkpoints, or if the latest checkpoint does not fit ``like``.
  """
  latest = manager.latest_step()
  if not resume:
    if latest is not None:
      raise _build.ConfigError(
          f"{field}=false but {manager.directory} already holds "
          f"checkpoints (latest step {latest}): pass {field}=true to "
          "continue that run, or use a new run directory"
      )
    return None
  if latest is None:
    log.warning("%s=true but %s holds no checkpoint: starting from step 0",
                field, manager.directory)
    return None
  try:
    state = _checkpoint.restore_state(manager, like(), latest)
  except ValueError as e:
    raise _build.ConfigError(
        f"{field}=true: {e} (the config differs from the checkpointed "
        "run's)") from e
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
  ``trainer.checkpoint_every`` steps and at the end (also when
  ``trainer.max_time_s`` stops training early); validate every
  ``trainer.eval_every`` steps; record every metric line in
  ``<run_dir>/metrics.jsonl``; validate the final state (unless it was at
  its step); pick the tested state (``trainer.select``: the last one, or
  the one with the best ``trainer.objective``, kept in ``<checkpoint
  dir>/best``); evaluate it on the test split with
  :func:`metalearn.training.evaluate`; write ``<run_dir>/results.json``.

  All randomness comes from ``jax.random.key(cfg.seed)``, so a run resumed
  from a checkpoint (``trainer.resume=true``) ends with the same parameters,
  bit for bit, and tests the same state, as one that never stopped. Test
  episodes come from ``trainer.eval_seed`` and validation episodes from
  ``trainer.val_seed`` (never the test key), the same for every run.

  Args:
    config: the composed config (a ``DictConfig`` or its plain form).
    run_dir: the run directory (results, checkpoints, logs).

  Returns:
    The results: ``name``, ``seed``, ``steps``, the last ``train/*``
    metrics, ``select``, ``tested_step``, ``objective`` (a ``val/*``
    metric name) and ``objective_value`` (that metric of the tested
    state), ``test/*`` metrics of the tested state (accuracy and its 95%
    interval, loss), ``train_seconds`` and ``run_dir``.

  Raises:
    ConfigError: for a bad config value, naming the field.
    DatasetNotFoundError: if the data directory lacks the dataset.
    DataChecksumError: if a data file has the wrong checksum.
    NonFiniteLossError: if the loss became NaN or infinite; the last
      checkpoint (before it) is kept.
  """
  cfg = _build.validate_config(config)
  trainer = cfg["trainer"]
  if trainer["eval_every"] and "val" in cfg["task"].get("train_splits", ()):
    log.warning(
        "task.train_splits includes val: the validation metrics every "
        "trainer.eval_every steps are of classes meta-trained on, not "
        "held out")
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  samplers = _build.build_samplers(
      cfg["task"], _build.load_splits(cfg["task"]),
      paired=_build.uses_task_pairs(cfg),
  )
  learner = _build.build_learner(cfg)
  tx = _build.build_optimizer(cfg)
  key = jax.random.key(cfg["seed"])
  metric, direction = _build.objective_metric(
      trainer["objective"], cfg["task"]["dataset"])
  manager = _checkpoint.checkpoint_manager(
      trainer["checkpoint_dir"] or run_dir / "checkpoints",
      save_every=trainer["checkpoint_every"],
      max_to_keep=trainer["max_to_keep"],
  )
  logger = selection = None
  try:
    state = _resume_state(
        manager, trainer["resume"], "trainer.resume",
        lambda: training.init_state(learner, tx, samplers.train, key))
    selection = _select.Selection(
        trainer["select"], metric, direction,
        pathlib.Path(manager.directory) / "best", resumed=state is not None)
    _write_json(run_dir / "config.json", cfg)
    logger = _logging.make_logger(
        cfg["logger"], run_dir=run_dir, name=_build.run_name(cfg),
        config=cfg, resume=trainer["resume"],
    )
    metrics_file = _MetricsFile(
        run_dir / "metrics.jsonl",
        None if state is None else int(state.step),
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
        callback=_make_callback(cfg, learner, samplers, manager, logger,
                                metrics_file, selection),
        progress=trainer["progress"],
        max_seconds=trainer.get("max_time_s"),
    )
    stopped_early = int(state.step) < trainer["num_steps"]
    if stopped_early:
      log.warning(
          "trainer.max_time_s=%s reached at meta-step %d of %d; the "
          "selection and test below are of the run so far "
          "(trainer.resume=true continues it)",
          trainer["max_time_s"], int(state.step), trainer["num_steps"])
      _checkpoint.save_state(manager, state, force=True)
    manager.wait_until_finished()
    results = {
        "name": _build.run_name(cfg),
        "seed": cfg["seed"],
        "steps": int(state.step),
        "num_steps": trainer["num_steps"],
        "stopped_by_time_limit": stopped_early,
        "train_seconds": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    if history:
      results.update({f"train/{k}": v for k, v in history[-1].items()
                      if k != "step"})
    results.update(_select_and_test(trainer, learner, samplers, state,
                                    selection, logger))
    _write_json(run_dir / "results.json", results)
    logger.summary(results)
    logger.finish(0)
    logger = None
    return results
  finally:
    if logger is not None:
      logger.finish(1)
    if selection is not None:
      selection.close()
    manager.wait_until_finished()
    manager.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """The metric records of a run (``<run_dir>/metrics.jsonl``), in order."""
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    steps: Sequence[int] | None = None,
    num_episodes: int | None = None,
    task: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
  """Evaluates the checkpoints of a finished (or stopped) run.

  The run is rebuilt from its ``config.json``; each checkpoint's
  meta-parameters are evaluated on the same fixed episodes as the run's
  own test (``trainer.eval_seed``; ``trainer.val_seed`` for
  ``split="val"``, as its validations). Use it for accuracy
  curves over meta-training, or to test a model on another episode shape
  (``task={"num_ways": 20}`` tests a ProtoNet trained for 5-way on 20-way
  episodes).

  Args:
    run_dir: the run directory (``config.json``, ``checkpoints/``).
    split: ``"test"``, ``"val"`` or ``"train"``.
    steps: which checkpoints; default all that are kept.
    num_episodes: episodes per checkpoint; default ``trainer.test_episodes``
      (600 in the benchmark rows).
    task: fields that replace the run's ``task`` fields (episode shape).
    progress: print a line per checkpoint.

  Returns:
    One dict per checkpoint, by step: ``step``, ``wall_s`` (from
    ``metrics.jsonl``, when it has the step) and the metrics of
    :func:`metalearn.training.evaluate` prefixed with ``<split>/``.

  Raises:
    FileNotFoundError: if the run has no config or no such checkpoint.
    ConfigError: if ``task`` makes the config invalid.
  """
  run_dir = pathlib.Path(run_dir)
  cfg = json.loads((run_dir / "config.json").read_text())
  if task:
    cfg["task"] = {**cfg["task"], **task}
  cfg = _build.validate_config(cfg)
  trainer = cfg["trainer"]
  if split not in ("train", "val", "test"):
    raise ValueError(f"split must be train, val or test, got {split!r}")
  samplers = _build.build_samplers(
      cfg["task"], _build.load_splits(cfg["task"]),
      paired=_build.uses_task_pairs(cfg),
  )
  sampler = getattr(samplers, split)
  learner = _build.build_learner(cfg)
  tx = _build.build_optimizer(cfg)
  like = training.init_state(learner, tx, samplers.train,
                             jax.random.key(cfg["seed"]))
  wall = {}
  if (run_dir / "metrics.jsonl").exists():
    wall = {r["step"]: r["wall_s"] for r in read_metrics(run_dir)}
  manager = _checkpoint.checkpoint_manager(
      trainer["checkpoint_dir"] or run_dir / "checkpoints",
      save_every=trainer["checkpoint_every"],
      max_to_keep=trainer["max_to_keep"],
  )
  try:
    kept = manager.all_steps()
    steps = sorted(kept) if steps is None else list(steps)
    missing = sorted(set(steps) - set(kept))
    if missing:
      raise FileNotFoundError(
          f"no checkpoint of steps {missing} in {manager.directory} (kept: "
          f"{sorted(kept)})"
      )
    rows = []
    for step in steps:
      state = _checkpoint.restore_state(manager, like, step)
      metrics = _evaluate(trainer, learner, state.meta_params, sampler,
                          num_episodes or trainer["test_episodes"], split)
      row = {"step": step, "wall_s": wall.get(step),
             **{f"{split}/{k}": v for k, v in metrics.items()}}
      if progress:
        value = row.get(f"{split}/outer/accuracy",
                        row.get(f"{split}/outer/loss"))
        print(f"{run_dir.name} step {step}: {value}", flush=True)
      rows.append(row)
    return rows
  finally:
    manager.close()


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
    # --config-name learned_optimizer: meta-train an optimiser on a family.
    from metalearn.experiment._lopt import run_learned_optimizer as run
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
