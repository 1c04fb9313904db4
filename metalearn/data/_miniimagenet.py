"""Mini-ImageNet: readers for the pickle caches and the Ravi-Larochelle CSVs."""

import concurrent.futures
import csv
import functools
import hashlib
import os
import pathlib
import pickle
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image

from metalearn.data import _common

SPLITS = ("train", "val", "test")
# Classes per split and images per class of the Ravi & Larochelle split.
NUM_CLASSES = {"train": 64, "val": 16, "test": 20}
EXAMPLES_PER_CLASS = 600
NATIVE_SIZE = 84
PICKLE_NAME = "mini-imagenet-cache-{split}.pkl"

MISSING_MESSAGE = """\
Mini-ImageNet was not found in {root}.
It is derived from ImageNet, so this project can neither ship nor download it.
Put one of these layouts there yourself (the data directory is the `data_dir`
argument, the config field `task.data_dir`, or the environment variable
METALEARN_DATA_DIR):
  - the pickle caches mini-imagenet-cache-train.pkl,
    mini-imagenet-cache-val.pkl and mini-imagenet-cache-test.pkl, each a dict
    with `image_data` (uint8 [N, 84, 84, 3]) and `class_dict` ({{wnid: [row
    indices]}}), or
  - the Ravi & Larochelle split files train.csv, val.csv and test.csv (header
    `filename,label`, label = WordNet id) next to a folder images/ that holds
    every file they name, at any resolution.
Found there: {found}."""


class MiniImageNetSplit(NamedTuple):
  """One split's images and the rows of each class, before pooling.

  Attributes:
    images: ``uint8 [N, S, S, 3]``, RGB.
    wnids: the WordNet ids of the classes, sorted.
    rows: per class (in ``wnids`` order), the indices of its images in
      ``images``, in file order.
  """

  images: np.ndarray
  wnids: tuple[str, ...]
  rows: tuple[np.ndarray, ...]


def read_pickle(path: pathlib.Path, image_size: int) -> MiniImageNetSplit:
  """Reads one ``mini-imagenet-cache-<split>.pkl`` and resizes its images.

  Warning: unpickling runs whatever code the file asks for. Only load pickle
  caches from a source you trust.

  Args:
    path: the pickle file.
    image_size: side of the square output images.

  Returns:
    The split, images resized to ``image_size`` if they are not already.
  """
  with open(path, "rb") as f:
    try:
      data = pickle.load(f)  # User-supplied: see the warning above.
    except UnicodeDecodeError:  # Written by Python 2.
      f.seek(0)
      data = pickle.load(f, encoding="latin1")
  if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(
      data
  ):
    raise ValueError(
        f"{path} is not a Mini-ImageNet cache: expected a dict with "
        "'image_data' and 'class_dict'"
    )
  images = np.asarray(data["image_data"])
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"{path}: image_data must be uint8 [N, H, W, 3], got "
        f"{images.dtype} {images.shape}"
    )
  wnids = tuple(sorted(str(w) for w in data["class_dict"]))
  by_wnid = {str(w): r for w, r in data["class_dict"].items()}
  rows = tuple(np.asarray(by_wnid[w], np.int64).reshape(-1) for w in wnids)
  for wnid, r in zip(wnids, rows, strict=True):
    if r.size and (r.min() < 0 or r.max() >= len(images)):
      raise ValueError(f"{path}: class {wnid} indexes past image_data")
  return MiniImageNetSplit(
      _common.resize_images(images, image_size), wnids, rows
  )


def read_csv(csv_path: pathlib.Path, images_dir: pathlib.Path):
  """Reads a Ravi & Larochelle split file into ``{wnid: [image paths]}``.

  A file name without an extension is taken to name a ``.jpg``.

  Raises:
    ValueError: if the header lacks ``filename`` or ``label``.
    DatasetNotFoundError: if an image it names is not in ``images_dir``.
  """
  by_wnid: dict[str, list[pathlib.Path]] = {}
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    if not {"filename", "label"} <= set(reader.fieldnames or ()):
      raise ValueError(
          f"{csv_path} must have the header 'filename,label', got "
          f"{reader.fieldnames}"
      )
    for row in reader:
      name = row["filename"].strip()
      if not pathlib.PurePath(name).suffix:  # Some copies drop the ".jpg".
        name += ".jpg"
      by_wnid.setdefault(row["label"].strip(), []).append(images_dir / name)
  missing = [p for paths in by_wnid.values() for p in paths if not p.exists()]
  if missing:
    raise _common.DatasetNotFoundError(
        f"{len(missing)} images named in {csv_path} are not in {images_dir} "
        f"(first: {missing[0].name})"
    )
  return by_wnid


def _read_image(path: pathlib.Path, image_size: int) -> np.ndarray:
  with Image.open(path) as img:
    rgb = np.asarray(img.convert("RGB"))
  return _common.resize_images(rgb[None], image_size)[0]


def read_image_folder(
    root: pathlib.Path, split: str, image_size: int
) -> MiniImageNetSplit:
  """Reads ``<root>/<split>.csv`` and the images it names, resized.

  Decoding runs on a thread pool (PIL releases the GIL while decoding and
  resizing), so the first load of all 60,000 JPEGs takes minutes, not tens
  of minutes.
  """
  by_wnid = read_csv(root / f"{split}.csv", root / "images")
  wnids = tuple(sorted(by_wnid))
  paths = [p for w in wnids for p in by_wnid[w]]
  read = functools.partial(_read_image, image_size=image_size)
  with concurrent.futures.ThreadPoolExecutor() as pool:
    images = list(pool.map(read, paths))
  counts = [len(by_wnid[w]) for w in wnids]
  starts = np.cumsum([0, *counts])
  rows = tuple(
      np.arange(s, s + n) for s, n in zip(starts[:-1], counts, strict=True)
  )
  images = (
      np.stack(images)
      if images
      else np.zeros((0, image_size, image_size, 3), np.uint8)
  )
  return MiniImageNetSplit(images, wnids, rows)


def find_layout(root: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
  """Returns which layout ``root`` holds and its index files.

  Returns:
    ``("pickle", [pkl files])`` or ``("csv", [csv files])``; the pickle
    caches win when both are complete.

  Raises:
    DatasetNotFoundError: with instructions, if neither layout is complete.
  """
  pickles = [root / PICKLE_NAME.format(split=s) for s in SPLITS]
  if all(p.is_file() for p in pickles):
    return "pickle", pickles
  csvs = [root / f"{s}.csv" for s in SPLITS]
  if all(p.is_file() for p in csvs) and (root / "images").is_dir():
    return "csv", csvs
  found = sorted(
      p.name + ("/" if p.is_dir() else "")
      for p in [*pickles, *csvs, root / "images"]
      if p.exists()
  )
  raise _common.DatasetNotFoundError(
      MISSING_MESSAGE.format(root=root, found=", ".join(found) or "nothing")
  )


def _save_cache(cache: pathlib.Path, splits: dict[str, MiniImageNetSplit]):
  arrays = {}
  for s, split in splits.items():
    arrays[f"{s}_images"] = split.images
    arrays[f"{s}_wnids"] = np.array(split.wnids, dtype=str)
    arrays[f"{s}_counts"] = np.array([len(r) for r in split.rows], np.int64)
    arrays[f"{s}_rows"] = np.concatenate([np.zeros(0, np.int64), *split.rows])
  cache.parent.mkdir(parents=True, exist_ok=True)
  tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **arrays)
  tmp.replace(cache)  # Atomic: a concurrent reader never sees half a file.


def _load_cache(cache: pathlib.Path) -> dict[str, MiniImageNetSplit]:
  splits = {}
  with np.load(cache, allow_pickle=False) as d:
    for s in SPLITS:
      ends = np.cumsum(d[f"{s}_counts"])
      rows = np.split(d[f"{s}_rows"], ends[:-1])
      splits[s] = MiniImageNetSplit(
          d[f"{s}_images"], tuple(str(w) for w in d[f"{s}_wnids"]), tuple(rows)
      )
  return splits


def read_splits(
    root: pathlib.Path, image_size: int, cache_dir: pathlib.Path | None
) -> dict[str, MiniImageNetSplit]:
  """Reads all three splits from ``root``, through an npz cache.

  The cache is used for the CSV layout, and for the pickle layout only when
  resizing (pickles at the native 84 px load as fast as the cache would). Its
  name depends on the resolved root and on the size and modification time of
  the index files, so editing a CSV or replacing a pickle invalidates it.
  """
  layout, index_files = find_layout(root)
  cache = None
  if cache_dir is not None and (layout == "csv" or image_size != NATIVE_SIZE):
    h = hashlib.sha1(str(root.resolve()).encode())
    for p in index_files:
      st = p.stat()
      h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    tag = h.hexdigest()[:10]
    cache = cache_dir / f"mini_imagenet_{layout}_{image_size}px_{tag}.npz"
    if cache.exists():
      return _load_cache(cache)
  if layout == "pickle":
    splits = {
        s: read_pickle(p, image_size)
        for s, p in zip(SPLITS, index_files, strict=True)
    }
  else:
    splits = {s: read_image_folder(root, s, image_size) for s in SPLITS}
  if cache is not None:
    _save_cache(cache, splits)
  return splits


def to_pools(
    splits: dict[str, MiniImageNetSplit], *, device: bool = True
) -> _common.DatasetSplits:
  """Lays the splits out as dense class pools with global class ids.

  Class ids index the sorted list of the WordNet ids of all three splits.
  Classes with different image counts are truncated to the smallest count,
  with a warning, so that every pool is dense.

  Raises:
    ValueError: if a split is empty, a class has no images, or a class is in
      two splits.
  """
  for s, split in splits.items():
    if not split.wnids:
      raise ValueError(f"the Mini-ImageNet {s} split has no classes")
  all_wnids = [w for s in SPLITS for w in splits[s].wnids]
  if len(set(all_wnids)) != len(all_wnids):
    dup = sorted({w for w in all_wnids if all_wnids.count(w) > 1})
    raise ValueError(f"Mini-ImageNet classes in more than one split: {dup}")
  ids = {w: i for i, w in enumerate(sorted(all_wnids))}
  counts = {
      w: len(r)
      for s in SPLITS
      for w, r in zip(splits[s].wnids, splits[s].rows, strict=True)
  }
  n = min(counts.values())
  if n == 0:
    empty = sorted(w for w, c in counts.items() if c == 0)
    raise ValueError(f"Mini-ImageNet classes without images: {empty}")
  if max(counts.values()) != n:
    odd = sorted(w for w, c in counts.items() if c != n)
    warnings.warn(
        f"Mini-ImageNet classes have {n} to {max(counts.values())} images "
        f"({len(odd)} classes have more than {n}, first: {odd[0]}); keeping "
        f"the first {n} images of every class",
        stacklevel=3,
    )
  pools = {}
  for s in SPLITS:
    split = splits[s]
    rows = np.stack([r[:n] for r in split.rows])
    pools[s] = _common.make_pool(
        split.images[rows],
        np.array([ids[w] for w in split.wnids], np.int32),
        device=device,
    )
  return _common.DatasetSplits(**pools)


def load_mini_imagenet(
    data_dir: str | pathlib.Path | None = None,
    *,
    image_size: int = NATIVE_SIZE,
    cache_dir: str | pathlib.Path | None = None,
    use_cache: bool = True,
    device: bool = True,
) -> _common.DatasetSplits:
  """Loads Mini-ImageNet as train/val/test class pools.

  Reads ``<data_dir>/mini-imagenet/`` in one of the two layouts people have:

  * the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``, each a
    dict with ``image_data`` (``uint8 [N, 84, 84, 3]``) and ``class_dict``
    (``{wnid: [indices into image_data]}``);
  * the Ravi & Larochelle split files ``{train,val,test}.csv`` (header
    ``filename,label``, the label a WordNet id) and an ``images/`` folder with
    the files they name, at any resolution.

  Images are converted to RGB and resized to ``image_size`` with Lanczos;
  resized arrays of the CSV layout are cached as npz. Nothing is ever
  downloaded: Mini-ImageNet is derived from ImageNet and must be obtained by
  the user.

  Classes are ordered by WordNet id within each split, and images within a
  class keep their file order. The standard split has 64/16/20 classes of
  600 images each; other class counts are accepted as they are. If classes
  hold different numbers of images, every class of every split is truncated
  to the smallest count, with a warning.

  Warning: the pickle layout is read with :mod:`pickle`, which runs whatever
  code the file asks for. Only use pickle caches from a source you trust.

  Args:
    data_dir: the data directory; default ``$METALEARN_DATA_DIR`` or
      ``~/metalearn_data``.
    image_size: side of the square images (84 is the standard).
    cache_dir: where resized arrays are cached; default
      ``$METALEARN_CACHE_DIR`` or ``~/.cache/metalearn``.
    use_cache: read and write that cache.
    device: place the pools on the default JAX device.

  Returns:
    :class:`DatasetSplits` of :class:`ClassPool`; images are
    ``uint8 [classes, 600, S, S, 3]`` RGB, and a class id is the index of the
    class's WordNet id in the sorted list of the classes of all three splits
    (0..99 for the standard split).

  Raises:
    DatasetNotFoundError: if neither layout is found, saying where to put
      which files, or if a CSV names a missing image.
    ValueError: for a bad argument or a malformed file.

  Examples:
    >>> splits = load_mini_imagenet()  # doctest: +SKIP
    >>> splits.train.images.shape  # doctest: +SKIP
    (64, 600, 84, 84, 3)

  References:
    Vinyals et al., `Matching Networks for One Shot Learning
    <https://arxiv.org/abs/1606.04080>`_, 2016.

    Ravi & Larochelle, `Optimization as a Model for Few-Shot Learning
    <https://openreview.net/forum?id=rJY0-Kcll>`_, 2017.
  """
  if not isinstance(image_size, int) or image_size < 4:
    raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
  root = _common.resolve_data_dir(data_dir) / "mini-imagenet"
  cache = _common.resolve_cache_dir(cache_dir) if use_cache else None
  return to_pools(read_splits(root, image_size, cache), device=device)
