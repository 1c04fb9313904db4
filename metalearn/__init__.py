"""metalearn: meta-learning research in JAX.

Pure-functional task samplers feed episodic batches into swappable
meta-learners, jitted and vmapped over tasks. Heavy optional dependencies
(hydra, wandb, tensorflow) are imported only by the modules that need them.
"""

# Before anything imports jax: XLA reads XLA_FLAGS when jax starts a backend.
from metalearn import _xla_flags

_xla_flags.apply()

from metalearn import (  # noqa: E402
    data,
    learned_optimizers,
    metalearners,
    models,
    tasks,
    training,
)
from metalearn.types import ClassPool, Episode  # noqa: E402

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
