"""Meta-learners: MAML and its family, Prototypical Networks, MLTI."""

from metalearn.metalearners._base import (
    RUNNING_NORM_WARNING,
    MetaLearner,
    MixedLabels,
    WithModelState,
    adaptation_learner,
    default_meta_grad,
    embedding_learner,
    make_learner,
    task_loss,
)
from metalearn.metalearners._imaml import (
    conjugate_gradient,
    imaml,
    implicit_solution,
    proximal,
)
from metalearn.metalearners._incontext import (
    ContextCache,
    InContextParams,
    InContextTransformer,
    in_context,
)
from metalearn.metalearners._inner import (
    InnerResult,
    inner_optimize,
    inner_sgd,
    scale_by_rates,
)
from metalearn.metalearners._maml import MetaSGDParams, anil, maml, metasgd
from metalearn.metalearners._metaoptnet import (
    SVMHead,
    crammer_singer_dual,
    metaoptnet,
)
from metalearn.metalearners._mixing import (
    MixedInputs,
    cutmix,
    feature_mixing,
    interpolate_tasks,
)
from metalearn.metalearners._mlti import EpisodePair, mlti, paired_sampler
from metalearn.metalearners._protonet import (
    ScaledParams,
    cosine_similarities,
    meta_baseline,
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
from metalearn.metalearners._supervised import (
    FittedHead,
    Head,
    SupervisedParams,
    baseline,
    baseline_pp,
    finetune_backbone,
    finetune_head,
    logistic_regression,
    rfs,
    supervised,
)

__all__ = (
    "ContextCache",
    "EpisodePair",
    "FittedHead",
    "Head",
    "InContextParams",
    "InContextTransformer",
    "InnerResult",
    "RUNNING_NORM_WARNING",
    "MetaLearner",
    "MetaSGDParams",
    "MixedInputs",
    "MixedLabels",
    "R2D2Params",
    "ReptileParams",
    "ScaledParams",
    "RidgeHead",
    "SVMHead",
    "SupervisedParams",
    "WithModelState",
    "adaptation_learner",
    "anil",
    "baseline",
    "baseline_pp",
    "conjugate_gradient",
    "cosine_similarities",
    "crammer_singer_dual",
    "cutmix",
    "default_meta_grad",
    "embedding_learner",
    "feature_mixing",
    "finetune_backbone",
    "finetune_head",
    "imaml",
    "implicit_solution",
    "in_context",
    "inner_optimize",
    "inner_sgd",
    "interpolate_tasks",
    "logistic_regression",
    "make_learner",
    "maml",
    "meta_baseline",
    "metaoptnet",
    "metasgd",
    "mlti",
    "paired_sampler",
    "protonet",
    "prototypes",
    "proximal",
    "r2d2",
    "reptile",
    "rfs",
    "ridge_regression",
    "scale_by_rates",
    "squared_distances",
    "supervised",
    "task_loss",
)
