"""Task distributions: pure, jittable episode samplers."""

from metalearn.tasks._episodes import (
    TaskSampler,
    episode_sampler,
    sample_batch,
    sample_episode,
    validate_episode_request,
)
from metalearn.tasks._sinusoid import sample_sinusoid, sinusoid_sampler

__all__ = (
    "TaskSampler",
    "episode_sampler",
    "sample_batch",
    "sample_episode",
    "sample_sinusoid",
    "sinusoid_sampler",
    "validate_episode_request",
)
