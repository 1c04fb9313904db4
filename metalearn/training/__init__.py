"""Meta-training and meta-evaluation, generic over meta-learners."""

from metalearn.training._loop import (
    NonFiniteLossError,
    evaluate,
    make_eval_fn,
    meta_train,
)
from metalearn.training._step import (
    MetaTrainState,
    default_task_map,
    init_state,
    make_meta_step,
    map_tasks,
)

__all__ = (
    "MetaTrainState",
    "NonFiniteLossError",
    "default_task_map",
    "evaluate",
    "init_state",
    "make_eval_fn",
    "make_meta_step",
    "map_tasks",
    "meta_train",
)
