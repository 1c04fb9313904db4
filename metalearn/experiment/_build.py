"""From a checked config to built objects: the one ``instantiate`` call site.

:func:`instantiate` is where ``hydra.utils.instantiate`` builds the
learner (with its network), the meta-optimizer and a learned-optimiser
run's model and optimiser. Building is cheap (no data, no compilation),
so what a learner declares it needs (``MetaLearner.head``) is checked
against the task right after it is built and before any data are loaded.
"""

from collections.abc import Callable, Mapping
from typing import Any

import hydra.utils
import optax
from hydra.errors import InstantiationException

from metalearn import tasks
from metalearn.experiment import _checks as checks
from metalearn.experiment._checks import ConfigError
from metalearn.experiment._config import (
    augment_args,
    is_regression,
    learner_name,
)
from metalearn.metalearners import MetaLearner


def instantiate(node: Mapping[str, Any], group: str) -> Any:
  """Builds a config group's object (``_convert_="all"``: plain arguments).

  Args:
    node: the group's plain config, with its ``_target_``.
    group: the group's name, for messages.

  Returns:
    What the ``_target_`` factory returns.

  Raises:
    ConfigError: naming ``group`` if the target cannot be imported or the
      factory raises.
  """
  target = checks.target({group: node}, group)
  try:
    hydra.utils.get_object(target)
  except Exception as e:
    raise ConfigError(
        f"{group}._target_={target!r} cannot be imported: "
        f"{checks.first_line(e)}"
    ) from e
  try:
    return hydra.utils.instantiate(node, _convert_="all")
  except InstantiationException as e:
    cause = e.__cause__ or e
    raise ConfigError(
        f"{group}: building {target} failed: {type(cause).__name__}: "
        f"{checks.first_line(cause)}"
    ) from e


def check_head(learner: MetaLearner, cfg: Mapping[str, Any]) -> None:
  """Checks a learner's head against the task's ways.

  A learner with ``head=True`` adapts a classification head with one
  output per way, so the network's output size (``model.num_outputs``,
  the top-level ``model`` group) must equal ``task.num_ways``, and
  meta-training must use the same number of ways. Embedding learners
  (``head=False``) and regression tasks (``task.num_ways`` null) take any.
  A learner with a fixed number of label slots (``learner.max_ways``, the
  in-context learner) takes up to that many ways.

  Raises:
    ConfigError: naming the field to change.
  """
  task, model = cfg["task"], cfg["model"]
  max_ways = cfg["learner"].get("max_ways")
  if max_ways is not None and not is_regression(task):
    for field in ("num_ways", "train_num_ways"):
      if task[field] is not None and task[field] > max_ways:
        raise ConfigError(
            f"task.{field}={task[field]} exceeds learner.max_ways="
            f"{max_ways}, the learner's label slots: raise learner.max_ways")
  if not learner.head or is_regression(task) or "num_outputs" not in model:
    return
  name, num_outputs = learner_name(cfg), model["num_outputs"]
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
        "fixed-size head; only embedding learners (e.g. protonet) can train "
        "with other numbers of ways"
    )


def build_learner(cfg: Mapping[str, Any]) -> MetaLearner:
  """Instantiates ``cfg["learner"]``, building its network on the way.

  Args:
    cfg: a validated plain config
      (:func:`~metalearn.experiment.validate_config`).

  Returns:
    The learner, checked against the task (:func:`check_head`).

  Raises:
    ConfigError: if the learner cannot be built, is not a
      :class:`~metalearn.metalearners.MetaLearner`, or needs a head the
      model or the task does not match.
  """
  learner = instantiate(cfg["learner"], "learner")
  if not isinstance(learner, MetaLearner):
    raise ConfigError(
        f"learner._target_={cfg['learner']['_target_']!r} returned a "
        f"{type(learner).__name__}, not a metalearn MetaLearner"
    )
  check_head(learner, cfg)
  return learner


def build_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """Instantiates ``cfg["optimizer"]`` (and a learning-rate schedule)."""
  tx = instantiate(cfg["optimizer"], "optimizer")
  if not isinstance(tx, optax.GradientTransformation):
    raise ConfigError(
        f"optimizer._target_={cfg['optimizer']['_target_']!r} returned a "
        f"{type(tx).__name__}, not an optax GradientTransformation"
    )
  return tx


def build_augmentation(
    cfg: Mapping[str, Any],
) -> Callable[[tasks.TaskSampler], tasks.TaskSampler] | None:
  """The ``augment`` group as a wrapper of the meta-training sampler.

  Args:
    cfg: a validated plain config.

  Returns:
    ``None`` for ``augment=none``, else ``wrap(sampler) -> sampler`` that
    augments its episodes on device (:func:`metalearn.tasks.augmented`
    with ``augment.apply_to``). Only the meta-training sampler is wrapped:
    validation and test episodes are never augmented.

  Raises:
    ConfigError: naming ``augment`` if the sampler's episodes are not
      images.
  """
  augment = cfg.get("augment") or {}
  transform = tasks.augmentation(**augment_args(augment))
  if transform is None:
    return None
  apply_to = augment.get("apply_to", "both")

  def wrap(sampler: tasks.TaskSampler) -> tasks.TaskSampler:
    try:
      return tasks.augmented(sampler, transform, apply_to=apply_to)
    except ValueError as e:
      raise ConfigError(f"augment: {checks.first_line(e)}") from e

  return wrap
