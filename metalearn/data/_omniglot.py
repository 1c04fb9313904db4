"""Omniglot: readers for the npz, image-zip and TFDS layouts, splits, pools."""

import io
import json
import pathlib
import re
import uuid
import zipfile
from importlib import resources
from typing import NamedTuple

import numpy as np
from PIL import Image

from metalearn.data import _common

SETS = ("background", "evaluation")
# sha256 of the npz archives this project distributes for tests and CI.
NPZ_SHA256 = {
    "background": (
        "21fa1b8f6897ea69060b7ba5d9cefbab1a453ea5bbce653cf3b2f262d1964ecd"
    ),
    "evaluation": (
        "f47a204bc83fe1d82014d4227b17c785b0d10a5f28ecd053ce9ca4ce0ab63913"
    ),
}
# md5 of the official zips of brendenlake/omniglot (python/images_*.zip).
ZIP_MD5 = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SPLIT_SCHEMES = ("vinyals", "finn", "lake")
_PNG = re.compile(
    r"(?:^|/)images_\w+/([^/]+)/(character\d+)/(\d{4})_(\d{2})\.png$"
)

MISSING_MESSAGE = """\
Omniglot was not found in {root}.
Put one of these there (the data directory is the `data_dir` argument, the
config field `task.data_dir`, or the environment variable METALEARN_DATA_DIR):
  - omniglot_background.npz and omniglot_evaluation.npz (this project's npz
    layout, see README.md), or
  - images_background.zip and images_evaluation.zip from
    github.com/brendenlake/omniglot (python/), zipped or extracted, or
  - a prepared TFDS `omniglot` under {tfds_dir}."""


class OmniglotCharacters(NamedTuple):
  """All characters of one or both Omniglot sets at native resolution.

  Attributes:
    images: ``uint8 [classes, 20, 105, 105]``, 255 = ink (inverted from the
      files, where 0 is ink), drawers in order 1..20.
    names: ``Alphabet/characterNN`` per class.
    global_ids: Omniglot global character id (1..1623) per class.
  """

  images: np.ndarray
  names: tuple[str, ...]
  global_ids: np.ndarray


def read_npz(path: pathlib.Path, *, verify: bool = True) -> OmniglotCharacters:
  """Reads one ``omniglot_{background,evaluation}.npz`` archive."""
  name = path.stem.removeprefix("omniglot_")
  if verify and name in NPZ_SHA256:
    _common.verify_digest(path, NPZ_SHA256[name], "sha256")
  with np.load(path, allow_pickle=False) as d:
    images, names, ids = d["images"], d["class_names"], d["class_global_id"]
  images = 255 - images.reshape(len(names), 20, *images.shape[1:])
  return OmniglotCharacters(images, tuple(str(n) for n in names), ids)


def read_image_folder(
    root: pathlib.Path | zipfile.Path,
) -> OmniglotCharacters:
  """Reads the official ``images_<set>/<Alphabet>/characterNN/*.png`` layout.

  Args:
    root: a folder or a ``zipfile.Path`` that holds the PNG files at any depth
      under an ``images_<set>`` folder.

  Returns:
    The characters, sorted by global id, with drawers in order.
  """
  if isinstance(root, zipfile.Path):
    with zipfile.ZipFile(root.root.filename) as zf:
      entries = [
          (n, zf.read(n)) for n in zf.namelist() if _PNG.search(n)
      ]
  else:
    entries = [
        (p.as_posix(), p.read_bytes())
        for p in pathlib.Path(root).rglob("*.png")
        if _PNG.search(p.as_posix())
    ]
  by_class: dict[tuple[int, str], dict[int, np.ndarray]] = {}
  for path, raw in entries:
    alphabet, character, gid, drawer = _PNG.search(path).groups()
    img = np.asarray(Image.open(io.BytesIO(raw)).convert("L"))
    by_class.setdefault((int(gid), f"{alphabet}/{character}"), {})[
        int(drawer)
    ] = img
  if not by_class:
    raise _common.DatasetNotFoundError(f"no Omniglot PNG files under {root}")
  keys = sorted(by_class)
  for key in keys:
    if sorted(by_class[key]) != list(range(1, 21)):
      raise ValueError(
          f"{key[1]} has drawers {sorted(by_class[key])}, expected 1..20"
      )
  images = np.stack(
      [np.stack([by_class[k][d] for d in range(1, 21)]) for k in keys]
  )
  return OmniglotCharacters(
      images=255 - images,
      names=tuple(k[1] for k in keys),
      global_ids=np.array([k[0] for k in keys], np.int32),
  )


def read_tfds(data_dir: pathlib.Path) -> OmniglotCharacters:
  """Reads a prepared TFDS ``omniglot`` (train = background, test = evaluation).

  Needs TensorFlow (``pip install metalearn[tf]``). TFDS's ``label`` is the
  global character id minus one, its ``alphabet`` a class label named by
  the alphabet folder and ``alphabet_char_id`` the character number minus
  one, so classes get the same names and ids as the other layouts. TFDS does
  not keep the drawer number; drawers are kept in the order TFDS stores them.
  """
  import tensorflow_datasets as tfds  # Heavy: imported only here.

  builder = tfds.builder("omniglot", data_dir=str(data_dir))
  alphabets = builder.info.features["alphabet"].names
  by_class: dict[int, list[np.ndarray]] = {}
  names: dict[int, str] = {}
  for split in ("train", "test"):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      gid = int(ex["label"]) + 1
      by_class.setdefault(gid, []).append(ex["image"][..., 0])
      alphabet = alphabets[int(ex["alphabet"])]
      names[gid] = f"{alphabet}/character{int(ex['alphabet_char_id']) + 1:02d}"
  ids = sorted(by_class)
  images = np.stack([np.stack(by_class[g][:20]) for g in ids])
  return OmniglotCharacters(
      255 - images, tuple(names[g] for g in ids), np.array(ids, np.int32)
  )


def read_all(root: pathlib.Path, *, verify: bool = True) -> OmniglotCharacters:
  """Reads both sets from whichever layout ``root`` holds.

  Raises:
    DatasetNotFoundError: with instructions, if no known layout is present.
  """
  parts = []
  for s in SETS:
    npz = root / f"omniglot_{s}.npz"
    folder = root / f"images_{s}"
    zipped = root / f"images_{s}.zip"
    if npz.exists():
      parts.append(read_npz(npz, verify=verify))
    elif folder.is_dir():
      parts.append(read_image_folder(folder))
    elif zipped.exists():
      if verify:
        _common.verify_digest(zipped, ZIP_MD5[s], "md5")
      parts.append(read_image_folder(zipfile.Path(zipped)))
  if len(parts) == len(SETS):
    return OmniglotCharacters(
        np.concatenate([p.images for p in parts]),
        sum((p.names for p in parts), ()),
        np.concatenate([p.global_ids for p in parts]).astype(np.int32),
    )
  tfds_dir = root.parent / "tensorflow_datasets"
  if (tfds_dir / "omniglot").is_dir():
    return read_tfds(tfds_dir)
  raise _common.DatasetNotFoundError(
      MISSING_MESSAGE.format(root=root, tfds_dir=tfds_dir)
  )


def split_names(scheme: str) -> dict[str, list[str]]:
  """The class names (``Alphabet/characterNN``) of each split of a scheme.

  Schemes:
    ``vinyals``: the split of Vinyals et al. (2016) used by Prototypical
      Networks: 1028 train / 172 val / 423 test characters, whole alphabets
      in train and val, the last 423 characters of the evaluation set in test.
    ``finn``: 1100 train / 100 val / 423 test characters drawn at random from
      all 1623, as in Finn et al.'s code. Their order came from ``os.listdir``
      shuffled with ``random.seed(1)`` and cannot be reproduced; ours is a
      fixed permutation (numpy seed 1) of the characters sorted by global id.
    ``lake``: the protocol of Lake et al. (2015): train and val hold the 964
      characters of the 30 background alphabets, test the 659 of the 20
      evaluation alphabets. Val is every sixth background alphabet in
      sorted name order, starting with the first (Alphabet_of_the_Magi,
      Bengali, Futurama, Japanese_(hiragana), N_Ko: 177 characters, each
      alphabet with at least 20), a fixed choice made without looking at
      any result; train is the other 25 (787 characters).
  """
  if scheme not in SPLIT_SCHEMES:
    raise ValueError(
        f"unknown Omniglot split scheme {scheme!r}; choose one of "
        f"{SPLIT_SCHEMES}"
    )
  text = resources.files("metalearn.data").joinpath(
      "splits/omniglot.json"
  ).read_text()
  return json.loads(text)[scheme]


def _source_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The files :func:`read_all` would read from ``root``, in order."""
  files = []
  found = 0
  for s in SETS:
    npz = root / f"omniglot_{s}.npz"
    folder = root / f"images_{s}"
    zipped = root / f"images_{s}.zip"
    if npz.exists():
      files.append(npz)
    elif folder.is_dir():
      files.extend(sorted(folder.rglob("*.png")))
    elif zipped.exists():
      files.append(zipped)
    else:
      continue
    found += 1
  if found < len(SETS):
    tfds = root.parent / "tensorflow_datasets" / "omniglot"
    files.extend(sorted(p for p in tfds.rglob("*") if p.is_file()))
  return files


def _resized_characters(
    root: pathlib.Path,
    image_size: int,
    cache_dir: pathlib.Path | None,
    verify: bool,
) -> OmniglotCharacters:
  """All characters resized to ``image_size``, through an npz cache.

  The cache's name depends on the resolved root and on the size and
  modification time of every source file, so replacing a file invalidates
  it.
  """
  cache = None
  if cache_dir is not None:
    tag = _common.files_tag(root, _source_files(root))
    cache = cache_dir / f"omniglot_{image_size}px_{tag}.npz"
    if cache.exists():
      with np.load(cache, allow_pickle=False) as d:
        return OmniglotCharacters(
            d["images"], tuple(str(n) for n in d["names"]), d["global_ids"]
        )
  chars = read_all(root, verify=verify)
  chars = chars._replace(images=_common.resize_images(chars.images, image_size))
  if cache is not None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own, so that concurrent writers (parallel jobs
    # sharing a cache) do not write into or rename away each other's file.
    tmp = cache.with_name(f"{cache.name}.{uuid.uuid4().hex}.tmp.npz")
    np.savez(
        tmp,
        images=chars.images,
        names=np.array(chars.names),
        global_ids=chars.global_ids,
    )
    tmp.replace(cache)  # Atomic: a concurrent reader never sees half a file.
  return chars


def with_rotations(images: np.ndarray, class_ids: np.ndarray):
  """Adds 90, 180 and 270 degree rotations of every class as new classes.

  Args:
    images: ``[classes, examples, H, W]`` with square images.
    class_ids: ``[classes]``.

  Returns:
    ``(images [4*classes, ...], class_ids)``, where class ``4*c + r`` is class
    ``c`` rotated by ``90*r`` degrees and has id ``4*class_ids[c] + r``.
  """
  rotated = np.stack(
      [np.rot90(images, k=r, axes=(-2, -1)) for r in range(4)], axis=1
  )
  ids = 4 * np.asarray(class_ids)[:, None] + np.arange(4)
  return rotated.reshape(-1, *images.shape[1:]), ids.reshape(-1)


def alphabet_indices(
    names: tuple[str, ...], global_ids: np.ndarray
) -> np.ndarray:
  """The alphabet index of each character, alphabets ordered by first id.

  Omniglot's global ids run through the alphabets one after the other
  (background, then evaluation), so the index (0..49 with all 50
  alphabets) does not depend on which layout the characters came from.

  Args:
    names: ``Alphabet/characterNN`` per character.
    global_ids: the global id of each character.

  Returns:
    ``int32 [characters]``.
  """
  alphabets = [n.split("/", 1)[0] for n in names]
  first: dict[str, int] = {}
  for a, gid in zip(alphabets, np.asarray(global_ids).tolist(), strict=True):
    first[a] = min(first.get(a, gid), gid)
  rank = {a: i for i, a in enumerate(sorted(first, key=first.get))}
  return np.array([rank[a] for a in alphabets], np.int32)


def load_omniglot(
    data_dir: str | pathlib.Path | None = None,
    *,
    image_size: int = 28,
    split_scheme: str = "vinyals",
    rotations: bool = True,
    verify: bool = True,
    cache_dir: str | pathlib.Path | None = None,
    use_cache: bool = True,
    device: bool = True,
) -> _common.DatasetSplits:
  """Loads Omniglot as train/val/test class pools.

  Reads ``<data_dir>/omniglot/`` in this project's npz layout, the official
  image zips (zipped or extracted), or a prepared TFDS ``omniglot``; resizes
  every image to ``image_size`` (Lanczos, cached); optionally adds rotated
  copies as new classes; and splits the characters by a literature scheme.

  Args:
    data_dir: the data directory; default ``$METALEARN_DATA_DIR`` or
      ``~/metalearn_data``.
    image_size: side of the square images (28 as in Finn et al.; 105 keeps
      the native resolution).
    split_scheme: ``"vinyals"`` (1028/172/423, Prototypical Networks),
      ``"finn"`` (1100/100/423, MAML) or ``"lake"`` (787/177/659, whole
      background alphabets for train and val, the evaluation alphabets for
      test, Lake et al.); see :func:`split_names`.
    rotations: add 90/180/270 degree rotations of each character as new
      classes (Santoro et al.; Vinyals et al.), in every split. Lake et
      al.'s protocol has none: use ``False`` with ``"lake"``. A rotated
      class belongs to a rotated alphabet of its own (see Returns).
    verify: check the checksums of known files.
    cache_dir: where resized arrays are cached; default
      ``$METALEARN_CACHE_DIR`` or ``~/.cache/metalearn``.
    use_cache: read and write that cache.
    device: place the pools on the default JAX device.

  Returns:
    :class:`DatasetSplits` of :class:`ClassPool`; images are
    ``uint8 [classes, 20, S, S, 1]`` with 255 = ink, class ids are
    ``4 * global_id + rotation`` (rotation 0 without ``rotations``) and
    alphabets ``4 * alphabet + rotation``, ``alphabet`` in 0..49 as
    :func:`alphabet_indices` numbers them.

  Raises:
    DatasetNotFoundError: if no Omniglot is found, saying where to put it.
    DataChecksumError: if a known file has the wrong checksum (a
      ``ValueError``), naming the file.
    ValueError: for a bad argument or a corrupt file.

  References:
    Lake, Salakhutdinov & Tenenbaum, `Human-level concept learning through
    probabilistic program induction <https://doi.org/10.1126/science.aab3050>`_,
    2015.
  """
  if not isinstance(image_size, int) or image_size < 4:
    raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
  names_by_split = split_names(split_scheme)
  root = _common.resolve_data_dir(data_dir) / "omniglot"
  cache = _common.resolve_cache_dir(cache_dir) if use_cache else None
  chars = _resized_characters(root, image_size, cache, verify)
  index = {n: i for i, n in enumerate(chars.names)}
  alphabets = 4 * alphabet_indices(chars.names, chars.global_ids)
  pools = {}
  for split, names in names_by_split.items():
    missing = [n for n in names if n not in index]
    if missing:
      raise ValueError(
          f"{len(missing)} characters of the {split_scheme} {split} split "
          f"are not in {root} (first: {missing[0]})"
      )
    rows = np.array([index[n] for n in names])
    images, ids = chars.images[rows], 4 * chars.global_ids[rows]
    groups = alphabets[rows]
    if rotations:
      images, ids = with_rotations(images, chars.global_ids[rows])
      groups = (groups[:, None] + np.arange(4)).reshape(-1)
    pools[split] = _common.make_pool(
        images, ids, alphabets=groups, device=device
    )
  return _common.DatasetSplits(**pools)
