"""Checking a whole run config, and the names and objective it implies.

:func:`validate_config` checks every field of a ``train.yaml`` config
before anything is built, loaded or compiled, and returns its plain form.
The task fields are checked by the dataset registry of
:mod:`metalearn.tasks` (``check_taskset_args``); what a learner needs of
the model and the task (a head with one output per way) is checked when
it is built (``build_learner``), still before any data are read. The
``augment`` fields are checked by building their transforms
(:func:`metalearn.tasks.augmentation`), which compiles nothing.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from omegaconf import DictConfig

from metalearn import models, tasks
from metalearn.experiment import _checks as checks
from metalearn.experiment import _tasksets
from metalearn.experiment._checks import ConfigError

TASK_MAPS = ("auto", "vmap", "scan")
LOGGERS = ("wandb", "none")
SELECTS = ("last", "best_val")
OBJECTIVES = ("auto", "val_accuracy", "val_loss")
# The fields of the augment group: apply_to, then the arguments of
# metalearn.tasks.augmentation (each transform null or its factory's
# arguments).
AUGMENT_TRANSFORMS = ("affine", "crop", "flip", "color")
AUGMENT_FIELDS = ("apply_to", *AUGMENT_TRANSFORMS)


def learner_name(cfg: Mapping[str, Any]) -> str:
  """A short name for the learner: its factory, ``fo`` for first order.

  Examples:
    >>> learner_name({"learner": {"_target_": "metalearn.metalearners.maml",
    ...                           "first_order": True}})
    'fomaml'
  """
  learner = cfg["learner"]
  name = str(learner.get("_target_", "learner")).rsplit(".", 1)[-1]
  return f"fo{name}" if learner.get("first_order") is True else name


def run_name(cfg: Mapping[str, Any]) -> str:
  """``cfg["name"]``, else ``<task>_<learner>``."""
  return cfg.get("name") or f"{cfg['task'].get('name', 'task')}_" + (
      learner_name(cfg)
  )


def is_regression(task: Mapping[str, Any]) -> bool:
  """Whether a validated task is regression: it has no ways (classes)."""
  return task.get("num_ways") is None


def objective_metric(objective: str, regression: bool) -> tuple[str, str]:
  """The validation metric that ``trainer.objective`` names, and its sense.

  Args:
    objective: ``"auto"``, ``"val_accuracy"`` or ``"val_loss"``.
    regression: whether the task is regression (``task.num_ways`` null,
      :func:`is_regression`); ``auto`` is the accuracy for classification
      and the loss (mean squared error) for regression.

  Returns:
    ``("val/outer/accuracy", "maximize")`` or
    ``("val/outer/loss", "minimize")``.

  Examples:
    >>> objective_metric("auto", regression=False)
    ('val/outer/accuracy', 'maximize')
    >>> objective_metric("auto", regression=True)
    ('val/outer/loss', 'minimize')
  """
  if objective == "auto":
    objective = "val_loss" if regression else "val_accuracy"
  if objective == "val_accuracy":
    return "val/outer/accuracy", "maximize"
  if objective == "val_loss":
    return "val/outer/loss", "minimize"
  raise ValueError(
      f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
  )


def _validate_model(cfg) -> None:
  """The network's sizes, which its factory would reject (or divide by)
  only after the data are loaded."""
  model = cfg["model"]
  if "features" in model:
    checks.int_at_least(cfg, "model.features", 1)
  if "norm" in model:
    checks.one_of(cfg, "model.norm", models.NORMS)
  for field in ("hidden", "widths"):
    sizes = model.get(field)
    if sizes is not None and (
        not isinstance(sizes, Sequence)
        or isinstance(sizes, str)
        or not all(checks.is_int(n) and n >= 1 for n in sizes)
    ):
      raise ConfigError(
          f"model.{field} must be a list of ints >= 1, got {sizes!r}"
      )


def _validate_rates(cfg) -> None:
  learner = cfg["learner"]
  for field in ("inner_lr", "eval_inner_lr"):
    if learner.get(field) is not None:
      checks.positive_number(f"learner.{field}", learner[field])
  for field in ("num_inner_steps", "eval_num_inner_steps"):
    if learner.get(field) is not None:
      checks.int_at_least(cfg, f"learner.{field}", 0)
  if "first_order" in learner:
    checks.boolean(cfg, "learner.first_order")
  remat = learner.get("remat", False)
  if not (isinstance(remat, bool) or remat == "nested"):
    raise ConfigError(
        f"learner.remat must be false, true or nested, got {remat!r}")
  rate = cfg["optimizer"].get("learning_rate")
  if isinstance(rate, Mapping):
    # A schedule: check its starting value where it has one.
    for field in ("init_value", "value", "peak_value"):
      if field in rate:
        checks.positive_number(f"optimizer.learning_rate.{field}", rate[field])
  elif rate is not None:
    checks.positive_number("optimizer.learning_rate", rate)


def _validate_trainer(cfg) -> None:
  for field in (
      "meta_batch_size", "steps_per_call", "log_every",
      "checkpoint_every", "max_to_keep", "eval_batch_size",
  ):
    checks.int_at_least(cfg, f"trainer.{field}", 1)
  # 0: validate and test the initial (or trainer.init_from) state.
  for field in ("num_steps", "eval_every", "test_episodes"):
    checks.int_at_least(cfg, f"trainer.{field}", 0)
  if checks.get(cfg, "trainer.eval_every"):
    checks.int_at_least(cfg, "trainer.val_episodes", 1)
    checks.multiple_of(cfg, "trainer.eval_every", "trainer.log_every")
  checks.multiple_of(cfg, "trainer.log_every", "trainer.steps_per_call")
  checks.multiple_of(cfg, "trainer.checkpoint_every", "trainer.log_every")
  checks.one_of(cfg, "trainer.task_map", TASK_MAPS)
  devices = cfg["trainer"].get("devices")
  if devices is not None and devices != "all":
    checks.int_at_least(cfg, "trainer.devices", 1)
    available = jax.device_count()
    if devices > available:
      raise ConfigError(
          f"trainer.devices={devices} exceeds the {available} available "
          f"{jax.default_backend()} device(s): use trainer.devices=all or a "
          f"count up to {available}"
      )
  checks.boolean(cfg, "trainer.resume")
  checks.boolean(cfg, "trainer.progress")
  max_time = cfg["trainer"].get("max_time_s")
  if max_time is not None:
    checks.positive_number("trainer.max_time_s", max_time)
  if not checks.is_int(checks.get(cfg, "trainer.eval_seed")):
    raise ConfigError(
        f"trainer.eval_seed must be an int, got {cfg['trainer']['eval_seed']!r}"
    )
  ckpt = checks.get(cfg, "trainer.checkpoint_dir")
  if ckpt is not None and not isinstance(ckpt, str):
    raise ConfigError(f"trainer.checkpoint_dir must be a path, got {ckpt!r}")
  init_from = cfg["trainer"].get("init_from")
  if init_from is not None and not isinstance(init_from, str):
    raise ConfigError(
        f"trainer.init_from must be a run or checkpoint directory, got "
        f"{init_from!r}")


def _validate_selection(cfg) -> None:
  """The validation fields: its key, the checkpoint tested, the objective.

  A config written before these fields existed (a run's ``config.json``)
  gets their defaults.
  """
  trainer = cfg["trainer"]
  for field, default in (
      ("val_seed", None), ("select", "last"), ("objective", "auto"),
  ):
    trainer.setdefault(field, default)
  checks.int_at_least(cfg, "trainer.val_episodes", 1)
  val_seed = trainer["val_seed"]
  if val_seed is not None and (
      not checks.is_int(val_seed) or val_seed == trainer["eval_seed"]
  ):
    raise ConfigError(
        "trainer.val_seed must be null or an int other than "
        f"trainer.eval_seed={trainer['eval_seed']} (validation never draws "
        f"the test episodes), got {val_seed!r}"
    )
  if checks.one_of(cfg, "trainer.select", SELECTS) == "best_val" and not (
      trainer["eval_every"]
  ):
    raise ConfigError(
        "trainer.select=best_val picks among the validations during "
        "training, but trainer.eval_every=0 runs none: set "
        "trainer.eval_every > 0"
    )
  objective = checks.one_of(cfg, "trainer.objective", OBJECTIVES)
  if objective == "val_accuracy" and is_regression(cfg["task"]):
    raise ConfigError(
        f"trainer.objective=val_accuracy, but the {cfg['task']['dataset']} "
        "regression task has no accuracy: use val_loss (or auto)"
    )


def augment_args(augment: Mapping[str, Any]) -> dict[str, Any]:
  """The arguments of :func:`metalearn.tasks.augmentation` of an
  ``augment`` node (its transforms, without ``apply_to``)."""
  return {k: augment.get(k) for k in AUGMENT_TRANSFORMS}


def _validate_augment(cfg) -> None:
  """The ``augment`` group: its fields, and that it augments images.

  A config written before the group existed (a run's ``config.json``)
  gets ``augment=none``. The transforms are built here (host closures,
  nothing compiled) so that a bad argument fails before data are loaded.
  """
  augment = cfg.setdefault("augment", {})
  if not isinstance(augment, Mapping):
    raise ConfigError(
        f"augment must be a mapping of {', '.join(AUGMENT_FIELDS)}, got "
        f"{augment!r}")
  unknown = sorted(set(augment) - set(AUGMENT_FIELDS))
  if unknown:
    raise ConfigError(
        f"augment.{unknown[0]} is not a field of augment (its fields: "
        f"{', '.join(AUGMENT_FIELDS)})")
  augment.setdefault("apply_to", "both")
  for field in AUGMENT_TRANSFORMS:
    augment.setdefault(field, None)
  checks.one_of(cfg, "augment.apply_to", tasks.APPLY_TO)
  try:
    transform = tasks.augmentation(**augment_args(augment))
  except ValueError as e:
    raise ConfigError(f"augment.{e}") from e
  if transform is not None and is_regression(cfg["task"]):
    field = next(f for f in AUGMENT_TRANSFORMS if augment[f] is not None)
    raise ConfigError(
        f"augment.{field} transforms images, but task.dataset="
        f"{cfg['task']['dataset']} has none: use augment=none")


def is_population(cfg: Mapping[str, Any]) -> bool:
  """Whether a config asks for a population (a sweep as one program):
  ``population.seeds``, ``population.inner_lr`` or ``population.lr`` set."""
  pop = cfg.get("population")
  return isinstance(pop, Mapping) and any(
      pop.get(name) is not None for name in ("seeds", "inner_lr", "lr"))


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
  """Checks a whole run config without loading data or compiling anything.

  Args:
    cfg: the composed config (``DictConfig``) or its plain form.

  Returns:
    The plain, resolved config.

  Raises:
    ConfigError: on the first bad field, in one line naming it and, where
      there is a fixed set, the allowed values.
  """
  cfg = checks.to_plain(cfg)
  if not checks.is_int(checks.get(cfg, "seed")):
    raise ConfigError(f"seed must be an int, got {cfg['seed']!r}")
  _tasksets.validate_task(cfg)
  for group in ("model", "learner", "optimizer"):
    checks.target(cfg, group)
  _validate_model(cfg)
  _validate_rates(cfg)
  _validate_trainer(cfg)
  _validate_selection(cfg)
  _validate_augment(cfg)
  checks.one_of(cfg, "logger.kind", LOGGERS)
  return cfg
