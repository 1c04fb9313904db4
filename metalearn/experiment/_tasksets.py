"""A run's ``task`` config as :func:`metalearn.tasks.get_tasksets` arguments.

The ``task`` group holds the arguments of ``get_tasksets`` (``dataset``,
the episode sizes, ``data_dir`` and the dataset's options) plus a ``name``
for the run. Which datasets exist and what each needs is the registry's
business (:mod:`metalearn.tasks`): nothing here branches on a dataset. The
library names its arguments (``num_ways``); the errors raised here name
the config fields (``task.num_ways``).
"""

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from metalearn import tasks
from metalearn.experiment import _checks as checks
from metalearn.experiment._checks import ConfigError

# Fields of the task group that are not arguments of get_tasksets.
_NOT_ARGUMENTS = ("name",)
# Arguments every dataset takes; an error message may name any of them.
_ARGUMENTS = (
    "num_ways", "num_shots", "num_queries", "train_num_ways",
    "train_num_shots", "train_num_queries", "data_dir",
)


class Samplers(NamedTuple):
  """The meta-train, meta-validation and meta-test task distributions."""

  train: tasks.TaskSampler
  val: tasks.TaskSampler
  test: tasks.TaskSampler


def taskset_args(task: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments of :func:`metalearn.tasks.get_tasksets`."""
  return {k: v for k, v in task.items() if k not in _NOT_ARGUMENTS}


def _config_error(e: ValueError) -> ConfigError:
  """The library's error with its argument names as ``task.*`` fields."""
  names = set(_ARGUMENTS) | {getattr(e, "argument", None) or "dataset"}
  alternatives = "|".join(
      re.escape(n) for n in sorted(names, key=len, reverse=True))
  message = re.sub(rf"(?<![\w.])({alternatives})\b", r"task.\1", str(e))
  return ConfigError(message if "task." in message else f"task: {message}")


def validate_task(cfg: Mapping[str, Any]) -> None:
  """Checks the ``task`` fields of a plain config without loading data.

  Raises:
    ConfigError: on the first bad ``task.*`` field, naming it.
  """
  for field in ("dataset", "num_ways", "num_shots", "num_queries"):
    checks.get(cfg, f"task.{field}")
  try:
    tasks.check_taskset_args(**taskset_args(cfg["task"]))
  except ValueError as e:
    raise _config_error(e) from e


def build_samplers(
    task: Mapping[str, Any],
    *,
    train_sampler: Callable[[Any], Any] | None = None,
) -> Samplers:
  """The train/val/test samplers of a validated task config.

  The samplers of :func:`metalearn.tasks.get_tasksets`, which loads the
  dataset: meta-training uses ``train_num_ways``, ``train_num_shots`` and
  ``train_num_queries`` (each null for the test's), validation and test
  ``num_ways``, ``num_shots`` and ``num_queries``; a class-pool dataset
  meta-trains on the classes of ``train_splits``, or on ``train_classes``
  of them (the few-task setting).

  Args:
    task: the ``task`` node of a validated config.
    train_sampler: ``None``, or how the learner draws its meta-training
      tasks (:attr:`metalearn.metalearners.MetaLearner.train_sampler`, e.g.
      pairs of tasks for MLTI); applied to the training sampler only.

  Returns:
    The samplers.

  Raises:
    ConfigError: if a split cannot supply the episodes (more ways than
      classes, more shots plus queries than examples per class).
    DatasetNotFoundError: if the data directory does not hold the dataset;
      its message says which files to put where.
  """
  try:
    sets = tasks.get_tasksets(**taskset_args(task))
  except tasks.TasksetArgumentError as e:
    raise _config_error(e) from e
  train = sets.train if train_sampler is None else train_sampler(sets.train)
  return Samplers(train, sets.validation, sets.test)
