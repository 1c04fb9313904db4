"""Meta-training and meta-evaluation, generic over meta-learners."""

from metalearn.training._loop import (
    NonFiniteLossError,
    evaluate,
    make_eval_fn,
    meta_train,
)
from metalearn.training._sharding import (
    TASK_AXIS,
    initialize_distributed,
    map_devices,
    replicate,
    shard_tasks,
    task_mesh,
)
from metalearn.training._step import (
    MetaTrainState,
    default_task_map,
    init_state,
    make_meta_step,
    map_tasks,
    mean_over_tasks,
    outer_optimizer,
    set_carried,
)

__all__ = (
    "MetaTrainState",
    "NonFiniteLossError",
    "TASK_AXIS",
    "default_task_map",
    "evaluate",
    "init_state",
    "initialize_distributed",
    "make_eval_fn",
    "make_meta_step",
    "map_devices",
    "map_tasks",
    "mean_over_tasks",
    "meta_train",
    "outer_optimizer",
    "replicate",
    "set_carried",
    "shard_tasks",
    "task_mesh",
)
