"""The registry of datasets that :func:`~metalearn.tasks.get_tasksets` builds.

A dataset registers itself once, with :func:`register_dataset`: its
options and their defaults, a check of them that loads nothing, and either
a loader of class pools or a builder of procedural samplers. The built-in
ones are registered in ``_datasets.py``.
"""

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from metalearn import data
from metalearn.tasks._episodes import TaskSampler, TasksetArgumentError


class Tasksets(NamedTuple):
  """The meta-train, meta-validation and meta-test task distributions."""

  train: TaskSampler
  validation: TaskSampler
  test: TaskSampler


class EpisodeShape(NamedTuple):
  """The size of one split's episodes (``num_ways`` is ``None`` for a
  regression family)."""

  num_ways: int | None
  num_shots: int
  num_queries: int


class DatasetEntry(NamedTuple):
  """How :func:`get_tasksets` builds one registered dataset's tasksets.

  Attributes:
    name: the name passed to :func:`get_tasksets`.
    options: the dataset's own options and their defaults.
    check: ``check(**options)``, or ``None``.
    load_splits: for a dataset of class pools, ``load_splits(data_dir,
      **options) -> metalearn.data.DatasetSplits``; else ``None``.
    make_tasksets: for a procedural family, ``make_tasksets(train, test,
      **options) -> Tasksets``; else ``None``.
  """

  name: str
  options: Mapping[str, Any]
  check: Callable[..., None] | None
  load_splits: Callable[..., data.DatasetSplits] | None
  make_tasksets: Callable[..., Tasksets] | None


# Options of every class-pool dataset: which classes are meta-trained on,
# and whether an episode's classes all come from one alphabet (validation
# and test; meta-training follows unless train_within_alphabet is set).
POOL_OPTIONS: Mapping[str, Any] = {
    "train_splits": ("train",),
    "train_classes": None,
    "train_class_group": 1,
    "train_class_seed": 0,
    "within_alphabet": False,
    "train_within_alphabet": None,
}
_ARGUMENTS = (
    "dataset", "num_ways", "num_shots", "num_queries", "train_num_ways",
    "train_num_shots", "train_num_queries", "data_dir",
)
_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    *,
    options: Mapping[str, Any] | None = None,
    check: Callable[..., None] | None = None,
    load_splits: Callable[..., data.DatasetSplits] | None = None,
    make_tasksets: Callable[..., Tasksets] | None = None,
    replace: bool = False,
) -> None:
  """Makes a dataset available to :func:`get_tasksets` under ``name``.

  A dataset is one of two kinds, by which builder it gives:

  - class pools (``load_splits``): ``load_splits(data_dir, **options)``
    returns its train/val/test :class:`~metalearn.data.DatasetSplits`
    (``data_dir`` an absolute path); :func:`get_tasksets` then draws N-way
    K-shot episodes from them, and the dataset also takes the few-task
    options of :data:`POOL_OPTIONS`;
  - a procedural family (``make_tasksets``): ``make_tasksets(train, test,
    **options)`` builds the :class:`Tasksets` from the
    :class:`EpisodeShape` of meta-training and of validation and test
    episodes; ``num_ways`` must then be ``None`` (regression).

  Args:
    name: the dataset's name.
    options: its own options (keyword arguments of :func:`get_tasksets`)
      and their defaults.
    check: ``check(**options)``, called with every option (defaults filled
      in) before anything is loaded; raises ``ValueError`` (ideally a
      :class:`TasksetArgumentError`) naming the bad option.
    load_splits: the loader of a class-pool dataset.
    make_tasksets: the builder of a procedural family.
    replace: allow replacing a registered dataset of the same name.

  Raises:
    ValueError: if the name is taken, if not exactly one builder is given,
      or if an option has the name of an argument of :func:`get_tasksets`.

  Examples:
    >>> import numpy as np
    >>> from metalearn import data
    >>> from metalearn.types import ClassPool
    >>> def load_blank(data_dir, *, size):
    ...   pool = ClassPool(np.zeros((8, 4, size, size, 1), np.uint8),
    ...                    np.arange(8, dtype=np.int32))
    ...   return data.DatasetSplits(pool, pool, pool)
    >>> register_dataset("blank", options={"size": 8},
    ...                  load_splits=load_blank, replace=True)
    >>> "blank" in list_datasets()
    True
    >>> from metalearn.tasks import get_tasksets
    >>> ts = get_tasksets("blank", num_ways=2, num_shots=1, num_queries=3)
    >>> ts.test.data.images.shape
    (8, 4, 8, 8, 1)
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"a dataset name must be a non-empty str, got {name!r}")
  if name in _REGISTRY and not replace:
    raise ValueError(
        f"dataset {name!r} is already registered (pass replace=True)"
    )
  if (load_splits is None) == (make_tasksets is None):
    raise ValueError(
        f"dataset {name!r}: give exactly one of load_splits (class pools) "
        "and make_tasksets (a procedural family)"
    )
  options = dict(options or {})
  reserved = set(_ARGUMENTS) | (set(POOL_OPTIONS) if load_splits else set())
  clash = sorted(reserved & set(options))
  if clash:
    raise ValueError(
        f"dataset {name!r}: options {clash} have the names of arguments "
        "that get_tasksets already takes"
    )
  _REGISTRY[name] = DatasetEntry(
      name, options, check, load_splits, make_tasksets
  )


def list_datasets() -> tuple[str, ...]:
  """The names of the registered datasets, sorted.

  Examples:
    >>> {"mini_imagenet", "omniglot", "sinusoid"} <= set(list_datasets())
    True
  """
  return tuple(sorted(_REGISTRY))


def dataset_options(name: str) -> dict[str, Any]:
  """Every option a registered dataset takes, with its default.

  Examples:
    >>> dataset_options("mini_imagenet")["image_size"]
    84
  """
  entry = lookup(name)
  pool = POOL_OPTIONS if entry.load_splits is not None else {}
  return {**entry.options, **pool}


def lookup(dataset: Any) -> DatasetEntry:
  """The registration of ``dataset``.

  Raises:
    TasksetArgumentError: if it is not registered, listing those that are.
  """
  if not isinstance(dataset, str) or dataset not in _REGISTRY:
    raise TasksetArgumentError(
        "dataset",
        f"dataset={dataset!r} is not registered; the registered datasets "
        f"are {', '.join(list_datasets())}",
    )
  return _REGISTRY[dataset]


def is_int(value: Any) -> bool:
  """Whether ``value`` is an int and not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int) -> None:
  """Raises :class:`TasksetArgumentError` unless ``value`` is an int >=
  ``low``."""
  if not is_int(value) or value < low:
    raise TasksetArgumentError(
        name, f"{name} must be an int >= {low}, got {value!r}"
    )
