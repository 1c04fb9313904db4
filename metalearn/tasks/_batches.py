"""Ordinary labelled mini-batches over all classes of a pool (pretraining)."""

import functools

import jax
import jax.numpy as jnp

from metalearn.tasks._episodes import TaskSampler
from metalearn.types import ClassPool, Episode


def sample_images(
    key: jax.Array, pool: ClassPool, *, batch_size: int
) -> Episode:
  """Draws a mini-batch of labelled images over all classes, on device.

  Each of the ``batch_size`` images is an independent uniform draw over the
  ``(class, example)`` pairs of the pool, *with* replacement: one
  ``randint`` over the flat index, so the cost is ``O(batch_size)`` and the
  batch is a pure function of the key (a resumed run draws the same
  batches). Without replacement would need a permutation of all the
  pool's images per step (Omniglot's training pool holds 82,240); with it,
  a batch of 128 repeats some image with probability about 10%, a
  negligible change to the gradient's distribution. There are no epochs:
  every step draws from the whole pool.

  Labels are *global*: the class's index in the pool, ``int32`` in
  ``[0, num_classes)``, the same class always carrying the same label (the
  target of a classifier over all the pool's classes). Pixels are gathered
  as ``uint8`` and only then converted to ``float32`` in ``[0, 1]``, as in
  :func:`~metalearn.tasks.sample_episode`.

  The batch is returned as an :class:`Episode` whose support set is the
  batch and whose query set is empty (``[0, H, W, C]`` and ``[0]``), so it
  travels through the trainer's sampling, task mapping and sharding as an
  episode does; a learner trained on it reads all the labelled images of
  the episode, support and query alike.

  Args:
    key: a PRNG key.
    pool: the classes to draw from.
    batch_size: images per batch (static).

  Returns:
    An :class:`Episode`: ``support_x [B, H, W, C]`` float32,
    ``support_y [B]`` int32 global labels, ``query_x [0, H, W, C]``,
    ``query_y [0]``.
  """
  num_classes, per_class = pool.images.shape[:2]
  image_shape = pool.images.shape[2:]
  flat = jax.random.randint(key, (batch_size,), 0, num_classes * per_class)
  labels = (flat // per_class).astype(jnp.int32)
  examples = flat % per_class
  # jnp.asarray: a host (NumPy) pool cannot be indexed by traced indices.
  images = jnp.asarray(pool.images)[labels, examples]
  images = images.astype(jnp.float32) / 255.0
  return Episode(
      support_x=images,
      support_y=labels,
      query_x=jnp.zeros((0, *image_shape), jnp.float32),
      query_y=jnp.zeros((0,), jnp.int32),
  )


def batch_sampler(pool: ClassPool, batch_size: int) -> TaskSampler:
  """A :class:`TaskSampler` of ordinary mini-batches with global labels.

  What supervised pretraining (Chen et al.'s Baseline and Baseline++,
  Tian et al.'s RFS) trains on: :func:`sample_images` over all classes of
  ``pool``. Meta-learners that pretrain use it as their
  :attr:`~metalearn.metalearners.MetaLearner.train_sampler`, so the
  trainer's meta-batch of ``B`` "tasks" is ``B`` mini-batches.

  Args:
    pool: the classes to draw from (one split of a dataset).
    batch_size: images per batch, a positive int.

  Returns:
    A sampler whose ``sample(key, pool)`` is :func:`sample_images`.

  Raises:
    ValueError: if ``batch_size`` is not a positive int or the pool is
      empty.

  Examples:
    >>> import jax, numpy as np
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((10, 20, 28, 28, 1), np.uint8),
    ...                  np.arange(10, dtype=np.int32))
    >>> sampler = batch_sampler(pool, 64)
    >>> batch = sampler.sample(jax.random.key(0), sampler.data)
    >>> batch.support_x.shape, batch.support_y.dtype, batch.query_y.shape
    ((64, 28, 28, 1), dtype('int32'), (0,))

  References:
    Chen, Liu, Kira, Wang & Huang, `A Closer Look at Few-shot
    Classification <https://arxiv.org/abs/1904.04232>`_, ICLR 2019.

    Tian, Wang, Krishnan, Tenenbaum & Isola, `Rethinking Few-Shot Image
    Classification: a Good Embedding Is All You Need?
    <https://arxiv.org/abs/2003.11539>`_, ECCV 2020.
  """
  if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
      or batch_size < 1):
    raise ValueError(
        f"batch_size must be a positive int, got {batch_size!r}")
  num_classes, per_class = pool.images.shape[:2]
  if num_classes * per_class == 0:
    raise ValueError("batch_size: the pool has no images to draw from")
  sample = functools.partial(sample_images, batch_size=batch_size)
  return TaskSampler(sample=sample, data=pool)
