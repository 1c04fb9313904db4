"""Within-alphabet episodes (Lake et al.'s one-shot protocol).

The real Omniglot pools of the ``lake`` split check that every episode of
every split comes from one alphabet (classes are told apart by matching the
episode's pixels against the pool). A synthetic pool whose pixels encode the
class index checks determinism and the distribution over alphabets. Errors
are checked on both.
"""

import functools

import jax
import numpy as np
import pytest

from metalearn import data, experiment, tasks
from metalearn.types import ClassPool

LAKE = dict(
    split_scheme="lake", rotations=False, within_alphabet=True, num_ways=20,
    num_shots=1, num_queries=1,
)


@functools.cache
def _batch_fn(sampler_sample, batch_size):
  return jax.jit(
      lambda key, pool: jax.vmap(sampler_sample, in_axes=(0, None))(
          jax.random.split(key, batch_size), pool
      )
  )


def _draw(sampler, key, batch_size):
  return _batch_fn(sampler.sample, batch_size)(key, sampler.data)


@pytest.fixture(scope="module")
def lake_tasksets(data_dir):
  return tasks.get_tasksets("omniglot", data_dir=data_dir, **LAKE)


def _classes_of(images: np.ndarray, pool: ClassPool) -> np.ndarray:
  """The pool class of each episode image, found by its exact pixels."""
  pixels = np.asarray(pool.images)
  owner = {}
  for c in range(pixels.shape[0]):
    for image in pixels[c]:
      owner.setdefault(image.tobytes(), set()).add(c)
  as_uint8 = np.rint(np.asarray(images) * 255).astype(np.uint8)
  found = [owner[x.tobytes()] for x in as_uint8.reshape(-1, *pixels.shape[2:])]
  assert all(len(f) == 1 for f in found)
  return np.array([min(f) for f in found]).reshape(as_uint8.shape[:2])


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_episode_comes_from_one_alphabet(lake_tasksets, split):
  sampler = getattr(lake_tasksets, split)
  episodes = _draw(sampler, jax.random.key(0), 24)
  support = _classes_of(episodes.support_x, sampler.data)  # [B, N]
  query = _classes_of(episodes.query_x, sampler.data)
  np.testing.assert_array_equal(support, query)  # Label i: one class.
  alphabets = np.asarray(sampler.data.alphabets)[support]
  assert all(len(set(row)) == 20 for row in support.tolist())
  assert (alphabets == alphabets[:, :1]).all()
  # Episodes draw different alphabets (the val split has only 5).
  assert len(np.unique(alphabets[:, 0])) >= (4 if split == "validation" else 8)


def _coded_pool(alphabets) -> ClassPool:
  """1x1 images whose two channels encode the class index."""
  n = len(alphabets)
  codes = np.stack([np.arange(n) // 256, np.arange(n) % 256], axis=-1)
  images = np.broadcast_to(codes[:, None, None, None, :], (n, 20, 1, 1, 2))
  return ClassPool(
      np.ascontiguousarray(images).astype(np.uint8),
      np.arange(n, dtype=np.int32),
      np.asarray(alphabets, np.int32),
  )


def _coded_classes(x) -> np.ndarray:
  code = np.rint(np.asarray(x)[..., 0, 0, :] * 255).astype(int)
  return code[..., 0] * 256 + code[..., 1]


# 3 classes of alphabet 7 (too few for 5 ways), 30 of 2, 5 of 9.
SKEWED_ALPHABETS = np.array([7] * 3 + [2] * 30 + [9] * 5)


@pytest.fixture(scope="module")
def skewed_sampler():
  return tasks.episode_sampler(
      _coded_pool(SKEWED_ALPHABETS), num_ways=5, num_shots=1, num_queries=1,
      within_alphabet=True,
  )


def test_alphabet_is_uniform_among_those_with_enough_classes(skewed_sampler):
  episodes = _draw(skewed_sampler, jax.random.key(1), 1000)
  drawn = SKEWED_ALPHABETS[_coded_classes(episodes.support_x)]
  assert (drawn == drawn[:, :1]).all()
  assert 7 not in drawn
  # Uniform over alphabets, not over classes (which would give 30/35).
  assert abs((drawn[:, 0] == 2).mean() - 0.5) < 0.06


def test_same_key_same_episode_other_key_other_episode(skewed_sampler):
  first = _draw(skewed_sampler, jax.random.key(3), 1000)
  again = _draw(skewed_sampler, jax.random.key(3), 1000)
  other = _draw(skewed_sampler, jax.random.key(4), 1000)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first.support_x, other.support_x)


def test_pool_without_alphabets_is_refused():
  pool = ClassPool(np.zeros((10, 4, 2, 2, 1), np.uint8), np.arange(10))
  with pytest.raises(ValueError, match=(
      r"^within_alphabet=True needs the alphabet of each class, but the "
      r"pool has no alphabets")) as info:
    tasks.episode_sampler(
        pool, num_ways=5, num_shots=1, num_queries=1, within_alphabet=True
    )
  assert info.value.argument == "within_alphabet"


def test_config_of_a_dataset_without_alphabets_names_the_field():
  def load(data_dir):
    del data_dir
    pool = ClassPool(np.zeros((8, 4, 2, 2, 1), np.uint8), np.arange(8))
    return data.DatasetSplits(pool, pool, pool)

  tasks.register_dataset("no_alphabets", load_splits=load, replace=True)
  task = dict(dataset="no_alphabets", num_ways=2, num_shots=1,
              num_queries=1, within_alphabet=True)
  with pytest.raises(experiment.ConfigError) as info:
    experiment.build_samplers(task)
  message = str(info.value)
  assert message.startswith("task.within_alphabet=True needs the alphabet")
  assert "no_alphabets test split has no alphabets" in message
  assert "\n" not in message


@pytest.mark.parametrize(
    "sizes,argument,expected",
    [
        pytest.param(
            dict(num_ways=48), "within_alphabet",
            "within_alphabet=True needs an alphabet of num_ways=48 classes, "
            "but the largest of the omniglot test split has 47",
            id="test",
        ),
        pytest.param(
            dict(train_num_ways=60), "train_within_alphabet",
            "train_within_alphabet=True needs an alphabet of "
            "train_num_ways=60 classes, but the largest of the omniglot "
            "train split has 55",
            id="train-inherits",
        ),
    ],
)
def test_no_alphabet_large_enough_names_the_field(
    data_dir, lake_tasksets, sizes, argument, expected
):
  del lake_tasksets  # Requested so that the resized cache already exists.
  with pytest.raises(tasks.TasksetArgumentError) as info:
    tasks.get_tasksets("omniglot", data_dir=data_dir, **{**LAKE, **sizes})
  assert info.value.argument == argument
  assert str(info.value) == expected


@pytest.mark.parametrize("field", ["within_alphabet", "train_within_alphabet"])
def test_non_bool_option_is_refused_before_loading(field):
  with pytest.raises(tasks.TasksetArgumentError, match=rf"^{field} must be"):
    tasks.check_taskset_args("omniglot", **{**LAKE, field: "yes"})


def test_merge_and_restrict_keep_alphabets():
  a, b = _coded_pool([0, 0, 1]), _coded_pool([2, 2])
  b = b._replace(class_ids=b.class_ids + 3)
  merged = data.merge_pools(a, b)
  assert np.asarray(merged.alphabets).tolist() == [0, 0, 1, 2, 2]
  kept = data.restrict_classes(merged, classes=[1, 3])
  assert np.asarray(kept.alphabets).tolist() == [0, 2]
  plain = ClassPool(b.images, b.class_ids + 10)
  assert data.merge_pools(a, plain).alphabets is None
