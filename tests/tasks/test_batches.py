"""Tests for the mini-batch sampler of supervised pretraining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import tasks
from metalearn.types import ClassPool

NUM_CLASSES, PER_CLASS = 7, 3


def _pool():
  """Every image distinct: pixel (0, 0) holds its class, (0, 1) its
  example, the rest is noise."""
  images = np.random.default_rng(0).integers(
      0, 256, (NUM_CLASSES, PER_CLASS, 5, 5, 1), dtype=np.uint8)
  images[:, :, 0, 0, 0] = np.arange(NUM_CLASSES)[:, None]
  images[:, :, 0, 1, 0] = np.arange(PER_CLASS)[None, :]
  return ClassPool(jnp.asarray(images),
                   jnp.arange(NUM_CLASSES, dtype=jnp.int32) * 4 + 1)


def _draw(sampler, seed):
  return jax.jit(sampler.sample)(jax.random.key(seed), sampler.data)


def test_shapes_dtypes_and_range():
  sampler = tasks.batch_sampler(_pool(), 16)
  batch = _draw(sampler, 0)
  assert batch.support_x.shape == (16, 5, 5, 1)
  assert batch.support_x.dtype == jnp.float32
  assert batch.support_y.shape == (16,)
  assert batch.support_y.dtype == jnp.int32
  assert batch.query_x.shape == (0, 5, 5, 1)
  assert batch.query_x.dtype == jnp.float32
  assert batch.query_y.shape == (0,)
  assert batch.query_y.dtype == jnp.int32
  x = np.asarray(batch.support_x)
  assert x.min() >= 0.0 and x.max() <= 1.0
  y = np.asarray(batch.support_y)
  assert y.min() >= 0 and y.max() < NUM_CLASSES


def test_labels_are_global_and_match_the_images():
  pool = _pool()
  batch = _draw(tasks.batch_sampler(pool, 64), 1)
  images = np.asarray(pool.images)
  x = np.asarray(batch.support_x)
  for image, label in zip(x, np.asarray(batch.support_y), strict=True):
    # The pool's index of the class, not its class id or an episode label.
    assert round(image[0, 0, 0] * 255) == label
    example = round(image[0, 1, 0] * 255)
    # The whole image is the pool's (up to float32 rounding of / 255).
    np.testing.assert_array_equal(np.rint(image * 255).astype(np.uint8),
                                  images[label, example])
    np.testing.assert_allclose(image, images[label, example] / 255.0,
                               atol=1e-6)


def test_same_key_same_batch_and_keys_differ():
  sampler = tasks.batch_sampler(_pool(), 32)
  first, again, other = (_draw(sampler, s) for s in (3, 3, 4))
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first.support_x, other.support_x)


def test_draws_cover_every_image_uniformly():
  pool = _pool()
  sampler = tasks.batch_sampler(pool, 64)
  draws = jax.jit(jax.vmap(sampler.sample, (0, None)))(
      jax.random.split(jax.random.key(5), 50), pool)
  x = np.asarray(draws.support_x).reshape(-1, 5, 5, 1)
  pairs = (np.rint(x[:, 0, 0, 0] * 255).astype(int) * PER_CLASS
           + np.rint(x[:, 0, 1, 0] * 255).astype(int))
  counts = np.bincount(pairs, minlength=NUM_CLASSES * PER_CLASS)
  assert set(np.asarray(draws.support_y).ravel()) == set(range(NUM_CLASSES))
  assert counts.min() > 0
  # 3200 draws over 21 pairs: about 152 each, sd about 12.
  expected = x.shape[0] / counts.size
  assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)


def test_sampler_runs_on_a_host_pool():
  pool = _pool()
  host = ClassPool(np.asarray(pool.images), np.asarray(pool.class_ids))
  batch = tasks.batch_sampler(host, 4).sample(jax.random.key(0), host)
  assert batch.support_x.shape == (4, 5, 5, 1)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, True, None])
def test_bad_batch_size_is_rejected(batch_size):
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    tasks.batch_sampler(_pool(), batch_size)
