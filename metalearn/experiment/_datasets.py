"""Everything the experiment layer knows about particular datasets.

The one place where ``task.dataset`` is read: which datasets there are, the
task fields each needs (checked without loading anything), loading a
dataset's splits and building the train/val/test task samplers. Nothing
else in :mod:`metalearn.experiment` branches on a dataset's name; a task
is a regression task when ``task.num_ways`` is null (:func:`validate_task`
enforces it), which the rest reads instead.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from metalearn import data, tasks
from metalearn.experiment import _checks as checks
from metalearn.experiment._checks import ConfigError

DATASETS = ("omniglot", "mini_imagenet", "sinusoid")


class Samplers(NamedTuple):
  """The meta-train, meta-validation and meta-test task distributions."""

  train: tasks.TaskSampler
  val: tasks.TaskSampler
  test: tasks.TaskSampler


def validate_task(cfg: Mapping[str, Any]) -> None:
  """Checks the ``task`` fields of a plain config without loading data.

  Raises:
    ConfigError: on the first bad ``task.*`` field, naming it.
  """
  dataset = checks.one_of(cfg, "task.dataset", DATASETS)
  for field in ("num_shots", "num_queries", "train_num_queries"):
    checks.int_at_least(cfg, f"task.{field}", 1)
  if cfg["task"].get("train_num_shots") is not None:
    checks.int_at_least(cfg, "task.train_num_shots", 1)
  if dataset == "sinusoid":
    for field in ("num_ways", "train_num_ways"):
      if cfg["task"].get(field) is not None:
        raise ConfigError(
            f"task.{field} must be null for the sinusoid regression task, "
            f"got {cfg['task'][field]!r}"
        )
    return
  checks.int_at_least(cfg, "task.num_ways", 1)
  checks.int_at_least(cfg, "task.train_num_ways", 1)
  checks.int_at_least(cfg, "task.image_size", 4)
  checks.get(cfg, "task.data_dir")
  _validate_train_classes(cfg)
  if dataset == "omniglot":
    try:
      data.omniglot_split_names(checks.get(cfg, "task.split_scheme"))
    except ValueError as e:
      raise ConfigError(f"task.split_scheme: {e}") from e
    checks.boolean(cfg, "task.rotations")


def _validate_train_classes(cfg) -> None:
  """``task.train_splits``, ``train_classes`` and ``train_class_group``."""
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
    checks.int_at_least(cfg, "task.train_classes", 1)
    if cfg["task"].get("train_class_group", 1) is not None:
      checks.int_at_least(cfg, "task.train_class_group", 1)


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
    message = re.sub(
        r"\bnum_(ways|shots|queries)\b",
        lambda m: f"task.{prefix}{m.group(0)}",
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


def _sinusoid_samplers(task) -> Samplers:
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


def build_samplers(
    task: Mapping[str, Any], splits: data.DatasetSplits | None,
    *, train_sampler: Callable[[Any], Any] | None = None,
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
  :func:`metalearn.data.restrict_classes`).

  Args:
    task: the ``task`` node of a validated config.
    splits: the dataset's splits (:func:`load_splits`).
    train_sampler: ``None``, or how the learner draws its meta-training
      tasks (:attr:`metalearn.metalearners.MetaLearner.train_sampler`, e.g.
      pairs of tasks for MLTI); applied to the training sampler only.

  Returns:
    The samplers.

  Raises:
    ConfigError: if a split cannot supply the episodes (more ways than
      classes, more shots plus queries than examples per class).
  """
  if task["dataset"] == "sinusoid":
    samplers = _sinusoid_samplers(task)
  else:
    samplers = _pool_samplers(task, splits)
  if train_sampler is not None:
    samplers = samplers._replace(train=train_sampler(samplers.train))
  return samplers


def _pool_samplers(task, splits: data.DatasetSplits) -> Samplers:
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
  return Samplers(train, val, test)
