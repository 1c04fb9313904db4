"""One experiment: data, learner, meta-training with checkpoints, test."""

import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from metalearn import training
from metalearn.experiment import (
  _build,
  _checkpoint,
  _config,
  _init_from,
  _logging,
  _records,
  _select,
  _tasksets,
)
from metalearn.experiment._checks import ConfigError

log = logging.getLogger("metalearn.experiment")


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


def _samplers(cfg, learner) -> _tasksets.Samplers:
  """The task samplers of a validated config, loading its dataset; the
  meta-training tasks are augmented (``augment``, never validation or test)
  and drawn as the learner asks (``train_sampler``, e.g. MLTI's pairs of
  augmented tasks)."""
  augment, own = _build.build_augmentation(cfg), learner.train_sampler
  if own is not None:
    own = _config_errors(own)
  wrap = own
  if augment is not None:
    wrap = augment if own is None else (
        lambda sampler: own(augment(sampler)))
  return _tasksets.build_samplers(cfg["task"], train_sampler=wrap)


def _config_errors(train_sampler):
  """A learner's ``train_sampler`` whose argument checks (its
  ``ValueError``s, such as a ``learner.num_classes`` below the pool's
  classes) are config errors."""

  def draw(sampler):
    try:
      return train_sampler(sampler)
    except ValueError as e:
      raise ConfigError(str(e)) from e

  return draw


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


def _pretrained_state(cfg, learner, tx, samplers, key):
  """The fresh state :func:`~metalearn.training.meta_train` would build,
  with the network of ``trainer.init_from`` loaded into it."""
  state = training.init_state(learner, tx, samplers.train,
                              jax.random.split(key)[0])
  net = _build.instantiate(cfg["model"], "model")
  example = jax.eval_shape(samplers.test.sample, jax.random.key(0),
                           samplers.test.data)
  x = jax.ShapeDtypeStruct(example.support_x.shape, example.support_x.dtype)
  modules = frozenset(jax.eval_shape(net.init, jax.random.key(0), x))
  return state._replace(meta_params=_init_from.load_network(
      state.meta_params, cfg["trainer"]["init_from"], modules))


def run_experiment(
    config: Mapping[str, Any], run_dir: str | os.PathLike
) -> dict[str, Any]:
  """Runs one experiment from its config: meta-train, checkpoint, test.

  The steps: validate the whole config (no data read, nothing compiled);
  build the learner, checking what it needs of the model and task (a head
  with one output per way), and the meta-optimizer; load the dataset and
  check the episodes fit it (meta-training tasks drawn as the learner
  asks, ``MetaLearner.train_sampler``); meta-train with
  :func:`metalearn.training.meta_train`, logging every
  ``trainer.log_every`` steps and checkpointing every
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
  cfg = _config.validate_config(config)
  if _config.is_population(cfg):
    raise ConfigError(
        "population.seeds, population.inner_lr or population.lr is set: "
        "run it with run_population (metalearn-train does)")
  trainer = cfg["trainer"]
  if trainer["eval_every"] and "val" in cfg["task"].get("train_splits", ()):
    log.warning(
        "task.train_splits includes val: the validation metrics every "
        "trainer.eval_every steps are of classes meta-trained on, not "
        "held out")
  learner = _build.build_learner(cfg)
  tx = _build.build_optimizer(cfg)
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  samplers = _samplers(cfg, learner)
  key = jax.random.key(cfg["seed"])
  metric, direction = _config.objective_metric(
      trainer["objective"], _config.is_regression(cfg["task"]))
  manager = _checkpoint.checkpoint_manager(
      trainer["checkpoint_dir"] or run_dir / "checkpoints",
      save_every=trainer["checkpoint_every"],
      max_to_keep=trainer["max_to_keep"],
  )
  logger = selection = None
  try:
    state = _records.resume_state(
        manager, trainer["resume"], "trainer.resume",
        lambda: training.init_state(learner, tx, samplers.train, key))
    if state is None and trainer.get("init_from"):
      state = _pretrained_state(cfg, learner, tx, samplers, key)
    elif state is None and _init_from.has_teacher(jax.eval_shape(
        lambda k: training.init_state(learner, tx, samplers.train, k),
        key).meta_params):
      raise ConfigError(
          "trainer.init_from is required: the learner distils "
          "(learner.kd_weight > 0) from a teacher, the network of a "
          "previous run (e.g. experiment=omniglot_5w1s_rfs)")
    selection = _select.Selection(
        trainer["select"], metric, direction,
        pathlib.Path(manager.directory) / "best", resumed=state is not None)
    _records.write_json(run_dir / "config.json", cfg)
    logger = _logging.make_logger(
        cfg["logger"], run_dir=run_dir, name=_config.run_name(cfg),
        config=cfg, resume=trainer["resume"],
    )
    metrics_file = _records.MetricsFile(
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
    if not trainer["num_steps"]:  # Nothing trained: keep what is tested.
      _checkpoint.save_state(manager, state, force=True)
    if stopped_early:
      log.warning(
          "trainer.max_time_s=%s reached at meta-step %d of %d; the "
          "selection and test below are of the run so far "
          "(trainer.resume=true continues it)",
          trainer["max_time_s"], int(state.step), trainer["num_steps"])
      _checkpoint.save_state(manager, state, force=True)
    manager.wait_until_finished()
    results = {
        "name": _config.run_name(cfg),
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
    _records.write_json(run_dir / "results.json", results)
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
  cfg = _config.validate_config(cfg)
  trainer = cfg["trainer"]
  if split not in ("train", "val", "test"):
    raise ValueError(f"split must be train, val or test, got {split!r}")
  learner = _build.build_learner(cfg)
  tx = _build.build_optimizer(cfg)
  samplers = _samplers(cfg, learner)
  sampler = getattr(samplers, split)
  like = training.init_state(learner, tx, samplers.train,
                             jax.random.key(cfg["seed"]))
  wall = {}
  if (run_dir / "metrics.jsonl").exists():
    wall = {r["step"]: r["wall_s"] for r in _records.read_metrics(run_dir)}
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
