"""Tests of the Mini-ImageNet loader on small generated data in both layouts."""

import csv
import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from metalearn.data import (
    DATA_DIR_ENV,
    DatasetNotFoundError,
    load_mini_imagenet,
)
from metalearn.tasks import episode_sampler

# Global class indices per split, interleaved so that split order and sorted
# WordNet id order differ. The wnid of index c sorts at position c.
SPLIT_CLASSES = {
    "train": (7, 0, 10, 3, 5),
    "val": (11, 1, 8),
    "test": (2, 9, 4, 6),
}
PER_CLASS = 6


def _wnid(c: int) -> str:
  return f"n{1000 + 37 * c:08d}"


def _write_pickles(root, *, counts=None, size=84):
  """Writes the pickle caches; returns {split: (image_data, class_dict)}."""
  counts = counts or {}
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  written = {}
  for split, classes in SPLIT_CLASSES.items():
    sizes = [counts.get(c, PER_CLASS) for c in classes]
    images = rng.integers(0, 256, (sum(sizes), size, size, 3), np.uint8)
    order = rng.permutation(sum(sizes))  # Classes scattered over the rows.
    bounds = np.cumsum([0, *sizes])
    class_dict = {
        _wnid(c): order[a:b].tolist()
        for c, a, b in zip(classes, bounds[:-1], bounds[1:], strict=True)
    }
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    written[split] = (images, class_dict)
  return written


def _color(c: int, j: int) -> tuple[int, int, int]:
  """A flat colour that encodes class ``c`` in red and image ``j`` in green."""
  return (20 * c + 5, 40 * j + 10, 128)


def _write_csv_folder(root):
  """Writes images/ (84x84 and 100x90 JPEGs) and the three split CSVs."""
  images = root / "images"
  images.mkdir(parents=True)
  for split, classes in SPLIT_CLASSES.items():
    rows = []
    for j in range(PER_CLASS):  # Classes interleaved; file order per class.
      for c in classes:
        name = f"{_wnid(c)}{j:08d}.jpg"
        shape = (84, 84, 3) if j % 2 == 0 else (100, 90, 3)
        pixels = np.empty(shape, np.uint8)
        pixels[...] = _color(c, j)
        Image.fromarray(pixels).save(images / name, quality=95)
        # Some copies of the CSVs drop the extension.
        rows.append((name.removesuffix(".jpg") if j == 1 else name, _wnid(c)))
    with open(root / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(("filename", "label"))
      writer.writerows(rows)


def _expected_ids(split):
  return np.array(sorted(SPLIT_CLASSES[split]), np.int32)


def test_pickle_shapes_and_exact_pixels(tmp_path):
  written = _write_pickles(tmp_path / "data" / "mini-imagenet")
  cache = tmp_path / "cache"
  splits = load_mini_imagenet(tmp_path / "data", cache_dir=cache, device=False)
  for split, classes in SPLIT_CLASSES.items():
    pool = getattr(splits, split)
    assert pool.images.shape == (len(classes), PER_CLASS, 84, 84, 3)
    assert pool.images.dtype == np.uint8
    np.testing.assert_array_equal(pool.class_ids, _expected_ids(split))
    images, class_dict = written[split]
    for i, c in enumerate(sorted(classes)):
      np.testing.assert_array_equal(
          pool.images[i], images[class_dict[_wnid(c)]]
      )
  assert not cache.exists()  # Native-size pickles need no cache.


def test_pickle_resized_and_cached(tmp_path):
  _write_pickles(tmp_path / "mini-imagenet")
  cache = tmp_path / "cache"
  splits = load_mini_imagenet(
      tmp_path, image_size=32, cache_dir=cache, device=False
  )
  assert splits.val.images.shape == (3, PER_CLASS, 32, 32, 3)
  assert len(list(cache.glob("mini_imagenet_pickle_32px_*.npz"))) == 1
  again = load_mini_imagenet(
      tmp_path, image_size=32, cache_dir=cache, device=False
  )
  np.testing.assert_array_equal(again.val.images, splits.val.images)


def test_csv_folder_resizes_and_groups_by_class(tmp_path):
  _write_csv_folder(tmp_path / "mini-imagenet")
  splits = load_mini_imagenet(tmp_path, use_cache=False, device=False)
  for split, classes in SPLIT_CLASSES.items():
    pool = getattr(splits, split)
    assert pool.images.shape == (len(classes), PER_CLASS, 84, 84, 3)
    assert pool.images.dtype == np.uint8
    np.testing.assert_array_equal(pool.class_ids, _expected_ids(split))
    for i, c in enumerate(sorted(classes)):
      for j in range(PER_CLASS):
        diff = pool.images[i, j].astype(int) - np.array(_color(c, j))
        assert np.abs(diff).max() <= 4, (split, c, j)


def test_csv_cache_is_written_and_reused(tmp_path):
  root = tmp_path / "mini-imagenet"
  _write_csv_folder(root)
  cache = tmp_path / "cache"
  first = load_mini_imagenet(tmp_path, cache_dir=cache, device=False)
  files = list(cache.iterdir())
  assert [f.name for f in files] == [
      f.name for f in cache.glob("mini_imagenet_csv_84px_*.npz")
  ]
  assert len(files) == 1
  for image in (root / "images").iterdir():
    image.unlink()
  with pytest.raises(DatasetNotFoundError, match="are not in"):
    load_mini_imagenet(tmp_path, use_cache=False, device=False)
  second = load_mini_imagenet(tmp_path, cache_dir=cache, device=False)
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)


def test_missing_dataset_says_where_to_put_what(tmp_path, monkeypatch):
  monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(DatasetNotFoundError) as info:
    load_mini_imagenet(use_cache=False)
  message = str(info.value)
  assert str(tmp_path / "mini-imagenet") in message
  for needle in (
      "METALEARN_DATA_DIR",
      "mini-imagenet-cache-train.pkl",
      "mini-imagenet-cache-test.pkl",
      "train.csv",
      "filename,label",
      "images/",
      "Found there: nothing",
  ):
    assert needle in message


def test_partial_layout_is_reported(tmp_path):
  root = tmp_path / "mini-imagenet"
  root.mkdir()
  (root / "mini-imagenet-cache-train.pkl").write_bytes(b"")
  (root / "train.csv").write_text("filename,label\n")
  with pytest.raises(DatasetNotFoundError, match="Found there: "
                     "mini-imagenet-cache-train.pkl, train.csv"):
    load_mini_imagenet(tmp_path, use_cache=False)


def test_ragged_classes_are_truncated_with_warning(tmp_path):
  written = _write_pickles(
      tmp_path / "mini-imagenet", counts={0: 8, 9: 5}
  )
  with pytest.warns(UserWarning, match="keeping the first 5 images"):
    splits = load_mini_imagenet(tmp_path, use_cache=False, device=False)
  for pool in splits:
    assert pool.images.shape[1] == 5
  images, class_dict = written["train"]
  np.testing.assert_array_equal(  # Class 0 keeps its first 5 rows.
      splits.train.images[0], images[class_dict[_wnid(0)][:5]]
  )


def test_class_in_two_splits_is_rejected(tmp_path):
  root = tmp_path / "mini-imagenet"
  _write_pickles(root)
  with open(root / "mini-imagenet-cache-val.pkl", "rb") as f:
    val = pickle.load(f)
  val["class_dict"][_wnid(7)] = val["class_dict"].pop(_wnid(11))
  with open(root / "mini-imagenet-cache-val.pkl", "wb") as f:
    pickle.dump(val, f)
  with pytest.raises(ValueError, match="more than one split"):
    load_mini_imagenet(tmp_path, use_cache=False, device=False)


def test_bad_image_size_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="image_size"):
    load_mini_imagenet(tmp_path, image_size=2)


def test_episode_sampler_on_loaded_pool(tmp_path):
  _write_pickles(tmp_path / "mini-imagenet")
  splits = load_mini_imagenet(tmp_path, use_cache=False)
  sampler = episode_sampler(
      splits.train, num_ways=5, num_shots=1, num_queries=PER_CLASS - 1
  )
  episode = jax.jit(sampler.sample)(jax.random.key(0), sampler.data)
  assert episode.support_x.shape == (5, 84, 84, 3)
  assert episode.query_x.shape == (5 * (PER_CLASS - 1), 84, 84, 3)
  pool = np.asarray(splits.train.images).reshape(-1, 84, 84, 3)
  for image in np.asarray(episode.support_x):
    pixels = np.round(image * 255).astype(np.uint8)
    assert (pool == pixels).all(axis=(1, 2, 3)).any()
