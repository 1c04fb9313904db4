"""Dataset loaders that build on-device class pools (host side, run once)."""

from metalearn.data._common import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    DataChecksumError,
    DatasetNotFoundError,
    DatasetSplits,
    make_pool,
    resize_images,
    resolve_data_dir,
)
from metalearn.data._fewtask import merge_pools, restrict_classes
from metalearn.data._miniimagenet import load_mini_imagenet
from metalearn.data._omniglot import load_omniglot, with_rotations
from metalearn.data._omniglot import split_names as omniglot_split_names

__all__ = (
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "DataChecksumError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "load_mini_imagenet",
    "load_omniglot",
    "make_pool",
    "merge_pools",
    "omniglot_split_names",
    "resize_images",
    "resolve_data_dir",
    "restrict_classes",
    "with_rotations",
)
