"""Task distributions: pure, jittable episode samplers, and tasksets."""

# Importing _datasets registers the built-in datasets.
from metalearn.tasks import _datasets as _datasets
from metalearn.tasks._augment import (
    APPLY_TO,
    affine_warp,
    augment_images,
    augmentation,
    augmented,
    chain,
    color_jitter,
    random_affine,
    random_crop,
    random_flip,
)
from metalearn.tasks._batches import batch_sampler, sample_images
from metalearn.tasks._episodes import (
    TaskSampler,
    TasksetArgumentError,
    episode_sampler,
    sample_batch,
    sample_episode,
    validate_episode_request,
    validate_within_alphabet,
)
from metalearn.tasks._registry import (
    POOL_OPTIONS,
    DatasetEntry,
    EpisodeShape,
    Tasksets,
    dataset_options,
    list_datasets,
    register_dataset,
)
from metalearn.tasks._sinusoid import sample_sinusoid, sinusoid_sampler
from metalearn.tasks._tasksets import check_taskset_args, get_tasksets

__all__ = (
    "APPLY_TO",
    "POOL_OPTIONS",
    "DatasetEntry",
    "EpisodeShape",
    "TaskSampler",
    "TasksetArgumentError",
    "Tasksets",
    "affine_warp",
    "augment_images",
    "augmentation",
    "augmented",
    "batch_sampler",
    "chain",
    "check_taskset_args",
    "color_jitter",
    "dataset_options",
    "episode_sampler",
    "get_tasksets",
    "list_datasets",
    "random_affine",
    "random_crop",
    "random_flip",
    "register_dataset",
    "sample_batch",
    "sample_episode",
    "sample_images",
    "sample_sinusoid",
    "sinusoid_sampler",
    "validate_episode_request",
    "validate_within_alphabet",
)
