"""metalearn: meta-learning research in JAX.

Pure-functional task samplers feed episodic batches into swappable
meta-learners, jitted and vmapped over tasks. Heavy optional dependencies
(hydra, wandb, tensorflow) are imported only by the modules that need them.
"""

from metalearn import (
    data,
    learned_optimizers,
    metalearners,
    models,
    tasks,
    training,
)
from metalearn.types import ClassPool, Episode

__version__ = "0.1.0"

__all__ = (
    "ClassPool",
    "Episode",
    "data",
    "learned_optimizers",
    "metalearners",
    "models",
    "tasks",
    "training",
)
