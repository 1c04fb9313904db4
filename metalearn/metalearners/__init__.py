"""Meta-learners: MAML and its family, Prototypical Networks, MLTI."""

from metalearn.metalearners._base import (
    RUNNING_NORM_WARNING,
    MetaLearner,
    MixedLabels,
    WithModelState,
    adaptation_learner,
    default_meta_grad,
    make_learner,
    task_loss,
)
from metalearn.metalearners._imaml import (
    conjugate_gradient,
    imaml,
    implicit_solution,
    proximal,
)
from metalearn.metalearners._inner import (
    InnerResult,
    inner_optimize,
    inner_sgd,
    scale_by_rates,
)
from metalearn.metalearners._maml import MetaSGDParams, anil, maml, metasgd
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
from metalearn.metalearners._r2d2 import (
    R2D2Params,
    RidgeHead,
    r2d2,
    ridge_regression,
)
from metalearn.metalearners._reptile import ReptileParams, reptile

__all__ = (
    "EpisodePair",
    "InnerResult",
    "RUNNING_NORM_WARNING",
    "MetaLearner",
    "MetaSGDParams",
    "MixedInputs",
    "MixedLabels",
    "R2D2Params",
    "ReptileParams",
    "RidgeHead",
    "WithModelState",
    "adaptation_learner",
    "anil",
    "conjugate_gradient",
    "cutmix",
    "default_meta_grad",
    "feature_mixing",
    "imaml",
    "implicit_solution",
    "inner_optimize",
    "inner_sgd",
    "interpolate_tasks",
    "make_learner",
    "maml",
    "metasgd",
    "mlti",
    "paired_sampler",
    "protonet",
    "prototypes",
    "proximal",
    "r2d2",
    "reptile",
    "ridge_regression",
    "scale_by_rates",
    "squared_distances",
    "task_loss",
)
