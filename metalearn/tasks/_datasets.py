"""The built-in datasets of :func:`~metalearn.tasks.get_tasksets`.

Each is one :func:`~metalearn.tasks.register_dataset` call: its options with
their defaults, a check of them that loads nothing, and either a loader of
class pools (:mod:`metalearn.data`) or a builder of procedural samplers.
"""

import math
import numbers
from collections.abc import Sequence
from typing import Any

from metalearn import data
from metalearn.tasks._episodes import TasksetArgumentError
from metalearn.tasks._registry import (
    EpisodeShape,
    Tasksets,
    check_int,
    register_dataset,
)
from metalearn.tasks._sinusoid import sinusoid_sampler


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TasksetArgumentError(
        name, f"{name} must be True or False, got {value!r}"
    )


def _check_omniglot(*, image_size, split_scheme, rotations) -> None:
  check_int("image_size", image_size, 4)
  try:
    data.omniglot_split_names(split_scheme)  # Package data, not the images.
  except (TypeError, ValueError) as e:
    raise TasksetArgumentError("split_scheme", f"split_scheme: {e}") from e
  _check_bool("rotations", rotations)


def _check_mini_imagenet(*, image_size) -> None:
  check_int("image_size", image_size, 4)


def _check_range(name: str, value: Any) -> None:
  if (
      not isinstance(value, Sequence)
      or isinstance(value, str)
      or len(value) != 2
      or not all(
          isinstance(v, numbers.Real) and not isinstance(v, bool)
          and math.isfinite(v) for v in value
      )
      or not value[0] <= value[1]
  ):
    raise TasksetArgumentError(
        name,
        f"{name} must be a range [low, high] of two numbers, low <= high, "
        f"got {value!r}",
    )


def _check_sinusoid(*, amplitude, phase, x_range) -> None:
  for name, value in (
      ("amplitude", amplitude), ("phase", phase), ("x_range", x_range)
  ):
    _check_range(name, value)


def _sinusoid_tasksets(
    train: EpisodeShape, test: EpisodeShape, *, amplitude, phase, x_range
) -> Tasksets:
  def make(shape: EpisodeShape):
    return sinusoid_sampler(
        num_shots=shape.num_shots,
        num_queries=shape.num_queries,
        amplitude=tuple(amplitude),
        phase=tuple(phase),
        x_range=tuple(x_range),
    )

  # Validation and test tasks come from the same family: a trainer draws
  # them with different keys.
  evaluation = make(test)
  return Tasksets(make(train), evaluation, evaluation)


register_dataset(
    "omniglot",
    options={"image_size": 28, "split_scheme": "vinyals", "rotations": True},
    check=_check_omniglot,
    load_splits=data.load_omniglot,
)
register_dataset(
    "mini_imagenet",
    options={"image_size": 84},
    check=_check_mini_imagenet,
    load_splits=data.load_mini_imagenet,
)
register_dataset(
    "sinusoid",
    options={
        "amplitude": (0.1, 5.0),
        "phase": (0.0, math.pi),
        "x_range": (-5.0, 5.0),
    },
    check=_check_sinusoid,
    make_tasksets=_sinusoid_tasksets,
)
