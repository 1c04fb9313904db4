"""A sweep as one program: the members of a ``population`` config.

``metalearn-train population.seeds=[0,1,2,3] population.inner_lr=[0.1,0.4]``
trains the 8 members of that grid (seeds x inner step sizes, and
``population.lr`` for the meta-optimizer's learning rate) as one jitted
computation (:func:`metalearn.training.meta_train_population`), and writes
each member as the run it stands for: ``<run_dir>/member_NNN/`` holds its
own ``config.json`` (the config its separate run would have: its seed and
step sizes, no ``population``), ``metrics.jsonl`` and ``results.json``, so
``benchmarks/reproduce.py``, :func:`~metalearn.experiment.read_metrics` and
wandb (one run per member) see ``N`` runs. ``<run_dir>/population.json``
lists the members with their validation and test figures.

Validation every ``trainer.eval_every`` steps and the final test evaluate
all members in one program as well
(:func:`metalearn.training.evaluate_population`). The stacked state is
checkpointed in ``<run_dir>/checkpoints``; ``trainer.resume=true``
continues it, bit for bit. A member whose loss turns non-finite stops
nothing: it is reported (``results.json`` with ``"status": "non-finite"``)
and not tested.
"""

import copy
import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import hydra.utils
import jax
import numpy as np
import orbax.checkpoint as ocp

from metalearn import training
from metalearn.experiment import (
    _build,
    _checkpoint,
    _config,
    _logging,
    _records,
    _select,
)
from metalearn.experiment._checks import ConfigError
from metalearn.experiment._config import is_population
from metalearn.experiment._run import _samplers

log = logging.getLogger("metalearn.experiment")

FIELDS = ("seeds", "inner_lr", "lr", "member_map")
__all__ = ("is_population", "member_configs", "run_population")
MEMBER_MAPS = ("auto", "map", "vmap")


def _values(pop, name, kind):
  values = pop.get(name)
  if values is None:
    return None
  if not isinstance(values, (list, tuple)) or not values:
    raise ConfigError(
        f"population.{name} must be a non-empty list, got {values!r}")
  for v in values:
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
      raise ConfigError(f"population.{name} must hold ints, got {v!r}")
    if kind is float and (isinstance(v, bool) or
                          not isinstance(v, (int, float)) or not v > 0):
      raise ConfigError(
          f"population.{name} must hold numbers > 0, got {v!r}")
  return list(values)


def member_configs(
    config: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], training.Population]:
  """The members' own configs and the population they form.

  Member configs are the grid of ``population.seeds`` (default: ``seed``)
  x ``population.inner_lr`` (``learner.inner_lr``) x ``population.lr``
  (``optimizer.learning_rate``), seeds varying fastest
  (:func:`metalearn.training.grid`); each is validated as a run of its own.

  Raises:
    ConfigError: naming the field, for a bad ``population`` or a
      setting populations do not support.
  """
  cfg = _config.validate_config(config)
  pop = cfg.get("population")
  if not isinstance(pop, Mapping):
    raise ConfigError(f"population must be a mapping, got {pop!r}")
  unknown = sorted(set(pop) - set(FIELDS))
  if unknown:
    raise ConfigError(
        f"population.{unknown[0]} is not a field of population (its "
        f"fields: {', '.join(FIELDS)})")
  member_map = pop.get("member_map") or "auto"
  if member_map not in MEMBER_MAPS:
    raise ConfigError(
        f"population.member_map must be one of {MEMBER_MAPS}, got "
        f"{member_map!r}")
  seeds = _values(pop, "seeds", int) or [cfg["seed"]]
  axes = {}
  inner_lr = _values(pop, "inner_lr", float)
  if inner_lr is not None:
    if "inner_lr" not in cfg["learner"]:
      raise ConfigError(
          f"population.inner_lr sweeps learner.inner_lr, which learner "
          f"{_config.learner_name(cfg)} does not have")
    axes["inner_lr"] = inner_lr
  lr = _values(pop, "lr", float)
  if lr is not None:
    if not isinstance(cfg["optimizer"].get("learning_rate"), (int, float)):
      raise ConfigError(
          "population.lr sweeps optimizer.learning_rate, which must then "
          "be a number (not a schedule)")
    axes["lr"] = lr
  trainer = cfg["trainer"]
  if trainer["select"] != "last":
    raise ConfigError(
        f"trainer.select={trainer['select']} is not supported with a "
        "population (each member is tested at its last step); use "
        "trainer.select=last")
  if trainer.get("devices") is not None:
    raise ConfigError(
        "trainer.devices shards one run's tasks; a population maps its "
        "members on one device instead: set trainer.devices=null")
  # The grid, seeds varying fastest, then the axes in order (as
  # training.grid orders it), with the config's own (float64) values.
  rows = [{"seed": seed} for seed in seeds]
  for name, values in axes.items():
    rows = [{**row, name: v} for v in values for row in rows]
  population = training.make_population(
      [r["seed"] for r in rows], {n: [r[n] for r in rows] for n in axes})
  members = []
  for row in rows:
    member = copy.deepcopy(cfg)
    member["population"] = {"seeds": None, "inner_lr": None, "lr": None,
                            "member_map": "auto"}
    member["seed"] = row["seed"]
    if "inner_lr" in row:
      member["learner"]["inner_lr"] = row["inner_lr"]
    if "lr" in row:
      member["optimizer"]["learning_rate"] = row["lr"]
    members.append(_config.validate_config(member))
  return members, population


def _member_factory(cfg: Mapping[str, Any]):
  """``make_member(hparams) -> (learner, meta_optimizer)`` whose swept
  values (``inner_lr``, ``lr``) may be traced."""
  learner = hydra.utils.instantiate(cfg["learner"], _partial_=True,
                                    _convert_="all")
  optimizer = hydra.utils.instantiate(cfg["optimizer"], _partial_=True,
                                      _convert_="all")

  def make_member(hparams):
    kwargs = {"inner_lr": hparams["inner_lr"]} if "inner_lr" in hparams else {}
    opt_kwargs = ({"learning_rate": hparams["lr"]} if "lr" in hparams
                  else {})
    return learner(**kwargs), optimizer(**opt_kwargs)

  return make_member


def _save(manager, states, *, force):
  step = int(np.asarray(states.step).max())
  if step in manager.all_steps():
    return
  host = jax.tree.map(lambda x: np.array(x, copy=True), states)
  manager.save(step, args=ocp.args.StandardSave(host), force=force)


def run_population(
    config: Mapping[str, Any], run_dir: str | pathlib.Path
) -> dict[str, Any]:
  """Meta-trains, validates and tests every member of a population.

  Args:
    config: a composed config with a ``population`` group.
    run_dir: the population's directory (members in ``member_NNN/``).

  Returns:
    The population's summary (also ``<run_dir>/population.json``):
    ``members`` (each member's ``run_dir``, ``seed``, hyper-parameters,
    ``status``, ``objective_value`` and ``test/*``), ``objective_value``
    (the best member's, for sweepers), ``train_seconds``.

  Raises:
    ConfigError: for a bad config, naming the field.
  """
  cfg = _config.validate_config(config)
  members, population = member_configs(cfg)
  trainer = cfg["trainer"]
  if trainer.get("init_from") or (cfg["learner"].get("kd_weight") or 0) > 0:
    raise ConfigError(
        "trainer.init_from (and self-distillation, learner.kd_weight > 0, "
        "whose teacher it loads) is not supported with a population: run "
        "the members separately (metalearn-train -m) to start them from a "
        "checkpoint")
  member_map = cfg["population"].get("member_map") or "auto"
  for member in members:  # Each member's own checks, with its values.
    _build.check_head(_build.build_learner(member), member)
    _build.build_optimizer(member)
  make_member = _member_factory(members[0])
  try:
    training.check_members(make_member, population)
  except ValueError as e:
    raise ConfigError(f"population: {e}") from e
  learner0 = _build.build_learner(members[0])
  samplers = _samplers(members[0], learner0)
  run_dir = pathlib.Path(run_dir)
  dirs = [run_dir / f"member_{i:03d}" for i in range(population.size)]
  for d, member in zip(dirs, members, strict=True):
    d.mkdir(parents=True, exist_ok=True)
    _records.write_json(d / "config.json", member)
  metric, direction = _config.objective_metric(
      trainer["objective"], _config.is_regression(cfg["task"]))
  manager = _checkpoint.checkpoint_manager(
      trainer["checkpoint_dir"] or run_dir / "checkpoints",
      save_every=trainer["checkpoint_every"],
      max_to_keep=trainer["max_to_keep"],
  )

  def fresh():
    return training.init_population(make_member, samplers.train, population)

  loggers = []
  try:
    states = _records.resume_state(manager, trainer["resume"],
                                   "trainer.resume", fresh)
    resume_step = None if states is None else int(
        np.asarray(states.step).max())
    files = [_records.MetricsFile(d / "metrics.jsonl", resume_step)
             for d in dirs]
    if cfg["logger"]["kind"] == "wandb":
      loggers = [
          _logging.make_logger(
              cfg["logger"], run_dir=d, name=_member_name(member, i),
              config=member, resume=trainer["resume"])
          for i, (d, member) in enumerate(zip(dirs, members, strict=True))
      ]
    last_val: dict[int, list[dict[str, float]]] = {}

    def evaluate(states_, sampler, episodes, split):
      return training.evaluate_population(
          make_member, states_.meta_params, population, sampler,
          jax.random.key(_select.eval_seed(trainer, split)),
          num_episodes=episodes, batch_size=trainer["eval_batch_size"],
          task_map=trainer["task_map"], member_map=member_map)

    def callback(states_, metrics):
      step = int(metrics["step"])
      val = None
      if trainer["eval_every"] and step % trainer["eval_every"] == 0:
        val = evaluate(states_, samplers.val, trainer["val_episodes"], "val")
        last_val.clear()
        last_val[step] = val
      for i in range(population.size):
        row = {k: float(v[i]) for k, v in metrics.items()
               if k not in ("step", "tasks_per_sec")}
        row["tasks_per_sec"] = metrics["tasks_per_sec"] / population.size
        if val is not None:
          row.update({f"val/{k}": v for k, v in val[i].items()})
        files[i].write(step, row)
        if loggers:
          loggers[i].log(row, step)
      best = _best(val, metric, direction) if val is not None else None
      log.info("population step %d: %d/%d members finite%s, %.3g tasks/s",
               step, int(metrics["member_finite"].sum()), population.size,
               "" if best is None else f", best val {best[1]:.4g} "
               f"(member {best[0]})", metrics["tasks_per_sec"])
      _save(manager, states_, force=step == trainer["num_steps"])

    start = time.perf_counter()
    states, history = training.meta_train_population(
        make_member, samplers.train, population,
        num_steps=trainer["num_steps"],
        meta_batch_size=trainer["meta_batch_size"], states=states,
        steps_per_call=trainer["steps_per_call"],
        task_map=trainer["task_map"], member_map=member_map,
        log_every=trainer["log_every"], callback=callback,
        progress=trainer["progress"],
    )
    train_seconds = time.perf_counter() - start
    manager.wait_until_finished()
    step = int(np.asarray(states.step).max())
    finite = (history[-1]["member_finite"].astype(bool) if history
              else np.ones(population.size, bool))
    val = last_val.get(step) or evaluate(
        states, samplers.val, trainer["val_episodes"], "val")
    test = (evaluate(states, samplers.test, trainer["test_episodes"], "test")
            if trainer["test_episodes"] else None)
    rows = []
    for i, member in enumerate(members):
      results = {
          "name": _member_name(member, i),
          "seed": member["seed"],
          "hparams": _hparams(member, population),
          "population": {"index": i, "size": population.size,
                         "run_dir": str(run_dir)},
          "steps": step,
          "num_steps": trainer["num_steps"],
          "stopped_by_time_limit": False,
          "train_seconds": train_seconds,
          "run_dir": str(dirs[i]),
          "select": "last",
          "tested_step": step,
          "objective": metric,
          "transductive": learner0.transductive,
      }
      if history:
        results.update({f"train/{k}": float(v[i]) if np.ndim(v) else v
                        for k, v in history[-1].items() if k != "step"})
      if not finite[i]:
        results["status"] = "non-finite"
        log.warning("population member %d (%s) has a non-finite loss; it "
                    "is not tested", i, _hparams(member, population))
      else:
        results["status"] = "ok"
        results["objective_value"] = val[i][metric.removeprefix("val/")]
        if test is not None:
          results.update({f"test/{k}": v for k, v in test[i].items()})
      _records.write_json(dirs[i] / "results.json", results)
      if loggers:
        loggers[i].summary(results)
      rows.append(results)
    for lg in loggers:
      lg.finish(0)
    loggers = []
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {
        "name": _config.run_name(cfg),
        "size": population.size,
        "member_map": member_map,
        "train_seconds": train_seconds,
        "objective": metric,
        "objective_value": (
            (max if direction == "maximize" else min)(
                r["objective_value"] for r in ok) if ok else None),
        "members": [
            {k: r.get(k) for k in ("run_dir", "seed", "hparams", "status",
                                   "objective_value",
                                   "test/outer/accuracy",
                                   "test/outer/accuracy_ci95",
                                   "test/outer/loss")}
            for r in rows
        ],
    }
    _records.write_json(run_dir / "population.json", summary)
    return summary
  finally:
    for lg in loggers:
      lg.finish(1)
    manager.wait_until_finished()
    manager.close()


def _hparams(member: Mapping[str, Any], population) -> dict[str, float]:
  """A member's swept values, as its config has them."""
  out = {}
  if "inner_lr" in population.hparams:
    out["inner_lr"] = member["learner"]["inner_lr"]
  if "lr" in population.hparams:
    out["lr"] = member["optimizer"]["learning_rate"]
  return out


def _member_name(member: Mapping[str, Any], i: int) -> str:
  return f"{_config.run_name(member)}_m{i:03d}"


def _best(val, metric, direction):
  """``(member, value)`` of the best finite validation value."""
  name = metric.removeprefix("val/")
  values = [(i, v[name]) for i, v in enumerate(val) if np.isfinite(v[name])]
  if not values:
    return None
  pick = max if direction == "maximize" else min
  return pick(values, key=lambda t: t[1])
