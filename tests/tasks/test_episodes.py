"""Properties of the N-way K-shot episode sampler.

Shapes, label counts and value ranges are checked on the real Omniglot
meta-train pool. Exact properties (disjointness, one class per label, classes
from the requested split) use a synthetic pool whose pixels encode the class
and example index of each image.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.tasks import (
    episode_sampler,
    sample_batch,
    sample_episode,
    validate_episode_request,
)
from metalearn.types import ClassPool, Episode

SETTINGS = [
    pytest.param(5, 1, 15, id="5way-1shot-15query"),
    pytest.param(20, 5, 15, id="20way-5shot-15query"),
]


def _dims(num_ways, num_shots, num_queries, **extra) -> chex.Dimensions:
  return chex.Dimensions(
      N=num_ways, K=num_shots, Q=num_queries, H=28, W=28, C=1, **extra
  )


# Compiling takes about a second on CPU, so tests share jitted samplers: one
# per request, cached here, with the pool passed as an argument.


@functools.cache
def _jitted_sample(num_ways, num_shots, num_queries):
  def sample(key, pool):
    sampler = episode_sampler(
        pool, num_ways=num_ways, num_shots=num_shots, num_queries=num_queries
    )
    return sampler.sample(key, sampler.data)

  return jax.jit(sample)


@functools.cache
def _jitted_batch(batch_size, num_ways, num_shots, num_queries):
  def batch(key, pool):
    sampler = episode_sampler(
        pool, num_ways=num_ways, num_shots=num_shots, num_queries=num_queries
    )
    return sample_batch(sampler, key, batch_size)

  return jax.jit(batch)


def _sample(pool, key, **request) -> Episode:
  return _jitted_sample(**request)(key, pool)


def _sample_batch(pool, key, batch_size, **request) -> Episode:
  return _jitted_batch(batch_size, **request)(key, pool)


# ---------------------------------------------------------------------------
# A synthetic pool that says where each image came from.


def coded_pool(codes, examples_per_class=20) -> ClassPool:
  """Images ``[C, E, 2, 2, 1]`` with pixel (0, 0) = class code, (0, 1) = E.

  Class ids equal the codes, as for a split of a larger coded dataset.
  """
  codes = np.asarray(codes)
  images = np.zeros((len(codes), examples_per_class, 2, 2, 1), np.uint8)
  images[:, :, 0, 0, 0] = codes[:, None]
  images[:, :, 0, 1, 0] = np.arange(examples_per_class)[None, :]
  return ClassPool(jnp.asarray(images), jnp.asarray(codes, jnp.int32))


def decode(x) -> tuple[np.ndarray, np.ndarray]:
  """(class code, example index) of each image in ``x [..., 2, 2, 1]``."""
  pixels = np.rint(np.asarray(x) * 255).astype(np.int64)
  return pixels[..., 0, 0, 0], pixels[..., 0, 1, 0]


EVEN_SPLIT = np.arange(0, 80, 2)  # 40 classes of an 80-class coded dataset.


@pytest.fixture(scope="module")
def coded_batch():
  """64 coded 5-way 3-shot 10-query episodes from the even-numbered classes."""
  return _sample_batch(
      coded_pool(EVEN_SPLIT),
      jax.random.key(0),
      64,
      num_ways=5,
      num_shots=3,
      num_queries=10,
  )


# ---------------------------------------------------------------------------
# Real Omniglot pool.


@pytest.mark.parametrize("num_ways,num_shots,num_queries", SETTINGS)
def test_shapes_and_dtypes(omniglot, num_ways, num_shots, num_queries):
  ep = _sample(
      omniglot.train,
      jax.random.key(0),
      num_ways=num_ways,
      num_shots=num_shots,
      num_queries=num_queries,
  )
  dims = _dims(num_ways, num_shots, num_queries)
  chex.assert_shape(ep.support_x, dims["(NK)HWC"])
  chex.assert_shape(ep.support_y, dims["(NK)"])
  chex.assert_shape(ep.query_x, dims["(NQ)HWC"])
  chex.assert_shape(ep.query_y, dims["(NQ)"])
  chex.assert_type([ep.support_x, ep.query_x], jnp.float32)
  chex.assert_type([ep.support_y, ep.query_y], jnp.int32)


@pytest.mark.parametrize("num_ways,num_shots,num_queries", SETTINGS)
def test_each_label_appears_k_and_q_times(
    omniglot, num_ways, num_shots, num_queries
):
  ep = _sample(
      omniglot.train,
      jax.random.key(1),
      num_ways=num_ways,
      num_shots=num_shots,
      num_queries=num_queries,
  )
  np.testing.assert_array_equal(
      np.bincount(ep.support_y, minlength=num_ways), [num_shots] * num_ways
  )
  np.testing.assert_array_equal(
      np.bincount(ep.query_y, minlength=num_ways), [num_queries] * num_ways
  )
  # Documented layout: grouped by label.
  np.testing.assert_array_equal(
      ep.support_y, np.repeat(np.arange(num_ways), num_shots)
  )


def test_values_are_pool_pixels_in_unit_interval(omniglot):
  ep = _sample(
      omniglot.train,
      jax.random.key(2),
      num_ways=20,
      num_shots=5,
      num_queries=15,
  )
  for x in (ep.support_x, ep.query_x):
    x = np.asarray(x)
    assert x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x * 255, np.rint(x * 255), atol=1e-4)


def test_images_come_from_the_pool(omniglot):
  pool = omniglot.train
  known = {img.tobytes() for img in np.asarray(pool.images).reshape(
      -1, *pool.image_shape
  )}
  ep = _sample(
      pool, jax.random.key(3), num_ways=20, num_shots=5, num_queries=15
  )
  for x in (ep.support_x, ep.query_x):
    as_uint8 = np.rint(np.asarray(x) * 255).astype(np.uint8)
    assert all(img.tobytes() in known for img in as_uint8)


def test_same_key_same_episode(omniglot):
  request = dict(num_ways=5, num_shots=1, num_queries=15)
  first = _sample(omniglot.train, jax.random.key(4), **request)
  again = _sample(omniglot.train, jax.random.key(4), **request)
  other = _sample(omniglot.train, jax.random.key(5), **request)
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first.support_x, other.support_x)


BATCH = dict(num_ways=5, num_shots=1, num_queries=15)


def test_sample_batch_shapes(omniglot):
  eps = _sample_batch(omniglot.train, jax.random.key(6), 4, **BATCH)
  dims = _dims(**BATCH, B=4)
  chex.assert_shape(eps.support_x, dims["B(NK)HWC"])
  chex.assert_shape(eps.support_y, dims["B(NK)"])
  chex.assert_shape(eps.query_x, dims["B(NQ)HWC"])
  chex.assert_shape(eps.query_y, dims["B(NQ)"])
  chex.assert_type([eps.support_x, eps.support_y], [jnp.float32, jnp.int32])


def test_sample_batch_episode_i_uses_split_key_i(omniglot):
  key = jax.random.key(7)
  eps = _sample_batch(omniglot.train, key, 4, **BATCH)
  for i, sub in enumerate(jax.random.split(key, 4)):
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x, i=i: x[i], eps),
        _sample(omniglot.train, sub, **BATCH),
    )


def test_tasks_in_a_batch_differ(omniglot):
  eps = _sample_batch(omniglot.train, jax.random.key(8), 4, **BATCH)
  support = np.asarray(eps.support_x)
  for i in range(len(support)):
    for j in range(i):
      assert not np.array_equal(support[i], support[j]), (i, j)


def test_sample_batch_under_vmap(omniglot):
  sampler = episode_sampler(omniglot.train, **BATCH)

  @jax.jit
  def batches(keys, data):
    s = sampler._replace(data=data)
    return jax.vmap(lambda k: sample_batch(s, k, 4))(keys)

  eps = batches(jax.random.split(jax.random.key(9), 3), sampler.data)
  dims = _dims(**BATCH, D=3, B=4)
  chex.assert_shape(eps.support_x, dims["DB(NK)HWC"])
  chex.assert_shape(eps.support_y, dims["DB(NK)"])
  chex.assert_shape(eps.query_x, dims["DB(NQ)HWC"])
  chex.assert_shape(eps.query_y, dims["DB(NQ)"])


def test_no_retrace_across_steps(omniglot):
  sampler = episode_sampler(omniglot.train, **BATCH)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(key, data):
    return sample_batch(sampler._replace(data=data), key, 4).support_x

  chex.clear_trace_counter()
  key = jax.random.key(10)
  seen = []
  for _ in range(4):
    key, sub = jax.random.split(key)
    seen.append(np.asarray(step(sub, sampler.data)))
  assert not np.array_equal(seen[0], seen[-1])  # New keys, new episodes.


# ---------------------------------------------------------------------------
# Synthetic coded pool: exact provenance of every image.


def test_support_and_query_are_disjoint(coded_batch):
  sc, se = decode(coded_batch.support_x)
  qc, qe = decode(coded_batch.query_x)
  for task in range(len(sc)):
    support = set(zip(sc[task], se[task], strict=True))
    query = set(zip(qc[task], qe[task], strict=True))
    assert len(support) == sc.shape[1]  # No example drawn twice.
    assert len(query) == qc.shape[1]
    assert not support & query


def test_each_label_names_one_distinct_class(coded_batch):
  sc, _ = decode(coded_batch.support_x)
  qc, _ = decode(coded_batch.query_x)
  sy, qy = np.asarray(coded_batch.support_y), np.asarray(coded_batch.query_y)
  for task in range(len(sc)):
    classes = []
    for label in range(5):
      codes = set(sc[task][sy[task] == label])
      codes |= set(qc[task][qy[task] == label])
      assert len(codes) == 1, (task, label, codes)
      classes.append(codes.pop())
    assert len(set(classes)) == 5  # Distinct classes within an episode.


def test_classes_come_from_the_requested_split(coded_batch):
  sc, _ = decode(coded_batch.support_x)
  qc, _ = decode(coded_batch.query_x)
  seen = set(sc.ravel()) | set(qc.ravel())
  # All drawn from the even split, and 64 episodes reach all of its classes.
  assert seen == set(EVEN_SPLIT.tolist())


def test_class_order_is_random(coded_batch):
  sc, _ = decode(coded_batch.support_x)
  label_zero = sc[:, 0]
  assert len(set(label_zero)) > 10
  orders = {tuple(row[::3]) for row in sc}  # The class of each label.
  assert len(orders) == len(sc)


def test_examples_are_spread_over_the_class(coded_batch):
  _, se = decode(coded_batch.support_x)
  _, qe = decode(coded_batch.query_x)
  assert set(se.ravel()) | set(qe.ravel()) == set(range(20))


def test_all_examples_used_when_shots_plus_queries_fill_the_class():
  pool = coded_pool(np.arange(6), examples_per_class=4)
  ep = jax.jit(
      functools.partial(sample_episode, num_ways=6, num_shots=1, num_queries=3)
  )(jax.random.key(11), pool)
  sc, se = decode(ep.support_x)
  qc, qe = decode(ep.query_x)
  pairs = set(zip(sc, se, strict=True)) | set(zip(qc, qe, strict=True))
  assert pairs == {(c, e) for c in range(6) for e in range(4)}


# ---------------------------------------------------------------------------
# Impossible requests fail on the host with a clear message.


@pytest.mark.parametrize(
    "request_,match",
    [
        pytest.param(
            dict(num_ways=41, num_shots=1, num_queries=1),
            r"num_ways=41 exceeds the 40 classes in the pool",
            id="more-ways-than-classes",
        ),
        pytest.param(
            dict(num_ways=5, num_shots=5, num_queries=16),
            r"num_shots \+ num_queries = 5 \+ 16 exceeds the 20 examples "
            r"per class",
            id="shots-plus-queries-exceed-examples",
        ),
        pytest.param(
            dict(num_ways=0, num_shots=1, num_queries=1),
            r"num_ways must be a positive int, got 0",
            id="zero-ways",
        ),
        pytest.param(
            dict(num_ways=5, num_shots=-1, num_queries=1),
            r"num_shots must be a positive int, got -1",
            id="negative-shots",
        ),
        pytest.param(
            dict(num_ways=5, num_shots=1, num_queries=-2),
            r"num_queries must be a non-negative int, got -2",
            id="negative-queries",
        ),
        pytest.param(
            dict(num_ways=5.0, num_shots=1, num_queries=1),
            r"num_ways must be a positive int, got 5\.0",
            id="float-ways",
        ),
    ],
)
def test_impossible_requests_raise(request_, match):
  pool = coded_pool(EVEN_SPLIT)
  with pytest.raises(ValueError, match=match):
    episode_sampler(pool, **request_)
  with pytest.raises(ValueError, match=match):
    validate_episode_request(
        num_classes=40, examples_per_class=20, **request_
    )


def test_more_ways_than_real_classes_raises(omniglot):
  n = omniglot.val.num_classes
  with pytest.raises(ValueError, match=rf"num_ways={n + 1} exceeds the {n} "):
    episode_sampler(omniglot.val, num_ways=n + 1, num_shots=1, num_queries=1)


def test_zero_queries_allowed():
  pool = coded_pool(EVEN_SPLIT)
  ep = _sample(
      pool, jax.random.key(12), num_ways=3, num_shots=2, num_queries=0
  )
  chex.assert_shape([ep.support_x, ep.query_x], [(6, 2, 2, 1), (0, 2, 2, 1)])
  chex.assert_shape(ep.query_y, (0,))
