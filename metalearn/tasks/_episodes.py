"""Pure, on-device episode samplers for N-way K-shot classification."""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from metalearn.types import ClassPool, Episode

PyTree = Any


class TaskSampler(NamedTuple):
  """A distribution over episodes, as a pure function plus its data.

  ``sample(key, data) -> Episode`` draws one episode; it is jittable and has
  static output shapes. ``data`` is the pytree of arrays it reads (a
  :class:`ClassPool`, or ``None`` for synthetic families). Keeping the data out
  of the closure lets a jitted step take it as an argument instead of baking
  a 100 MB constant into the compiled program.
  """

  sample: Callable[[jax.Array, PyTree], Episode]
  data: PyTree


def sample_episode(
    key: jax.Array,
    pool: ClassPool,
    *,
    num_ways: int,
    num_shots: int,
    num_queries: int,
    within_alphabet: bool = False,
) -> Episode:
  """Draws one N-way K-shot episode from a class pool, on device.

  Classes are drawn without replacement from the pool, and their order is
  random, so label ``i`` names a different class in every episode. With
  ``within_alphabet``, an alphabet is drawn first, uniformly among those
  of ``pool.alphabets`` with at least ``num_ways`` classes, and all the
  episode's classes come from it (Lake et al.'s one-shot runs). Within each
  class, ``num_shots + num_queries`` distinct examples are drawn without
  replacement; the first ``num_shots`` form the support set, the rest the
  query set, so the two are disjoint. Pixels are gathered as ``uint8`` and
  only then converted to ``float32`` in ``[0, 1]``.

  Examples are grouped by label: ``support_y`` is ``[0]*K + [1]*K + ...``.

  Args:
    key: a PRNG key.
    pool: the classes to draw from.
    num_ways: ``N``, classes per episode (static).
    num_shots: ``K``, support examples per class (static).
    num_queries: ``Q``, query examples per class (static).
    within_alphabet: draw all classes from one alphabet (static); the pool
      must have ``alphabets``, one of them with ``num_ways`` classes
      (:func:`episode_sampler` checks this).

  Returns:
    An :class:`Episode` with ``support_x [N*K, H, W, C]`` and
    ``query_x [N*Q, H, W, C]`` as float32, labels as int32.

  References:
    Lake, Salakhutdinov & Tenenbaum, `Human-level concept learning through
    probabilistic program induction <https://doi.org/10.1126/science.aab3050>`_,
    2015.
  """
  num_classes, per_class = pool.images.shape[:2]
  image_shape = pool.images.shape[2:]
  class_key, example_key = jax.random.split(key)
  # The top N of i.i.d. uniform scores is a uniformly random ordered subset.
  # It costs O(classes), where jax.random.choice(replace=False) permutes all
  # classes (a sort) and dominated the sampling time on CPU.
  scores = jax.random.uniform(class_key, (num_classes,))
  if within_alphabet:
    if pool.alphabets is None:  # Static: fails at trace time, not in XLA.
      raise ValueError("within_alphabet=True, but the pool has no alphabets")
    alphabet_key, class_key = jax.random.split(class_key)
    scores = _mask_to_one_alphabet(
        alphabet_key, scores, jnp.asarray(pool.alphabets), num_ways
    )
  classes = jax.lax.top_k(scores, num_ways)[1]
  per_class_keys = jax.random.split(example_key, num_ways)
  take = num_shots + num_queries
  examples = jax.vmap(
      lambda k: jax.random.permutation(k, per_class)[:take]
  )(per_class_keys)
  # jnp.asarray: a host (NumPy) pool cannot be indexed by traced indices.
  images = jnp.asarray(pool.images)[classes[:, None], examples]  # [N,K+Q,...]
  images = images.astype(jnp.float32) / 255.0
  labels = jnp.arange(num_ways, dtype=jnp.int32)
  support_x = images[:, :num_shots].reshape(-1, *image_shape)
  query_x = images[:, num_shots:].reshape(-1, *image_shape)
  return Episode(
      support_x=support_x,
      support_y=jnp.repeat(labels, num_shots),
      query_x=query_x,
      query_y=jnp.repeat(labels, num_queries),
  )


def _mask_to_one_alphabet(
    key: jax.Array, scores: jax.Array, alphabets: jax.Array, num_ways: int
) -> jax.Array:
  """Scores of classes outside one random alphabet set to -1.

  The alphabet is uniform among those with at least ``num_ways`` classes:
  a class is drawn with weight ``1 / size of its alphabet`` among the
  classes of such alphabets, and its alphabet kept. Sizes come from a sort
  (``O(C log C)``), so any ``int32`` alphabet ids work, with static shapes.
  The scores are in ``[0, 1)``, so the top ``num_ways`` of the masked ones
  all lie in the drawn alphabet.
  """
  ordered = jnp.sort(alphabets)
  sizes = jnp.searchsorted(ordered, alphabets, side="right")
  sizes -= jnp.searchsorted(ordered, alphabets, side="left")
  logits = jnp.where(sizes >= num_ways, -jnp.log(sizes), -jnp.inf)
  chosen = alphabets[jax.random.categorical(key, logits)]
  return jnp.where(alphabets == chosen, scores, -1.0)


def episode_sampler(
    pool: ClassPool,
    *,
    num_ways: int,
    num_shots: int,
    num_queries: int,
    within_alphabet: bool = False,
) -> TaskSampler:
  """Builds a :class:`TaskSampler` of N-way K-shot episodes over ``pool``.

  Validates the request on the host, before anything compiles.

  Args:
    pool: the classes to draw from (one split of a dataset).
    num_ways: classes per episode.
    num_shots: support examples per class.
    num_queries: query examples per class.
    within_alphabet: draw each episode's classes from one alphabet.

  Returns:
    A sampler whose ``sample(key, pool)`` is :func:`sample_episode`.

  Raises:
    ValueError: if the pool cannot supply such episodes.

  Examples:
    >>> import jax, numpy as np
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((10, 20, 28, 28, 1), np.uint8),
    ...                  np.arange(10, dtype=np.int32))
    >>> sampler = episode_sampler(pool, num_ways=5, num_shots=1,
    ...                           num_queries=15)
    >>> ep = sampler.sample(jax.random.key(0), sampler.data)
    >>> ep.support_x.shape, ep.query_y.shape
    ((5, 28, 28, 1), (75,))
  """
  validate_episode_request(
      num_classes=pool.images.shape[0],
      examples_per_class=pool.images.shape[1],
      num_ways=num_ways,
      num_shots=num_shots,
      num_queries=num_queries,
  )
  validate_within_alphabet(
      pool.alphabets, num_ways=num_ways, within_alphabet=within_alphabet
  )
  sample = functools.partial(
      sample_episode,
      num_ways=num_ways,
      num_shots=num_shots,
      num_queries=num_queries,
      within_alphabet=within_alphabet,
  )
  return TaskSampler(sample=sample, data=pool)


class TasksetArgumentError(ValueError):
  """A bad argument of a task distribution; ``argument`` is its name.

  The message names the argument too (``train_num_ways=30 exceeds ...``), so
  a caller that maps arguments to its own names (a config's ``task.*``
  fields) can read either.
  """

  def __init__(self, argument: str, message: str):
    super().__init__(message)
    self.argument = argument


def validate_episode_request(
    *,
    num_classes: int,
    examples_per_class: int,
    num_ways: int,
    num_shots: int,
    num_queries: int,
    prefix: str = "",
    split: str | None = None,
) -> None:
  """Raises an error naming the argument if an episode cannot be drawn.

  Args:
    num_classes: classes in the pool.
    examples_per_class: examples of each class in the pool.
    num_ways: classes per episode.
    num_shots: support examples per class.
    num_queries: query examples per class.
    prefix: put before the argument names in messages, e.g. ``"train_"``
      for ``train_num_ways``.
    split: names the pool in messages, e.g. ``"omniglot train"``; by
      default "the pool".

  Raises:
    TasksetArgumentError: a ``ValueError`` whose ``argument`` is the
      (prefixed) name of the first bad argument.

  Examples:
    >>> try:
    ...   validate_episode_request(
    ...       num_classes=3, examples_per_class=20, num_ways=5,
    ...       num_shots=1, num_queries=15, prefix="train_", split="test")
    ... except ValueError as e:
    ...   print(e.argument)
    ...   print(e)
    train_num_ways
    train_num_ways=5 exceeds the 3 classes in the test split
  """
  ways, shots, queries = (
      f"{prefix}num_ways", f"{prefix}num_shots", f"{prefix}num_queries"
  )
  where = "the pool" if split is None else f"the {split} split"
  for name, value in ((ways, num_ways), (shots, num_shots)):
    if not isinstance(value, int) or value < 1:
      raise TasksetArgumentError(
          name, f"{name} must be a positive int, got {value!r}"
      )
  if not isinstance(num_queries, int) or num_queries < 0:
    raise TasksetArgumentError(
        queries,
        f"{queries} must be a non-negative int, got {num_queries!r}",
    )
  if num_ways > num_classes:
    raise TasksetArgumentError(
        ways,
        f"{ways}={num_ways} exceeds the {num_classes} classes in {where}",
    )
  if num_shots + num_queries > examples_per_class:
    raise TasksetArgumentError(
        shots,
        f"{shots} + {queries} = {num_shots} + {num_queries} exceeds the "
        f"{examples_per_class} examples per class in {where}",
    )


def validate_within_alphabet(
    alphabets: ArrayLike | None,
    *,
    num_ways: int,
    within_alphabet: bool,
    prefix: str = "",
    split: str | None = None,
) -> None:
  """Raises an error naming ``within_alphabet`` if its episodes cannot be
  drawn: the pool has no alphabets, or none with ``num_ways`` classes.

  Args:
    alphabets: the pool's ``alphabets`` (host or device array), or
      ``None``.
    num_ways: classes per episode.
    within_alphabet: the request; nothing is checked if ``False``.
    prefix: put before the argument names, e.g. ``"train_"``.
    split: names the pool in messages; by default "the pool".

  Raises:
    TasksetArgumentError: a ``ValueError`` whose ``argument`` is the
      (prefixed) ``within_alphabet``.

  Examples:
    >>> import numpy as np
    >>> try:
    ...   validate_within_alphabet(np.array([0, 0, 1]), num_ways=3,
    ...                            within_alphabet=True)
    ... except ValueError as e:
    ...   print(e.argument)
    within_alphabet
  """
  name, ways = f"{prefix}within_alphabet", f"{prefix}num_ways"
  if not isinstance(within_alphabet, bool):
    raise TasksetArgumentError(
        name, f"{name} must be True or False, got {within_alphabet!r}"
    )
  if not within_alphabet:
    return
  where = "the pool" if split is None else f"the {split} split"
  if alphabets is None:
    raise TasksetArgumentError(
        name,
        f"{name}=True needs the alphabet of each class, but {where} has no "
        "alphabets (only Omniglot's pools have them)",
    )
  _, sizes = np.unique(np.asarray(alphabets), return_counts=True)
  largest = int(sizes.max()) if sizes.size else 0
  if largest < num_ways:
    raise TasksetArgumentError(
        name,
        f"{name}=True needs an alphabet of {ways}={num_ways} classes, but "
        f"the largest of {where} has {largest}",
    )


def sample_batch(
    sampler: TaskSampler, key: jax.Array, batch_size: int
) -> Episode:
  """Draws ``batch_size`` independent episodes with a vmap over split keys.

  Args:
    sampler: the task distribution.
    key: a PRNG key; episode ``i`` uses ``jax.random.split(key, B)[i]``.
    batch_size: number of episodes ``B`` (static).

  Returns:
    An :class:`Episode` whose fields have a leading ``[B]`` axis.
  """
  keys = jax.random.split(key, batch_size)
  return jax.vmap(sampler.sample, in_axes=(0, None))(keys, sampler.data)
