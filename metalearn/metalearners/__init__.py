"""Meta-learners: MAML and its family, Prototypical Networks."""

from metalearn.metalearners._base import (
    MetaLearner,
    default_meta_grad,
    make_learner,
    task_loss,
)
from metalearn.metalearners._maml import (
    MetaSGDParams,
    anil,
    inner_sgd,
    maml,
    metasgd,
    reptile,
)
from metalearn.metalearners._protonet import (
    protonet,
    prototypes,
    squared_distances,
)

__all__ = (
    "MetaLearner",
    "MetaSGDParams",
    "anil",
    "default_meta_grad",
    "inner_sgd",
    "make_learner",
    "maml",
    "metasgd",
    "protonet",
    "prototypes",
    "reptile",
    "squared_distances",
    "task_loss",
)
