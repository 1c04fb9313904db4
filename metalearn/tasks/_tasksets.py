"""Tasksets: a dataset's meta-train, validation and test task samplers.

:func:`get_tasksets` builds the three samplers from plain arguments, the one
call that notebooks, benchmarks and the hydra layer share (learn2learn's
``vision.benchmarks.get_tasksets`` and ``BenchmarkTasksets`` have the same
shape), for any dataset of the registry (``_registry.py``; the built-in
``omniglot``, ``mini_imagenet`` and ``sinusoid`` are registered in
``_datasets.py``). :func:`check_taskset_args` checks the same arguments
without loading anything.
"""

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from metalearn import data
from metalearn.tasks._episodes import (
    TasksetArgumentError,
    episode_sampler,
    validate_episode_request,
    validate_within_alphabet,
)
from metalearn.tasks._registry import (
    POOL_OPTIONS,
    DatasetEntry,
    EpisodeShape,
    Tasksets,
    check_int,
    dataset_options,
    lookup,
)


class _Request(NamedTuple):
  entry: DatasetEntry
  train: EpisodeShape
  test: EpisodeShape
  options: dict[str, Any]


def _resolve(dataset, sizes: dict[str, Any], options) -> _Request:
  """Checks every argument; fills in the defaults.

  ``sizes`` maps ``num_ways`` ... ``train_num_queries`` to their values.
  """
  entry = lookup(dataset)
  known = dataset_options(dataset)
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise TasksetArgumentError(
        unknown[0],
        f"{unknown[0]} is not an option of dataset {dataset!r}; it takes "
        f"{', '.join(sorted(known)) or 'none'}",
    )
  if entry.load_splits is None:
    for name in ("num_ways", "train_num_ways"):
      if sizes[name] is not None:
        raise TasksetArgumentError(
            name,
            f"{name} must be None for {dataset!r}, a regression family "
            f"without classes, got {sizes[name]!r}",
        )
  else:
    check_int("num_ways", sizes["num_ways"], 1)
  for name in ("num_shots", "num_queries"):
    check_int(name, sizes[name], 1)
  for name in ("train_num_ways", "train_num_shots", "train_num_queries"):
    if sizes[name] is not None:
      check_int(name, sizes[name], 1)
  options = {**known, **options}
  if entry.load_splits is not None:
    _check_pool_options(**{k: options[k] for k in POOL_OPTIONS})
  if entry.check is not None:
    entry.check(**{k: options[k] for k in entry.options})
  test = EpisodeShape(
      sizes["num_ways"], sizes["num_shots"], sizes["num_queries"]
  )
  train = EpisodeShape(*(
      value if sizes[f"train_{name}"] is None else sizes[f"train_{name}"]
      for name, value in test._asdict().items()
  ))
  return _Request(entry, train, test, options)


def _check_pool_options(
    *, train_splits, train_classes, train_class_group, train_class_seed,
    within_alphabet, train_within_alphabet,
) -> None:
  if (
      not isinstance(train_splits, Sequence)
      or isinstance(train_splits, str)
      or not train_splits
      or not set(train_splits) <= {"train", "val"}
      or len(set(train_splits)) != len(train_splits)
  ):
    raise TasksetArgumentError(
        "train_splits",
        "train_splits must be a list of distinct splits among ['train', "
        "'val'] (test classes are never meta-trained on), got "
        f"{train_splits!r}",
    )
  if train_classes is not None:
    check_int("train_classes", train_classes, 1)
  check_int("train_class_group", train_class_group, 1)
  check_int("train_class_seed", train_class_seed, 0)
  if not isinstance(within_alphabet, bool):
    raise TasksetArgumentError(
        "within_alphabet",
        f"within_alphabet must be True or False, got {within_alphabet!r}",
    )
  if train_within_alphabet is not None and not isinstance(
      train_within_alphabet, bool
  ):
    raise TasksetArgumentError(
        "train_within_alphabet",
        "train_within_alphabet must be True, False or None (as "
        f"within_alphabet), got {train_within_alphabet!r}",
    )


def _check_data_dir(data_dir: Any) -> None:
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TasksetArgumentError(
        "data_dir", f"data_dir must be a path or None, got {data_dir!r}"
    )


def check_taskset_args(
    dataset: str,
    *,
    num_ways: int | None,
    num_shots: int,
    num_queries: int,
    train_num_ways: int | None = None,
    train_num_shots: int | None = None,
    train_num_queries: int | None = None,
    data_dir: str | os.PathLike | None = None,
    **options: Any,
) -> None:
  """Checks the arguments of :func:`get_tasksets` without loading any data.

  For validating a config before anything is loaded or compiled. What it
  cannot know without the data (more ways than a split has classes, more
  shots and queries than examples per class, more ``train_classes`` than
  the training split holds) :func:`get_tasksets` checks after loading.

  Raises:
    TasksetArgumentError: a ``ValueError`` whose message starts with the
      bad argument's name (kept in ``.argument``); an unknown dataset's
      message lists the registered ones.

  Examples:
    >>> try:
    ...   check_taskset_args("omniglot", num_ways=5, num_shots=1,
    ...                      num_queries=15, image_size=2)
    ... except ValueError as e:
    ...   print(e)
    image_size must be an int >= 4, got 2
  """
  _check_data_dir(data_dir)
  sizes = dict(
      num_ways=num_ways, num_shots=num_shots, num_queries=num_queries,
      train_num_ways=train_num_ways, train_num_shots=train_num_shots,
      train_num_queries=train_num_queries,
  )
  _resolve(dataset, sizes, options)


def get_tasksets(
    dataset: str,
    *,
    num_ways: int | None,
    num_shots: int,
    num_queries: int,
    train_num_ways: int | None = None,
    train_num_shots: int | None = None,
    train_num_queries: int | None = None,
    data_dir: str | os.PathLike | None = None,
    **options: Any,
) -> Tasksets:
  """The train, validation and test task samplers of a dataset.

  Validation and test episodes have ``num_ways`` classes, ``num_shots``
  support and ``num_queries`` query examples per class; meta-training
  episodes have ``train_num_ways``, ``train_num_shots`` and
  ``train_num_queries``, each ``None`` for the same as the test's.

  Datasets of class pools (:func:`list_datasets`: ``omniglot`` with
  ``image_size=28``, ``split_scheme="vinyals"``, ``rotations=True``;
  ``mini_imagenet`` with ``image_size=84``) are loaded from ``data_dir``,
  else ``$METALEARN_DATA_DIR``, else ``~/metalearn_data``. They take
  ``within_alphabet=False``: with ``True``, all classes of a validation or
  test episode come from one alphabet (Lake et al.'s 20-way one-shot
  runs; pools that keep each class's alphabet only, i.e. Omniglot), and
  ``train_within_alphabet=None`` (the same) or a bool for meta-training
  episodes. They also take
  the few-task options: ``train_splits=("train",)``, the splits whose
  classes are meta-trained on (``("train", "val")`` as Snell et al.'s final
  runs); ``train_classes=None``, or how many training classes (groups of
  ``train_class_group`` consecutive classes, e.g. 4 for an Omniglot
  character and its rotations) to keep, drawn with ``train_class_seed``
  (:func:`metalearn.data.restrict_classes`). Procedural families
  (``sinusoid``, with ``amplitude``, ``phase`` and ``x_range``) need
  ``num_ways=None`` and load nothing; their validation and test samplers
  are the same family (draw them with different keys).

  Args:
    dataset: a registered name (:func:`list_datasets`).
    num_ways: classes per validation and test episode (``None`` for
      regression).
    num_shots: support examples per class.
    num_queries: query examples per class.
    train_num_ways: classes per meta-training episode.
    train_num_shots: support examples per class in meta-training.
    train_num_queries: query examples per class in meta-training.
    data_dir: the data directory (a relative path is relative to the
      working directory).
    **options: the dataset's options (:func:`dataset_options`).

  Returns:
    :class:`Tasksets` ``(train, validation, test)`` of
    :class:`TaskSampler`.

  Raises:
    TasksetArgumentError: a ``ValueError`` naming the bad argument, from
      :func:`check_taskset_args`, or once the data are loaded if a split
      cannot supply the episodes (naming the split too).
    DatasetNotFoundError: if the data are not in the data directory; the
      message shows the absolute path tried and what to put there.

  Examples:
    >>> import jax
    >>> ts = get_tasksets("sinusoid", num_ways=None, num_shots=5,
    ...                   num_queries=10)
    >>> ts.train.sample(jax.random.key(0), ts.train.data).support_x.shape
    (5, 1)
    >>> ts = get_tasksets("omniglot", num_ways=5, num_shots=1,
    ...                   num_queries=15)  # doctest: +SKIP
    >>> ts.test.data.images.shape  # doctest: +SKIP
    (1692, 20, 28, 28, 1)
  """
  _check_data_dir(data_dir)
  sizes = dict(
      num_ways=num_ways, num_shots=num_shots, num_queries=num_queries,
      train_num_ways=train_num_ways, train_num_shots=train_num_shots,
      train_num_queries=train_num_queries,
  )
  request = _resolve(dataset, sizes, options)
  entry = request.entry
  own = {k: request.options[k] for k in entry.options}
  if entry.make_tasksets is not None:
    return entry.make_tasksets(request.train, request.test, **own)
  splits = entry.load_splits(data.resolve_data_dir(data_dir), **own)
  return _pool_tasksets(
      dataset, splits, request.train, request.test,
      **{k: request.options[k] for k in POOL_OPTIONS},
  )


def _train_pool(dataset, splits, *, train_splits, train_classes,
                train_class_group, train_class_seed, **unused):
  """The meta-training classes: ``train_splits`` merged, then restricted."""
  del unused  # The episode options.
  pool = data.merge_pools(*(getattr(splits, s) for s in train_splits))
  if train_classes is None:
    return pool
  where = f"the {dataset} training split ({'+'.join(train_splits)})"
  if pool.num_classes % train_class_group:
    raise TasksetArgumentError(
        "train_class_group",
        f"train_class_group={train_class_group} does not divide the "
        f"{pool.num_classes} classes of {where}",
    )
  groups = pool.num_classes // train_class_group
  if train_classes > groups:
    raise TasksetArgumentError(
        "train_classes",
        f"train_classes={train_classes} exceeds the {groups} groups of "
        f"train_class_group={train_class_group} classes in {where}",
    )
  try:
    return data.restrict_classes(
        pool, train_classes, seed=train_class_seed,
        group_size=train_class_group,
    )
  except ValueError as e:  # The class ids do not come in aligned groups.
    raise TasksetArgumentError(
        "train_class_group", f"train_class_group: {e} ({where})"
    ) from e


def _pool_tasksets(dataset, splits, train, test, **pool_options) -> Tasksets:
  within = pool_options["within_alphabet"]
  train_within = pool_options["train_within_alphabet"]
  within = {
      "test": within, "validation": within,
      "train": within if train_within is None else train_within,
  }
  pools = {
      "test": splits.test,
      "validation": splits.val,
      "train": _train_pool(dataset, splits, **pool_options),
  }
  samplers = {}
  # Test and validation first: they read num_ways itself, which
  # train_num_ways defaults to, so the error names what the user set.
  for split in ("test", "validation", "train"):
    shape, pool = (train if split == "train" else test), pools[split]
    validate_episode_request(
        num_classes=pool.num_classes,
        examples_per_class=pool.examples_per_class,
        **shape._asdict(),
        prefix="train_" if split == "train" else "",
        split=f"{dataset} {split}",
    )
    validate_within_alphabet(
        pool.alphabets,
        num_ways=shape.num_ways,
        within_alphabet=within[split],
        prefix="train_" if split == "train" else "",
        split=f"{dataset} {split}",
    )
    samplers[split] = episode_sampler(
        pool, **shape._asdict(), within_alphabet=within[split]
    )
  return Tasksets(**samplers)
