"""Omniglot loader on the real data: readers, splits, rotations, cache, errors.

Reads ``$METALEARN_DATA_DIR/omniglot`` (see ``tests/conftest.py``). The npz
archives are decompressed once per module; the resized pools are loaded once
per session.
"""

import io
import os
import pathlib
import re
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from metalearn.data import (
    DatasetNotFoundError,
    _omniglot,
    load_omniglot,
    resize_images,
    with_rotations,
)

NUM_CHARACTERS = 1623
SET_SIZES = {"background": 964, "evaluation": 659}
SPLIT_SIZES = {
    "vinyals": {"train": 1028, "val": 172, "test": 423},
    "finn": {"train": 1100, "val": 100, "test": 423},
}
VINYALS_VAL_ALPHABETS = {
    "Armenian",
    "Bengali",
    "Early_Aramaic",
    "Hebrew",
    "Mkhedruli_(Georgian)",
}
SMALL1_ALPHABETS = {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
SMALL1_ZIP = "original/images_background_small1.zip"


@pytest.fixture(scope="module")
def omniglot_root(data_dir) -> pathlib.Path:
  return data_dir / "omniglot"


@pytest.fixture(scope="module")
def raw(omniglot_root) -> dict[str, _omniglot.OmniglotCharacters]:
  """Both npz archives at native resolution, keyed by set."""
  return {
      s: _omniglot.read_npz(omniglot_root / f"omniglot_{s}.npz")
      for s in _omniglot.SETS
  }


@pytest.fixture(scope="module")
def global_id(raw) -> dict[str, int]:
  """``Alphabet/characterNN`` -> global character id, over both sets."""
  return {
      name: int(gid)
      for chars in raw.values()
      for name, gid in zip(chars.names, chars.global_ids, strict=True)
  }


def _alphabet(name: str) -> str:
  return name.split("/")[0]


# ---------------------------------------------------------------------------
# Readers.


@pytest.mark.parametrize("which", ["background", "evaluation"])
def test_read_npz_counts(raw, which):
  chars = raw[which]
  n = SET_SIZES[which]
  assert chars.images.shape == (n, 20, 105, 105)
  assert chars.images.dtype == np.uint8
  ink = np.count_nonzero(chars.images == 255)
  paper = np.count_nonzero(chars.images == 0)
  assert ink + paper == chars.images.size  # Binary: only 0 and 255.
  assert len(chars.names) == len(set(chars.names)) == n
  assert all(re.fullmatch(r"[^/]+/character\d\d", m) for m in chars.names)
  first = 1 if which == "background" else SET_SIZES["background"] + 1
  np.testing.assert_array_equal(chars.global_ids, np.arange(first, first + n))
  # 255 is ink after reading: every image has some, and it is the minority.
  assert (chars.images.reshape(n * 20, -1).max(axis=1) == 255).all()
  assert ink / chars.images.size < 0.2


def test_sets_are_disjoint_and_cover_all_characters(raw):
  background, evaluation = raw["background"], raw["evaluation"]
  assert not set(background.names) & set(evaluation.names)
  ids = np.concatenate([background.global_ids, evaluation.global_ids])
  np.testing.assert_array_equal(np.sort(ids), np.arange(1, NUM_CHARACTERS + 1))
  alphabets = [{_alphabet(n) for n in c.names} for c in raw.values()]
  assert [len(a) for a in alphabets] == [30, 20]
  assert not alphabets[0] & alphabets[1]


def test_official_zip_is_pixel_identical_to_npz(raw, omniglot_root):
  chars = _omniglot.read_image_folder(
      zipfile.Path(omniglot_root / SMALL1_ZIP)
  )
  background = raw["background"]
  assert {_alphabet(n) for n in chars.names} == SMALL1_ALPHABETS
  assert chars.images.shape == (len(chars.names), 20, 105, 105)
  rows = np.array([background.names.index(n) for n in chars.names])
  np.testing.assert_array_equal(chars.global_ids, background.global_ids[rows])
  np.testing.assert_array_equal(chars.images, background.images[rows])


def _file_pixels(omniglot_root, name, gid, drawer=1) -> np.ndarray:
  """One PNG of the small1 zip as stored in the file: 0 = ink."""
  member = f"images_background_small1/{name}/{gid:04d}_{drawer:02d}.png"
  with zipfile.ZipFile(omniglot_root / SMALL1_ZIP) as zf:
    return np.asarray(Image.open(io.BytesIO(zf.read(member))).convert("L"))


def test_ink_is_255_after_load(omniglot, omniglot_root, global_id):
  name = "Latin/character01"
  gid = global_id[name]
  in_file = _file_pixels(omniglot_root, name, gid)
  assert (in_file == 255).mean() > 0.5  # The file has white paper, black ink.
  pool = omniglot.train
  row = list(np.asarray(pool.class_ids)).index(4 * gid)  # Rotation 0.
  loaded = np.asarray(pool.images[row, 0, :, :, 0])
  np.testing.assert_array_equal(
      loaded, resize_images((255 - in_file)[None], 28)[0]
  )
  assert loaded.max() == 255 and np.median(loaded) == 0


def _write_pngs(root: pathlib.Path, which: str, chars, rows) -> None:
  """Writes characters in the official ``images_<set>/`` layout (0 = ink)."""
  for row in rows:
    folder = root / f"images_{which}" / chars.names[row]
    folder.mkdir(parents=True)
    gid = int(chars.global_ids[row])
    for drawer in range(1, 21):
      paper = chars.images[row, drawer - 1] == 0  # Mode "1": True = white.
      Image.fromarray(paper).save(folder / f"{gid:04d}_{drawer:02d}.png")


@pytest.fixture
def extracted_folder(tmp_path, raw):
  """A tiny ``omniglot/`` folder: 2 background and 2 evaluation characters."""
  root = tmp_path / "omniglot"
  rows = {"background": [0, 500], "evaluation": [3, 658]}
  for which, picked in rows.items():
    _write_pngs(root, which, raw[which], picked)
  return root, rows


def test_read_all_extracted_folder(extracted_folder, raw):
  root, rows = extracted_folder
  chars = _omniglot.read_all(root)
  names = [raw[s].names[r] for s, picked in rows.items() for r in picked]
  assert list(chars.names) == names
  expected_ids = [raw[s].global_ids[r] for s, p in rows.items() for r in p]
  np.testing.assert_array_equal(chars.global_ids, expected_ids)
  assert chars.global_ids.dtype == np.int32
  expected = np.concatenate([raw[s].images[p] for s, p in rows.items()])
  np.testing.assert_array_equal(chars.images, expected)


def test_read_image_folder_missing_drawer_raises(extracted_folder):
  root, _ = extracted_folder
  png = next((root / "images_evaluation").rglob("*_07.png"))
  png.unlink()
  with pytest.raises(ValueError, match=r"has drawers .*expected 1\.\.20"):
    _omniglot.read_image_folder(root / "images_evaluation")


def test_load_omniglot_incomplete_dataset_names_missing(
    extracted_folder, tmp_path
):
  with pytest.raises(
      ValueError, match=r"characters of the vinyals train split are not in"
  ):
    load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------
# Splits.


@pytest.mark.parametrize(
    "scheme,rotations",
    [
        pytest.param("vinyals", True, id="vinyals-rot"),
        pytest.param("vinyals", False, id="vinyals-norot"),
        pytest.param("finn", True, id="finn-rot"),
        pytest.param("finn", False, id="finn-norot"),
    ],
)
def test_split_sizes(load_real_omniglot, scheme, rotations):
  splits = load_real_omniglot(
      split_scheme=scheme, rotations=rotations, device=False
  )
  per_char = 4 if rotations else 1
  characters = []
  for split, n in SPLIT_SIZES[scheme].items():
    pool = getattr(splits, split)
    assert pool.images.shape == (n * per_char, 20, 28, 28, 1)
    assert pool.images.dtype == np.uint8
    assert pool.class_ids.dtype == np.int32
    ids = np.asarray(pool.class_ids)
    assert len(np.unique(ids)) == len(ids)
    chars, rot = np.divmod(ids, 4)
    assert len(np.unique(chars)) == n
    if rotations:
      np.testing.assert_array_equal(rot.reshape(n, 4), [range(4)] * n)
    else:
      assert (rot == 0).all()
    characters.append(np.unique(chars))
  everything = np.concatenate(characters)
  assert len(np.unique(everything)) == len(everything)  # Disjoint splits.
  np.testing.assert_array_equal(
      np.sort(np.unique(everything)), np.arange(1, NUM_CHARACTERS + 1)
  )


@pytest.mark.parametrize("scheme", ["vinyals", "finn"])
def test_pools_hold_the_split_json_characters(
    load_real_omniglot, global_id, scheme
):
  splits = load_real_omniglot(
      split_scheme=scheme, rotations=False, device=False
  )
  for split, names in _omniglot.split_names(scheme).items():
    pool = getattr(splits, split)
    np.testing.assert_array_equal(
        np.asarray(pool.class_ids) // 4, [global_id[n] for n in names]
    )


def test_vinyals_test_is_last_423_evaluation_characters(raw, global_id):
  test = _omniglot.split_names("vinyals")["test"]
  assert set(test) <= set(raw["evaluation"].names)
  assert sorted(global_id[n] for n in test) == list(
      range(NUM_CHARACTERS - 422, NUM_CHARACTERS + 1)
  )


def test_vinyals_val_is_whole_alphabets(global_id):
  splits = _omniglot.split_names("vinyals")
  in_val_alphabets = {
      n for n in global_id if _alphabet(n) in VINYALS_VAL_ALPHABETS
  }
  assert set(splits["val"]) == in_val_alphabets
  assert len(splits["val"]) == len(in_val_alphabets)
  train = set(global_id) - set(splits["val"]) - set(splits["test"])
  assert set(splits["train"]) == train


def test_finn_split_is_seed_1_permutation_by_global_id(global_id):
  splits = _omniglot.split_names("finn")
  by_id = sorted(global_id, key=global_id.get)
  order = [by_id[i] for i in np.random.RandomState(1).permutation(len(by_id))]
  assert splits["train"] == order[:1100]
  assert splits["val"] == order[1100:1200]
  assert splits["test"] == order[1200:]


def test_unknown_split_scheme_raises():
  with pytest.raises(ValueError, match=r"unknown Omniglot split scheme 'x'"):
    _omniglot.split_names("x")


# ---------------------------------------------------------------------------
# Rotations and resizing.


@pytest.mark.parametrize(
    "r", [pytest.param(r, id=f"rot{90 * r}") for r in (1, 2, 3)]
)
def test_rotated_classes(omniglot, r):
  pool = omniglot.train
  images = np.asarray(pool.images).reshape(-1, 4, *pool.images.shape[1:])
  ids = np.asarray(pool.class_ids).reshape(-1, 4)
  rotated = np.rot90(images[:, 0], k=r, axes=(2, 3))
  np.testing.assert_array_equal(images[:, r], rotated)
  np.testing.assert_array_equal(ids[:, r], ids[:, 0] + r)
  # Not a no-op: nearly every character changes when rotated.
  changed = (images[:, r] != images[:, 0]).any(axis=(1, 2, 3, 4))
  assert changed.mean() > 0.95


def test_with_rotations_tiny():
  images = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
  rotated, ids = with_rotations(images, np.array([7, 9]))
  assert rotated.shape == (8, 3, 2, 2)
  np.testing.assert_array_equal(ids, [28, 29, 30, 31, 36, 37, 38, 39])
  for c in range(2):
    for r in range(4):
      np.testing.assert_array_equal(
          rotated[4 * c + r], np.rot90(images[c], k=r, axes=(1, 2))
      )


@pytest.mark.parametrize(
    "shape,size,expected",
    [
        pytest.param((2, 3, 105, 105), 28, (2, 3, 28, 28), id="no-channel"),
        pytest.param((2, 105, 105, 1), 14, (2, 14, 14, 1), id="channel"),
        pytest.param((4, 105, 105), 105, (4, 105, 105), id="same-size"),
    ],
)
def test_resize_shape(raw, shape, size, expected):
  source = raw["evaluation"].images.reshape(-1, 105, 105)
  images = source[: np.prod(shape) // 105**2].reshape(shape)
  out = resize_images(images, size)
  assert out.shape == expected
  assert out.dtype == np.uint8
  if size == 105:
    assert out is images
  else:
    assert out.max() > 128  # Ink survives the resize.


# ---------------------------------------------------------------------------
# Cache.


def test_cache_written_and_reused(
    omniglot, load_real_omniglot, cache_dir, monkeypatch
):
  written = sorted(p.name for p in cache_dir.glob("omniglot_*"))
  assert len(written) == 1  # One file, no temporary left behind.
  assert re.fullmatch(r"omniglot_28px_[0-9a-f]{10}\.npz", written[0])

  def no_source(*args, **kwargs):
    raise AssertionError("read the source files despite a cache")

  monkeypatch.setattr(_omniglot, "read_all", no_source)
  again = load_real_omniglot(device=False)
  np.testing.assert_array_equal(again.train.images, omniglot.train.images)
  np.testing.assert_array_equal(again.test.class_ids, omniglot.test.class_ids)
  with pytest.raises(AssertionError, match="despite a cache"):
    load_real_omniglot(use_cache=False)


def test_concurrent_cache_writers_do_not_collide(tmp_path, monkeypatch):
  """Two loaders that miss the cache at once (parallel jobs) both succeed.

  The second writer is run while the first sits between writing its
  temporary file and renaming it into place.
  """
  tiny = _omniglot.OmniglotCharacters(
      np.full((2, 20, 8, 8), 255, np.uint8),
      ("A/character01", "A/character02"),
      np.array([1, 2], np.int32),
  )
  monkeypatch.setattr(_omniglot, "read_all", lambda root, verify: tiny)
  real_savez = np.savez
  interleaved = []

  def savez_then_other_writer(*args, **kwargs):
    real_savez(*args, **kwargs)
    if not interleaved:
      interleaved.append(True)
      _omniglot._resized_characters(tmp_path, 4, tmp_path / "cache", True)

  monkeypatch.setattr(np, "savez", savez_then_other_writer)
  chars = _omniglot._resized_characters(tmp_path, 4, tmp_path / "cache", True)
  assert interleaved
  assert chars.images.shape == (2, 20, 4, 4)
  left = [p.name for p in (tmp_path / "cache").iterdir()]
  assert len(left) == 1, left  # The cache, and no temporary file.
  assert re.fullmatch(r"omniglot_4px_[0-9a-f]{10}\.npz", left[0])


def _write_tiny_npz(root: pathlib.Path, ink: int) -> None:
  """Both sets in the npz layout, one 8 px character each, all ``ink``."""
  root.mkdir(parents=True, exist_ok=True)
  for gid, which in enumerate(_omniglot.SETS, start=1):
    np.savez(
        root / f"omniglot_{which}.npz",
        images=np.full((20, 8, 8), 255 - ink, np.uint8),  # 0 = ink in files.
        class_names=np.array([f"A{gid}/character01"]),
        class_global_id=np.array([gid], np.int32),
    )


def test_cache_is_renewed_when_a_source_file_is_replaced(
    tmp_path, monkeypatch
):
  root, cache = tmp_path / "omniglot", tmp_path / "cache"
  _write_tiny_npz(root, ink=255)
  first = _omniglot._resized_characters(root, 4, cache, False)
  assert (first.images == 255).all()
  # Replaced in place, same size, by the same path: only the contents and
  # the modification time differ.
  _write_tiny_npz(root, ink=7)
  for path in root.iterdir():
    os.utime(path, ns=(path.stat().st_atime_ns, 10**18))
  second = _omniglot._resized_characters(root, 4, cache, False)
  assert (second.images == 7).all()
  assert len(list(cache.glob("omniglot_4px_*.npz"))) == 2
  # Unchanged files still hit the cache.
  monkeypatch.setattr(_omniglot, "read_all", None)  # Not called.
  again = _omniglot._resized_characters(root, 4, cache, False)
  np.testing.assert_array_equal(again.images, second.images)
  assert len(list(cache.glob("omniglot_4px_*.npz"))) == 2


# ---------------------------------------------------------------------------
# Checksums and missing data.


def _corrupt_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.parent.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(src, dst)
  with open(dst, "r+b") as f:
    f.seek(dst.stat().st_size // 2)
    byte = f.read(1)
    f.seek(-1, io.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  return dst


@pytest.mark.parametrize("which", ["background", "evaluation"])
def test_read_npz_corrupt_copy_raises(omniglot_root, tmp_path, which):
  name = f"omniglot_{which}.npz"
  bad = _corrupt_copy(omniglot_root / name, tmp_path / name)
  with pytest.raises(ValueError, match=r"sha256 .* expected .* corrupt"):
    _omniglot.read_npz(bad)


def test_load_omniglot_corrupt_copy_raises(omniglot_root, tmp_path):
  root = tmp_path / "omniglot"
  _corrupt_copy(
      omniglot_root / "omniglot_background.npz",
      root / "omniglot_background.npz",
  )
  (root / "omniglot_evaluation.npz").symlink_to(
      omniglot_root / "omniglot_evaluation.npz"
  )
  with pytest.raises(ValueError, match="corrupt"):
    load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
  assert not (tmp_path / "cache").exists()


def test_zip_with_wrong_md5_raises(omniglot_root, tmp_path):
  root = tmp_path / "omniglot"
  root.mkdir()
  # A genuine Omniglot zip, but not the full official background zip.
  shutil.copyfile(omniglot_root / SMALL1_ZIP, root / "images_background.zip")
  with pytest.raises(ValueError, match=r"images_background\.zip has md5"):
    _omniglot.read_all(root)


@pytest.mark.parametrize(
    "present",
    [
        pytest.param((), id="empty"),
        pytest.param(("omniglot_evaluation.npz",), id="evaluation-only"),
    ],
)
def test_missing_dataset_raises(omniglot_root, tmp_path, present):
  root = tmp_path / "omniglot"
  root.mkdir()
  for name in present:
    (root / name).symlink_to(omniglot_root / name)
  with pytest.raises(DatasetNotFoundError) as info:
    load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  for expected in (
      str(root),
      "omniglot_background.npz",
      "omniglot_evaluation.npz",
      "images_background.zip",
      "images_evaluation.zip",
      "METALEARN_DATA_DIR",
      # The TFDS location the loader actually checks.
      str(tmp_path / "tensorflow_datasets"),
  ):
    assert expected in message


# ---------------------------------------------------------------------------
# Lake et al.'s split and the alphabet of each class.

LAKE_VAL_ALPHABETS = {
    "Alphabet_of_the_Magi",
    "Bengali",
    "Futurama",
    "Japanese_(hiragana)",
    "N_Ko",
}


@pytest.fixture(scope="module")
def lake(load_real_omniglot, omniglot):
  """Lake split, no rotations, on the host: 787/177/659 classes."""
  del omniglot  # Requested so that the resized cache already exists.
  return load_real_omniglot(
      split_scheme="lake", rotations=False, device=False
  )


def test_lake_split_is_background_against_evaluation(lake, raw, global_id):
  background = {global_id[n] for n in raw["background"].names}
  evaluation = {global_id[n] for n in raw["evaluation"].names}
  train, val, test = (
      set((np.asarray(p.class_ids) // 4).tolist())
      for p in (lake.train, lake.val, lake.test)
  )
  assert (len(train) + len(val), len(test)) == (964, 659)
  assert (lake.train.num_classes, lake.val.num_classes) == (787, 177)
  assert lake.test.num_classes == 659
  assert train | val == background and not train & val
  assert test == evaluation


def test_lake_val_is_every_sixth_background_alphabet(raw):
  splits = _omniglot.split_names("lake")
  background = sorted({_alphabet(n) for n in raw["background"].names})
  assert set(background[::6]) == LAKE_VAL_ALPHABETS
  val = {_alphabet(n) for n in splits["val"]}
  train = {_alphabet(n) for n in splits["train"]}
  assert val == LAKE_VAL_ALPHABETS and len(train) == 25
  assert not val & train
  assert {_alphabet(n) for n in splits["test"]} == {
      _alphabet(n) for n in raw["evaluation"].names
  }


def test_pool_alphabets_follow_the_class_names(lake):
  splits = _omniglot.split_names("lake")
  ids = {}
  for split, names in splits.items():
    alphabets = np.asarray(getattr(lake, split).alphabets)
    assert alphabets.dtype == np.int32 and alphabets.shape == (len(names),)
    for name, a in zip(names, alphabets.tolist(), strict=True):
      assert ids.setdefault(_alphabet(name), a) == a
  # One id per alphabet, 4 * index: 25 + 5 + 20 distinct alphabets.
  assert sorted(ids.values()) == [4 * i for i in range(50)]
  assert len(np.unique(np.asarray(lake.train.alphabets))) == 25
  assert len(np.unique(np.asarray(lake.val.alphabets))) == 5
  assert len(np.unique(np.asarray(lake.test.alphabets))) == 20


def test_rotated_classes_are_in_rotated_alphabets(omniglot):
  pool = omniglot.train
  alphabets = np.asarray(pool.alphabets).reshape(-1, 4)
  ids = np.asarray(pool.class_ids).reshape(-1, 4)
  np.testing.assert_array_equal(alphabets % 4, ids % 4)
  np.testing.assert_array_equal(
      alphabets // 4, np.repeat(alphabets[:, :1] // 4, 4, axis=1)
  )
