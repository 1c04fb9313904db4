"""Meta-training a learned optimiser on a task family, from a config.

The second use of :mod:`metalearn.learned_optimizers` (the first is a
few-shot learner, ``learner=metalstm`` or ``learner=lopt``):
``metalearn-train --config-name learned_optimizer`` meta-trains the
optimiser over long inner horizons with truncated backprop, PES or
bootstrapped meta-gradients (BMG), then runs it against Adam and SGD, each
with its learning rate tuned on training tasks, on held-out tasks (tasks
of the test split).
"""

import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import optax

from metalearn import learned_optimizers as lo
from metalearn.experiment import (
    _build,
    _checkpoint,
    _config,
    _logging,
    _records,
    _tasksets,
)
from metalearn.experiment import _checks as checks
from metalearn.experiment._checks import ConfigError

log = logging.getLogger("metalearn.experiment")



def validate_lopt_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Checks a ``learned_optimizer`` config; returns its plain form.

  Raises:
    ConfigError: on the first bad field, naming it.
  """
  cfg = checks.to_plain(config)
  if not checks.is_int(checks.get(cfg, "seed")):
    raise ConfigError(f"seed must be an int, got {cfg['seed']!r}")
  _tasksets.validate_task(cfg)
  for group in ("model", "learned_optimizer"):
    checks.target(cfg, group)
  checks.one_of(cfg, "outer.estimator", lo.ESTIMATORS)
  for field in ("horizon", "truncation", "num_steps", "steps_per_call",
                "log_every", "pes_pairs", "tbptt_particles",
                "bmg_particles", "checkpoint_every", "max_to_keep"):
    checks.int_at_least(cfg, f"outer.{field}", 1)
  _check_bmg(cfg)
  checks.multiple_of(cfg, "outer.horizon", "outer.truncation")
  checks.multiple_of(cfg, "outer.log_every", "outer.steps_per_call")
  checks.multiple_of(cfg, "outer.num_steps", "outer.log_every")
  checks.multiple_of(cfg, "outer.checkpoint_every", "outer.log_every")
  checks.boolean(cfg, "outer.resume")
  for field in ("meta_lr", "sigma", "clip_norm"):
    checks.positive_number(f"outer.{field}", checks.get(cfg, f"outer.{field}"))
  batch = checks.get(cfg, "family.batch_size")
  if batch is not None:
    checks.int_at_least(cfg, "family.batch_size", 1)
  for field in ("tune_tasks", "eval_tasks"):
    checks.int_at_least(cfg, f"eval.{field}", 1)
  lrs = checks.get(cfg, "eval.learning_rates")
  if not isinstance(lrs, list) or not lrs:
    raise ConfigError(
        f"eval.learning_rates must be a non-empty list, got {lrs!r}")
  for i, lr in enumerate(lrs):
    checks.positive_number(f"eval.learning_rates[{i}]", lr)
  checks.one_of(cfg, "logger.kind", _config.LOGGERS)
  return cfg


def _check_bmg(cfg):
  steps = checks.int_at_least(cfg, "outer.bmg_steps", 0)
  target_lr = checks.get(cfg, "outer.bmg_target_lr")
  if target_lr is not None and (
      isinstance(target_lr, bool) or not isinstance(target_lr, (int, float))
      or not target_lr >= 0):
    raise ConfigError(f"outer.bmg_target_lr must be null or a number >= 0, "
                      f"got {target_lr!r}")
  if steps == 0 and not target_lr:
    raise ConfigError("outer.bmg_steps=0 needs outer.bmg_target_lr > 0 (the "
                      "bootstrapped target would be x_K itself)")


def _estimator(cfg, family, lopt):
  outer = cfg["outer"]
  unroll = lo.truncated_unroll(
      family, lopt, truncation_length=outer["truncation"],
      horizon=outer["horizon"], log_loss=True,
  )
  return lo.make_estimator(
      outer["estimator"], unroll, pes_pairs=outer["pes_pairs"],
      sigma=outer["sigma"], tbptt_particles=outer["tbptt_particles"],
      bmg_particles=outer["bmg_particles"], bmg_steps=outer["bmg_steps"],
      bmg_target_lr=outer["bmg_target_lr"])


def _plot(summaries: Mapping[str, Mapping[str, Any]], path: pathlib.Path,
          title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, curve in zip(axes, ("curve_train", "curve_held_out"), strict=True):
    for name, summary in summaries.items():
      ax.plot(summary[curve], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_title(curve.removeprefix("curve_").replace("_", "-") + " loss")
  axes[0].set_ylabel("geometric-mean loss over held-out tasks")
  axes[0].legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_learned_optimizer(
    config: Mapping[str, Any], run_dir: str | os.PathLike
) -> dict[str, Any]:
  """Meta-trains a learned optimiser, then compares it on held-out tasks.

  The task family trains a fresh ``model`` on the support set of one
  episode of the ``task`` (its training split) for ``outer.horizon``
  steps (minibatches of ``family.batch_size``); the meta-objective is the
  mean log training loss over truncations of ``outer.truncation`` steps,
  its gradient estimated by ``outer.estimator`` (``pes``, ``tbptt`` or
  ``bmg``: :func:`~metalearn.learned_optimizers.bootstrapped` with
  ``outer.bmg_particles`` particles, targets ``outer.bmg_steps`` steps
  past each truncation and a final gradient step of
  ``outer.bmg_target_lr``, or none if null).
  After ``outer.num_steps`` outer steps (Adam, gradients clipped), the
  learned optimiser, and Adam and SGD with the learning rate of
  ``eval.learning_rates`` that trains ``eval.tune_tasks`` training tasks
  best, each train ``eval.eval_tasks`` held-out tasks drawn from the test
  split (the same tasks for all three).

  Writes ``<run_dir>/metrics.jsonl`` (outer metrics every
  ``outer.log_every`` steps), ``curves.png`` (loss against inner step),
  ``results.json``; logs the same to the logger (wandb: metrics, the
  curves as line plots and the PNG). The outer state (theta, the
  meta-optimiser's state and the estimator's particles) is checkpointed
  in ``<run_dir>/checkpoints`` every ``outer.checkpoint_every`` steps and
  at the end; ``outer.resume=true`` continues from the latest one and
  ends with the same theta and results as a run never stopped (outer step
  ``t`` draws from ``fold_in(key, t)``).

  Returns:
    ``results``: per optimiser ``final_train``, ``final_held_out``,
    ``mean_train``; the tuned learning rates; ``verdict``; timings.
  """
  cfg = validate_lopt_config(config)
  outer, ev = cfg["outer"], cfg["eval"]
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  samplers = _tasksets.build_samplers(cfg["task"])
  model = _build.instantiate(cfg["model"], "model")
  lopt = _build.instantiate(cfg["learned_optimizer"], "learned_optimizer")
  if not isinstance(lopt, lo.LearnedOptimizer):
    raise ConfigError(
        f"learned_optimizer._target_={cfg['learned_optimizer']['_target_']!r}"
        f" returned a {type(lopt).__name__}, not a LearnedOptimizer")
  batch = cfg["family"]["batch_size"]
  family = lo.model_task_family(model, samplers.train, batch_size=batch)
  held_out = lo.model_task_family(model, samplers.test, batch_size=batch)
  estimator = _estimator(cfg, family, lopt)
  tx = optax.chain(optax.clip_by_global_norm(outer["clip_norm"]),
                   optax.adam(outer["meta_lr"]))
  step = lo.make_outer_step(estimator, tx,
                            steps_per_call=outer["steps_per_call"])
  key = jax.random.key(cfg["seed"])
  train_key, tune_key, eval_key = (jax.random.fold_in(key, i)
                                   for i in range(3))
  (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
  name = cfg.get("name") or f"lopt_{outer['estimator']}"
  logger = _logging.make_logger(cfg["logger"], run_dir=run_dir, name=name,
                                config=cfg)
  manager = _checkpoint.checkpoint_manager(
      run_dir / "checkpoints", save_every=outer["checkpoint_every"],
      max_to_keep=outer["max_to_keep"])
  ok = False
  try:
    start = time.perf_counter()
    state = lo.init_outer_state(lopt, estimator, tx, train_key, family.data)
    resumed = _records.resume_state(manager, outer["resume"], "outer.resume",
                                    lambda: state)
    state = state if resumed is None else resumed
    first = int(state.step)
    metrics_file = _records.MetricsFile(run_dir / "metrics.jsonl",
                                        first if outer["resume"] else None)
    for target in range(first + outer["log_every"], outer["num_steps"] + 1,
                        outer["log_every"]):
      state, history = lo.outer_train(step, state, key=train_key,
                                      num_steps=target, data=family.data)
      last = {k: v for k, v in history[-1].items() if k != "step"}
      logger.log({f"outer/{k}": v for k, v in last.items()}, target)
      metrics_file.write(target, last)
      _checkpoint.save_state(manager, state,
                             force=target == outer["num_steps"])
    manager.wait_until_finished()
    train_seconds = time.perf_counter() - start
    curves = lo.loss_curves(lopt, num_steps=outer["horizon"])
    tuned, table = lo.tune_learning_rates(
        curves, family, jax.random.split(tune_key, ev["tune_tasks"]),
        ev["learning_rates"])
    keys = jax.random.split(eval_key, ev["eval_tasks"])
    runs = {**{k: (k, lr) for k, lr in tuned.items()},
            "learned": ("learned", state.theta)}
    summaries = lo.compare(curves, runs, held_out, keys)
    results = {
        "name": name, "seed": cfg["seed"], "outer_steps": int(state.step),
        "estimator": outer["estimator"], "train_seconds": train_seconds,
        "tuned_learning_rates": tuned,
        "tuning_final_train": {k: {str(lr): v for lr, v in t.items()}
                               for k, t in table.items()},
        "verdict": lo.verdict(summaries),
        **{f"{label}/{m}": s[m] for label, s in summaries.items()
           for m in ("final_train", "final_held_out", "mean_train")},
    }
    png = run_dir / "curves.png"
    _plot(summaries, png,
          f"{name}: {results['verdict']} (Adam lr {tuned['adam']:g}, SGD lr "
          f"{tuned['sgd']:g}; {ev['eval_tasks']} held-out tasks)")
    logger.curves(
        "held_out_loss",
        {label: s["curve_held_out"] for label, s in summaries.items()},
        png,
    )
    (run_dir / "curves.json").write_text(json.dumps(summaries))
    (run_dir / "results.json").write_text(
        json.dumps(results, indent=2, sort_keys=True))
    logger.summary(results)
    log.info("%s", results["verdict"])
    ok = True
    return results
  finally:
    manager.close()
    logger.finish(0 if ok else 1)
