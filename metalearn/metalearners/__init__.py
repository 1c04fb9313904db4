"""Meta-learners: MAML and its family, Prototypical Networks, MLTI."""

from metalearn.metalearners._base import (
    MetaLearner,
    MixedLabels,
    WithModelState,
    adaptation_learner,
    default_meta_grad,
    make_learner,
    task_loss,
)
from metalearn.metalearners._maml import (
    MetaSGDParams,
    ReptileParams,
    anil,
    inner_sgd,
    maml,
    metasgd,
    reptile,
)
from metalearn.metalearners._mixing import (
    MixedInputs,
    cutmix,
    feature_mixing,
    interpolate_tasks,
)
from metalearn.metalearners._mlti import EpisodePair, mlti, paired_sampler
from metalearn.metalearners._protonet import (
    protonet,
    prototypes,
    squared_distances,
)

__all__ = (
    "EpisodePair",
    "MetaLearner",
    "MetaSGDParams",
    "MixedInputs",
    "MixedLabels",
    "ReptileParams",
    "WithModelState",
    "adaptation_learner",
    "anil",
    "cutmix",
    "default_meta_grad",
    "feature_mixing",
    "inner_sgd",
    "interpolate_tasks",
    "make_learner",
    "maml",
    "metasgd",
    "mlti",
    "paired_sampler",
    "protonet",
    "prototypes",
    "reptile",
    "squared_distances",
    "task_loss",
)
