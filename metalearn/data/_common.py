"""Data directories, checksums, resizing and pool assembly shared by loaders."""

import hashlib
import os
import pathlib
from typing import NamedTuple

import jax
import numpy as np
from PIL import Image

from metalearn.types import ClassPool

DATA_DIR_ENV = "METALEARN_DATA_DIR"
CACHE_DIR_ENV = "METALEARN_CACHE_DIR"
_DEFAULT_DATA_DIR = "~/metalearn_data"
_DEFAULT_CACHE_DIR = "~/.cache/metalearn"


class DatasetSplits(NamedTuple):
  """The meta-train, meta-validation and meta-test class pools of a dataset."""

  train: ClassPool
  val: ClassPool
  test: ClassPool


class DatasetNotFoundError(FileNotFoundError):
  """Raised when a dataset is not where the data directory says."""


class DataChecksumError(ValueError):
  """Raised when a data file does not have its published checksum.

  The message, one line, names the file: it is corrupt or another version.
  """


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the data directory: the argument, else ``$METALEARN_DATA_DIR``.

  Falls back to ``~/metalearn_data`` when neither is set. The path comes
  back absolute: a relative one is taken relative to the working directory
  of the process that reads it (for a Jupyter kernel, the notebook's
  folder), and the messages of :class:`DatasetNotFoundError` show the
  absolute path that was tried.
  """
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV, _DEFAULT_DATA_DIR)
  return pathlib.Path(data_dir).expanduser().absolute()


def resolve_cache_dir(
    cache_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
  """Returns the cache directory.

  The argument, else ``$METALEARN_CACHE_DIR``, else ``~/.cache/metalearn``.
  """
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_DIR_ENV, _DEFAULT_CACHE_DIR)
  return pathlib.Path(cache_dir).expanduser()


def file_digest(path: pathlib.Path, algorithm: str = "sha256") -> str:
  """Hex digest of a file, read in 1 MiB chunks."""
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def files_tag(root: pathlib.Path, files: list[pathlib.Path]) -> str:
  """A short hash of ``root`` and the size and mtime of each of ``files``.

  Names a cache of what was read from ``files``, so that a file replaced or
  edited in place (a new size or modification time) gives a new name.
  """
  h = hashlib.sha1(str(root.resolve()).encode())
  for path in files:
    st = path.stat()
    name = pathlib.Path(os.path.relpath(path, root)).as_posix()
    h.update(f"|{name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:10]


def verify_digest(path: pathlib.Path, expected: str, algorithm: str) -> None:
  """Raises :class:`DataChecksumError` if ``path`` has another digest."""
  actual = file_digest(path, algorithm)
  if actual != expected:
    raise DataChecksumError(
        f"{path} has {algorithm} {actual}, expected {expected}: the file is "
        "corrupt or a different version; replace it (the loaders' "
        "verify=False skips this check)"
    )


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes ``uint8 [..., H, W]`` or ``[..., H, W, C]`` images with Lanczos.

  Lanczos is what Finn et al.'s preprocessing of Omniglot to 28x28 uses.
  """
  if images.ndim < 3:
    raise ValueError(f"expected a batch of images, got shape {images.shape}")
  has_channels = images.shape[-1] in (1, 3) and images.ndim >= 4
  spatial = images.shape[-3:-1] if has_channels else images.shape[-2:]
  if tuple(spatial) == (size, size):
    return images
  lead = images.shape[: -3 if has_channels else -2]
  flat = images.reshape(-1, *images.shape[len(lead):])
  out = np.stack([
      np.asarray(
          Image.fromarray(img.squeeze(-1) if img.shape[-1:] == (1,) else img)
          .resize((size, size), Image.LANCZOS)
      )
      for img in flat
  ])
  if has_channels and out.ndim == 3:
    out = out[..., None]
  return out.reshape(*lead, *out.shape[1:])


def make_pool(
    images: np.ndarray,
    class_ids: np.ndarray,
    *,
    alphabets: np.ndarray | None = None,
    device: bool = True,
) -> ClassPool:
  """Builds a :class:`ClassPool`, placed on the default device by default.

  Args:
    images: ``uint8 [classes, examples, H, W]`` or ``[..., H, W, C]``.
    class_ids: ``int [classes]``.
    alphabets: ``int [classes]``, the alphabet (super-class) of each class,
      or ``None``.
    device: place the arrays on the default JAX device once, so jitted steps
      read them without a host transfer per call.

  Returns:
    The pool, images with an explicit channel axis.
  """
  if images.dtype != np.uint8:
    raise ValueError(f"pool images must be uint8, got {images.dtype}")
  if images.ndim == 4:
    images = images[..., None]
  if images.ndim != 5:
    raise ValueError(
        "pool images must be [classes, examples, H, W(, C)], got "
        f"shape {images.shape}"
    )
  arrays = [images]
  for name, ids in (("class ids", class_ids), ("alphabets", alphabets)):
    if ids is None:
      arrays.append(None)
      continue
    ids = np.asarray(ids, np.int32)
    if ids.shape != images.shape[:1]:
      raise ValueError(f"{ids.size} {name} for {images.shape[0]} classes")
    arrays.append(ids)
  if device:
    arrays = [None if a is None else jax.device_put(a) for a in arrays]
  return ClassPool(*arrays)
