"""From a hydra config to checked plain Python and built objects.

This is the one module that reads a composed config: it converts it to plain
Python (``OmegaConf.to_container(resolve=True)``), validates every field
before anything is loaded or compiled, and calls ``hydra.utils.instantiate``
for the learner (with its network) and the meta-optimizer. The rest of the
library only ever sees the plain values.
"""

import copy
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import hydra.utils
import jax
import optax
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalearn import data, metalearners, models, tasks
from metalearn.metalearners import MetaLearner

DATASETS = ("omniglot", "mini_imagenet", "sinusoid")
TASK_MAPS = ("auto", "vmap", "scan")
LOGGERS = ("wandb", "none")
SELECTS = ("last", "best_val")
OBJECTIVES = ("auto", "val_accuracy", "val_loss")


class ConfigError(ValueError):
  """A config field holds a value the run cannot use; the message names it."""


class Samplers(NamedTuple):
  """The meta-train, meta-validation and meta-test task distributions."""

  train: tasks.TaskSampler
  val: tasks.TaskSampler
  test: tasks.TaskSampler


def to_plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
  """Resolves a composed config into plain dicts, lists and scalars.

  Args:
    cfg: a hydra/OmegaConf config, or a mapping (copied).

  Returns:
    The config without its ``hydra`` node.

  Raises:
    ConfigError: if an interpolation cannot be resolved or a value is
      missing (``???``).
  """
  if isinstance(cfg, DictConfig):
    try:
      plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
      raise ConfigError(_first_line(e)) from e
  else:
    plain = copy.deepcopy(dict(cfg))
  plain.pop("hydra", None)
  return plain


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def _get(cfg: Mapping[str, Any], path: str) -> Any:
  node = cfg
  for part in path.split("."):
    if not isinstance(node, Mapping) or part not in node:
      raise ConfigError(f"{path} is missing from the config")
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_at_least(cfg, path: str, low: int) -> int:
  value = _get(cfg, path)
  if not _is_int(value) or value < low:
    raise ConfigError(f"{path} must be an int >= {low}, got {value!r}")
  return value


def _positive_number(path: str, value: Any) -> None:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not value > 0
  ):
    raise ConfigError(f"{path} must be a number > 0, got {value!r}")


def _one_of(cfg, path: str, choices: tuple[str, ...]) -> str:
  value = _get(cfg, path)
  if value not in choices:
    raise ConfigError(
        f"{path}={value!r} is not one of {', '.join(choices)}"
    )
  return value


def _bool(cfg, path: str) -> bool:
  value = _get(cfg, path)
  if not isinstance(value, bool):
    raise ConfigError(f"{path} must be true or false, got {value!r}")
  return value


def _multiple_of(cfg, path: str, base_path: str) -> None:
  value, base = _get(cfg, path), _get(cfg, base_path)
  if value % base:
    raise ConfigError(
        f"{path}={value} must be a multiple of {base_path}={base}"
    )


def _target(cfg, group: str) -> str:
  target = _get(cfg, f"{group}._target_")
  if not isinstance(target, str) or not target:
    raise ConfigError(f"{group}._target_ must name a factory, got {target!r}")
  return target


def learner_name(cfg: Mapping[str, Any]) -> str:
  """A short name for the learner: its factory, ``fo`` for first order."""
  learner = cfg["learner"]
  name = str(learner.get("_target_", "learner")).rsplit(".", 1)[-1]
  if name == "maml" and learner.get("first_order"):
    name = "fomaml"
  return name


def uses_task_pairs(cfg: Mapping[str, Any]) -> bool:
  """Whether the learner trains on task pairs (task interpolation, MLTI)."""
  return learner_name(cfg) == "mlti"


def run_name(cfg: Mapping[str, Any]) -> str:
  """``cfg["name"]``, else ``<task>_<learner>``."""
  return cfg.get("name") or f"{cfg['task'].get('name', 'task')}_" + (
      learner_name(cfg)
  )


def _validate_task(cfg) -> None:
  dataset = _one_of(cfg, "task.dataset", DATASETS)
  for field in ("num_shots", "num_queries", "train_num_queries"):
    _int_at_least(cfg, f"task.{field}", 1)
  if cfg["task"].get("train_num_shots") is not None:
    _int_at_least(cfg, "task.train_num_shots", 1)
  if dataset == "sinusoid":
    for field in ("num_ways", "train_num_ways"):
      if cfg["task"].get(field) is not None:
        raise ConfigError(
            f"task.{field} must be null for the sinusoid regression task, "
            f"got {cfg['task'][field]!r}"
        )
    return
  _int_at_least(cfg, "task.num_ways", 1)
  _int_at_least(cfg, "task.train_num_ways", 1)
  _int_at_least(cfg, "task.image_size", 4)
  _get(cfg, "task.data_dir")
  train_splits = cfg["task"].get("train_splits", ["train"])
  if (
      not isinstance(train_splits, Sequence)
      or isinstance(train_splits, str)
      or not train_splits
      or not set(train_splits) <= {"train", "val"}
      or len(set(train_splits)) != len(train_splits)
  ):
    raise ConfigError(
        "task.train_splits must be a list of distinct splits among "
        f"['train', 'val'] (test classes are never meta-trained on), got "
        f"{train_splits!r}"
    )
  if cfg["task"].get("train_classes") is not None:
    _int_at_least(cfg, "task.train_classes", 1)
    if cfg["task"].get("train_class_group", 1) is not None:
      _int_at_least(cfg, "task.train_class_group", 1)
  if dataset == "omniglot":
    try:
      data.omniglot_split_names(_get(cfg, "task.split_scheme"))
    except ValueError as e:
      raise ConfigError(f"task.split_scheme: {e}") from e
    _bool(cfg, "task.rotations")


def _validate_head(cfg) -> None:
  """A learner given its network as ``model`` adapts a classification head,
  which needs one output per way; one given ``embed`` takes any embedding."""
  task, learner = cfg["task"], cfg["learner"]
  net = learner.get("model")
  if task["dataset"] == "sinusoid" or not isinstance(net, Mapping):
    return
  inner = learner.get("learner_fn")
  if isinstance(inner, Mapping) and str(inner.get("_target_", "")).endswith(
      "protonet"):
    return  # MLTI around ProtoNet: the model is an embedding.
  name = learner_name(cfg)
  num_outputs = net.get("num_outputs")
  if num_outputs is None:
    raise ConfigError(
        f"model.num_outputs is null (an embedding without a head), but "
        f"learner {name} adapts a classification head: set "
        f"model.num_outputs to task.num_ways={task['num_ways']} (e.g. "
        "model=conv4_omniglot) or use an embedding learner (learner=protonet)"
    )
  if num_outputs != task["num_ways"]:
    raise ConfigError(
        f"model.num_outputs={num_outputs} does not match "
        f"task.num_ways={task['num_ways']}: the head of learner {name} needs "
        "one output per way"
    )
  if task["train_num_ways"] != task["num_ways"]:
    raise ConfigError(
        f"task.train_num_ways={task['train_num_ways']} differs from "
        f"task.num_ways={task['num_ways']}, but learner {name} has a "
        "fixed-size head; only embedding learners (protonet) can train with "
        "other numbers of ways"
    )


def _validate_model(cfg) -> None:
  """The network's sizes, which its factory would reject (or divide by)
  only after the data are loaded."""
  model = cfg["model"]
  if "features" in model:
    _int_at_least(cfg, "model.features", 1)
  if "norm" in model:
    _one_of(cfg, "model.norm", models.NORMS)
  for field in ("hidden", "widths"):
    sizes = model.get(field)
    if sizes is not None and (
        not isinstance(sizes, Sequence)
        or isinstance(sizes, str)
        or not all(_is_int(n) and n >= 1 for n in sizes)
    ):
      raise ConfigError(
          f"model.{field} must be a list of ints >= 1, got {sizes!r}"
      )


def _validate_rates(cfg) -> None:
  learner = cfg["learner"]
  for field in ("inner_lr", "eval_inner_lr"):
    if learner.get(field) is not None:
      _positive_number(f"learner.{field}", learner[field])
  for field in ("num_inner_steps", "eval_num_inner_steps"):
    if learner.get(field) is not None:
      _int_at_least(cfg, f"learner.{field}", 0)
  rate = cfg["optimizer"].get("learning_rate")
  if isinstance(rate, Mapping):
    # A schedule: check its starting value where it has one.
    for field in ("init_value", "value", "peak_value"):
      if field in rate:
        _positive_number(f"optimizer.learning_rate.{field}", rate[field])
  elif rate is not None:
    _positive_number("optimizer.learning_rate", rate)


def _validate_trainer(cfg) -> None:
  for field in (
      "num_steps", "meta_batch_size", "steps_per_call", "log_every",
      "checkpoint_every", "max_to_keep", "eval_batch_size",
  ):
    _int_at_least(cfg, f"trainer.{field}", 1)
  for field in ("eval_every", "test_episodes"):
    _int_at_least(cfg, f"trainer.{field}", 0)
  if _get(cfg, "trainer.eval_every"):
    _int_at_least(cfg, "trainer.val_episodes", 1)
    _multiple_of(cfg, "trainer.eval_every", "trainer.log_every")
  _multiple_of(cfg, "trainer.log_every", "trainer.steps_per_call")
  _multiple_of(cfg, "trainer.checkpoint_every", "trainer.log_every")
  _one_of(cfg, "trainer.task_map", TASK_MAPS)
  devices = cfg["trainer"].get("devices")
  if devices is not None and devices != "all":
    _int_at_least(cfg, "trainer.devices", 1)
    available = jax.device_count()
    if devices > available:
      raise ConfigError(
          f"trainer.devices={devices} exceeds the {available} available "
          f"{jax.default_backend()} device(s): use trainer.devices=all or a "
          f"count up to {available}"
      )
  _bool(cfg, "trainer.resume")
  _bool(cfg, "trainer.progress")
  max_time = cfg["trainer"].get("max_time_s")
  if max_time is not None:
    _positive_number("trainer.max_time_s", max_time)
  if not _is_int(_get(cfg, "trainer.eval_seed")):
    raise ConfigError(
        f"trainer.eval_seed must be an int, got {cfg['trainer']['eval_seed']!r}"
    )
  ckpt = _get(cfg, "trainer.checkpoint_dir")
  if ckpt is not None and not isinstance(ckpt, str):
    raise ConfigError(f"trainer.checkpoint_dir must be a path, got {ckpt!r}")


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
  _int_at_least(cfg, "trainer.val_episodes", 1)
  val_seed = trainer["val_seed"]
  if val_seed is not None and (
      not _is_int(val_seed) or val_seed == trainer["eval_seed"]
  ):
    raise ConfigError(
        "trainer.val_seed must be null or an int other than "
        f"trainer.eval_seed={trainer['eval_seed']} (validation never draws "
        f"the test episodes), got {val_seed!r}"
    )
  if _one_of(cfg, "trainer.select", SELECTS) == "best_val" and not (
      trainer["eval_every"]
  ):
    raise ConfigError(
        "trainer.select=best_val picks among the validations during "
        "training, but trainer.eval_every=0 runs none: set "
        "trainer.eval_every > 0"
    )
  objective = _one_of(cfg, "trainer.objective", OBJECTIVES)
  if objective == "val_accuracy" and cfg["task"]["dataset"] == "sinusoid":
    raise ConfigError(
        "trainer.objective=val_accuracy, but the sinusoid regression task "
        "has no accuracy: use val_loss (or auto)"
    )


def objective_metric(objective: str, dataset: str) -> tuple[str, str]:
  """The validation metric that ``trainer.objective`` names, and its sense.

  Args:
    objective: ``"auto"``, ``"val_accuracy"`` or ``"val_loss"``.
    dataset: ``task.dataset``; ``auto`` is the accuracy for classification
      and the loss (mean squared error) for the sinusoid regression task.

  Returns:
    ``("val/outer/accuracy", "maximize")`` or
    ``("val/outer/loss", "minimize")``.

  Examples:
    >>> objective_metric("auto", "omniglot")
    ('val/outer/accuracy', 'maximize')
    >>> objective_metric("auto", "sinusoid")
    ('val/outer/loss', 'minimize')
  """
  if objective == "auto":
    objective = "val_loss" if dataset == "sinusoid" else "val_accuracy"
  if objective == "val_accuracy":
    return "val/outer/accuracy", "maximize"
  if objective == "val_loss":
    return "val/outer/loss", "minimize"
  raise ValueError(
      f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
  )


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
  cfg = to_plain(cfg)
  if not _is_int(_get(cfg, "seed")):
    raise ConfigError(f"seed must be an int, got {cfg['seed']!r}")
  _validate_task(cfg)
  for group in ("model", "learner", "optimizer"):
    _target(cfg, group)
  _validate_head(cfg)
  _validate_model(cfg)
  _validate_rates(cfg)
  _validate_trainer(cfg)
  _validate_selection(cfg)
  _one_of(cfg, "logger.kind", LOGGERS)
  return cfg


def _instantiate(node: Mapping[str, Any], group: str) -> Any:
  target = _target({group: node}, group)
  try:
    hydra.utils.get_object(target)
  except Exception as e:
    raise ConfigError(
        f"{group}._target_={target!r} cannot be imported: {_first_line(e)}"
    ) from e
  try:
    return hydra.utils.instantiate(node, _convert_="all")
  except InstantiationException as e:
    cause = e.__cause__ or e
    raise ConfigError(
        f"{group}: building {target} failed: {type(cause).__name__}: "
        f"{_first_line(cause)}"
    ) from e


def build_learner(cfg: Mapping[str, Any]) -> MetaLearner:
  """Instantiates ``cfg["learner"]``, building its network on the way."""
  learner = _instantiate(cfg["learner"], "learner")
  if not isinstance(learner, MetaLearner):
    raise ConfigError(
        f"learner._target_={cfg['learner']['_target_']!r} returned a "
        f"{type(learner).__name__}, not a metalearn MetaLearner"
    )
  return learner


def build_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """Instantiates ``cfg["optimizer"]`` (and a learning-rate schedule)."""
  tx = _instantiate(cfg["optimizer"], "optimizer")
  if not isinstance(tx, optax.GradientTransformation):
    raise ConfigError(
        f"optimizer._target_={cfg['optimizer']['_target_']!r} returned a "
        f"{type(tx).__name__}, not an optax GradientTransformation"
    )
  return tx


def load_splits(task: Mapping[str, Any]) -> data.DatasetSplits | None:
  """Loads the dataset a task config names (``None`` for sinusoid).

  Raises:
    DatasetNotFoundError: if the data directory does not hold the dataset;
      its message says which files to put where.
  """
  if task["dataset"] == "omniglot":
    return data.load_omniglot(
        task["data_dir"],
        image_size=task["image_size"],
        split_scheme=task["split_scheme"],
        rotations=task["rotations"],
    )
  if task["dataset"] == "mini_imagenet":
    return data.load_mini_imagenet(
        task["data_dir"], image_size=task["image_size"]
    )
  return None


def _episode_sampler(task, pool, split: str) -> tasks.TaskSampler:
  train = split == "train"
  prefix = "train_" if train else ""
  num_ways = task[f"{prefix}num_ways"]
  num_queries = task[f"{prefix}num_queries"]
  num_shots = _train_num_shots(task) if train else task["num_shots"]
  try:
    tasks.validate_episode_request(
        num_classes=pool.num_classes,
        examples_per_class=pool.examples_per_class,
        num_ways=num_ways,
        num_shots=num_shots,
        num_queries=num_queries,
    )
  except ValueError as e:
    # The library names the argument; name the config field instead.
    field = {"num_ways": f"{prefix}num_ways",
             "num_queries": f"{prefix}num_queries",
             "num_shots": f"{prefix}num_shots"}
    message = re.sub(
        r"\bnum_(ways|shots|queries)\b",
        lambda m: "task." + field[m.group(0)],
        str(e),
    )
    raise ConfigError(
        f"{message} ({task['dataset']} {split} split)"
    ) from e
  return tasks.episode_sampler(
      pool, num_ways=num_ways, num_shots=num_shots,
      num_queries=num_queries,
  )


def _train_num_shots(task) -> int:
  """``task.train_num_shots``, else ``task.num_shots``."""
  shots = task.get("train_num_shots")
  return task["num_shots"] if shots is None else shots


def build_samplers(
    task: Mapping[str, Any], splits: data.DatasetSplits | None,
    *, paired: bool = False,
) -> Samplers:
  """The train/val/test samplers of a validated task config.

  Meta-training uses ``train_num_ways``, ``train_num_shots`` (default
  ``num_shots``) and ``train_num_queries``; validation and test use
  ``num_ways``, ``num_shots`` and ``num_queries``. Meta-training
  draws its classes from the ``train_splits`` (``["train"]`` by default;
  ``["train", "val"]`` as Snell et al.'s final runs, with no held-out
  validation classes left). A few-task setting keeps only
  ``train_classes`` meta-training classes (groups of ``train_class_group``
  consecutive classes, e.g. 4 for an Omniglot character with its
  rotations; drawn with ``train_class_seed``;
  :func:`metalearn.data.restrict_classes`). ``paired`` draws meta-training
  tasks in pairs (:func:`metalearn.metalearners.paired_sampler`), for
  learners that combine two tasks (:func:`uses_task_pairs`).

  Raises:
    ConfigError: if a split cannot supply the episodes (more ways than
      classes, more shots plus queries than examples per class).
  """
  if task["dataset"] == "sinusoid":
    def make(num_shots, num_queries):
      try:
        return tasks.sinusoid_sampler(
            num_shots=num_shots,
            num_queries=num_queries,
            amplitude=tuple(task["amplitude"]),
            phase=tuple(task["phase"]),
            x_range=tuple(task["x_range"]),
        )
      except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"task (sinusoid): {e}") from e

    # Validation and test tasks come from the same family, and from
    # different keys (trainer.val_seed, trainer.eval_seed).
    test = make(task["num_shots"], task["num_queries"])
    return Samplers(
        make(_train_num_shots(task), task["train_num_queries"]), test, test)
  pools = {split: getattr(splits, split) for split in ("test", "val", "train")}
  pools["train"] = data.merge_pools(
      *(pools[split] for split in task.get("train_splits", ["train"])))
  if task.get("train_classes") is not None:
    try:
      pools["train"] = data.restrict_classes(
          pools["train"], task["train_classes"],
          seed=task.get("train_class_seed", 0),
          group_size=task.get("train_class_group", 1),
      )
    except ValueError as e:
      raise ConfigError(f"task.train_classes: {e}") from e
  # Test and val first: they read num_ways itself, which train_num_ways
  # usually interpolates, so the error names the field the user set.
  test, val, train = (
      _episode_sampler(task, pools[split], split)
      for split in ("test", "val", "train")
  )
  if paired:
    train = metalearners.paired_sampler(train)
  return Samplers(train, val, test)
