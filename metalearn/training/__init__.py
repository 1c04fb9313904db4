"""Meta-training and meta-evaluation, generic over meta-learners."""

from metalearn.training._step import (
    MetaTrainState,
    default_task_map,
    init_state,
    make_meta_step,
    map_tasks,
)

__all__ = (
    "MetaTrainState",
    "default_task_map",
    "init_state",
    "make_meta_step",
    "map_tasks",
)
