"""Meta-training class sets: a restricted subset, or splits merged."""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from metalearn.types import ClassPool


def restrict_classes(
    pool: ClassPool,
    num_classes: int | None = None,
    *,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    group_size: int = 1,
) -> ClassPool:
  """Keeps a subset of a pool's classes, for few-task meta-learning.

  With few meta-training classes there are few distinct tasks, the regime
  that task interpolation (``metalearners.mlti``) targets. Drawn classes
  keep their pool order; the arrays stay on the pool's device.

  ``group_size`` keeps aligned groups of consecutive classes together. For
  Omniglot loaded with rotations, class ``4c + r`` is character ``c``
  rotated by ``90 r`` degrees, so ``group_size=4`` draws whole characters:

  - ``restrict_classes(omniglot.train, 50, group_size=4)``: 50 characters,
    each with its 4 rotations as classes (200 classes);
  - ``restrict_classes(omniglot.train, 50)``: 50 classes, drawn among all
    (character, rotation) classes;
  - on a pool loaded with ``rotations=False``: 50 characters, no rotations.

  For Mini-ImageNet-S (Yao et al.) keep 12 of the 64 training classes:
  ``restrict_classes(mini.train, 12)``. The authors' code takes the first
  12 of a fixed permutation of the classes in the order of the pickle
  caches (rows 26, 59, 14, 16, 17, 52, 8, 39, 46, 32, 20, 57); pass those
  as ``classes`` to use the same ones, if your pool has that class order.

  Args:
    pool: the pool (a meta-training split).
    num_classes: how many classes (or groups) to keep, drawn without
      replacement with ``numpy.random.default_rng(seed)``.
    seed: the draw's seed (a host-side choice, made once).
    classes: instead of a draw, the indices of the classes (or groups) to
      keep, in ``[0, pool.num_classes // group_size)``.
    group_size: classes per group; the pool's class ids must come in
      aligned groups (``class_ids // group_size`` equal within a group).

  Returns:
    The smaller :class:`~metalearn.types.ClassPool`.

  Raises:
    ValueError: naming the argument, if the request does not fit the pool.

  Examples:
    >>> import numpy as np
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((40, 2, 4, 4, 1), np.uint8),
    ...                  np.arange(40, dtype=np.int32))
    >>> restrict_classes(pool, 3, group_size=4).num_classes
    12
    >>> restrict_classes(pool, classes=[0, 5]).class_ids.tolist()
    [0, 5]
  """
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
  total = pool.images.shape[0]
  if total % group_size:
    raise ValueError(
        f"group_size={group_size} does not divide the {total} classes of "
        "the pool"
    )
  num_groups = total // group_size
  ids = np.asarray(pool.class_ids).reshape(num_groups, group_size)
  if group_size > 1 and np.any(ids // group_size != ids[:, :1] // group_size):
    raise ValueError(
        f"the pool's class ids do not come in aligned groups of "
        f"{group_size} (class_ids // {group_size} differs within a group)"
    )
  if (num_classes is None) == (classes is None):
    raise ValueError("pass exactly one of num_classes and classes")
  if classes is None:
    if not isinstance(num_classes, int) or not 1 <= num_classes <= num_groups:
      raise ValueError(
          f"num_classes must be an int in [1, {num_groups}], got "
          f"{num_classes!r}"
      )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(num_groups, num_classes, replace=False))
  else:
    chosen = np.asarray(classes, np.int64)
    if (
        chosen.ndim != 1
        or not chosen.size
        or chosen.min() < 0
        or chosen.max() >= num_groups
        or len(np.unique(chosen)) != chosen.size
    ):
      raise ValueError(
          f"classes must be distinct indices in [0, {num_groups}), got "
          f"{classes!r}"
      )
  rows = (chosen[:, None] * group_size + np.arange(group_size)).reshape(-1)
  alphabets = None if pool.alphabets is None else pool.alphabets[rows]
  return ClassPool(pool.images[rows], pool.class_ids[rows], alphabets)


def merge_pools(*pools: ClassPool) -> ClassPool:
  """One pool holding the classes of several, in the order given.

  Snell et al. (2017) meta-train their final Omniglot and Mini-ImageNet
  models on the training and validation classes together, once early
  stopping on validation has fixed the schedule: ``merge_pools(splits.train,
  splits.val)`` is that class set (``task.train_splits: [train, val]`` in an
  experiment config).

  Args:
    *pools: at least one pool; all with the same examples per class and
      image shape, and no class id in two of them.

  Returns:
    The merged :class:`~metalearn.types.ClassPool` (arrays concatenated on
    the pools' device; alphabets kept if every pool has them).

  Raises:
    ValueError: if no pool is given, the shapes differ or a class repeats.

  Examples:
    >>> import numpy as np
    >>> from metalearn.types import ClassPool
    >>> a = ClassPool(np.zeros((3, 2, 4, 4, 1), np.uint8), np.arange(3))
    >>> b = ClassPool(np.ones((2, 2, 4, 4, 1), np.uint8), np.arange(3, 5))
    >>> merge_pools(a, b).class_ids.tolist()
    [0, 1, 2, 3, 4]
  """
  if not pools:
    raise ValueError("merge_pools needs at least one pool")
  shapes = {tuple(p.images.shape[1:]) for p in pools}
  if len(shapes) != 1:
    raise ValueError(
        "pools differ in examples per class or image shape: "
        f"{sorted(shapes)}"
    )
  ids = np.concatenate([np.asarray(p.class_ids) for p in pools])
  if len(np.unique(ids)) != ids.size:
    raise ValueError("a class id appears in more than one pool")
  if len(pools) == 1:
    return pools[0]
  # Alphabets survive only if every pool has them: a within-alphabet
  # episode must not draw from classes of unknown alphabet.
  alphabets = None
  if all(p.alphabets is not None for p in pools):
    alphabets = jnp.concatenate([jnp.asarray(p.alphabets) for p in pools])
  return ClassPool(
      jnp.concatenate([jnp.asarray(p.images) for p in pools]),
      jnp.concatenate([jnp.asarray(p.class_ids) for p in pools]),
      alphabets,
  )
