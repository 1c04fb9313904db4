"""Learned optimisers: meta-learned update rules as optax transformations.

A :class:`LearnedOptimizer` is ``init(key) -> theta`` plus ``opt_fn(theta)
-> optax.GradientTransformation``, so it composes with ``optax.chain`` and
drives any inner loop. It is used two ways: as the inner loop of a few-shot
meta-learner (:func:`meta_lstm`, :func:`learned_optimizer_learner`), and
meta-trained on a task family over long horizons, where *what is learned*
(:func:`truncated_unroll`) is kept apart from *how its meta-gradient is
estimated* (:func:`truncated_backprop`, :func:`pes`, :func:`bootstrapped`).
"""

from metalearn.learned_optimizers._base import (
    LearnableSGDParams,
    LearnedOptimizer,
    learnable_sgd,
    log_sign_features,
)
from metalearn.learned_optimizers._compare import (
    BASELINES,
    compare,
    loss_curves,
    summarize_curves,
    tune_learning_rates,
    verdict,
)
from metalearn.learned_optimizers._estimators import (
    ESTIMATORS,
    GradientEstimator,
    PESState,
    bootstrapped,
    make_estimator,
    pes,
    truncated_backprop,
    truncated_es,
)
from metalearn.learned_optimizers._learner import (
    LearnedOptimizerLearnerParams,
    inner_loop,
    learned_optimizer_learner,
    meta_lstm,
)
from metalearn.learned_optimizers._lstm import (
    LSTMOptimizerParams,
    LSTMOptimizerState,
    lstm_optimizer,
)
from metalearn.learned_optimizers._meta_lstm import (
    MetaLSTMOptimizerParams,
    MetaLSTMOptimizerState,
    meta_lstm_optimizer,
)
from metalearn.learned_optimizers._mlp import (
    MLPOptimizerParams,
    MLPOptimizerState,
    mlp_optimizer,
)
from metalearn.learned_optimizers._outer import (
    OuterState,
    init_outer_state,
    make_outer_step,
    outer_train,
)
from metalearn.learned_optimizers._unroll import (
    InnerState,
    TaskFamily,
    TruncatedUnroll,
    model_task_family,
    training_curves,
    truncated_unroll,
)

__all__ = (
    "BASELINES",
    "ESTIMATORS",
    "GradientEstimator",
    "InnerState",
    "LSTMOptimizerParams",
    "LSTMOptimizerState",
    "LearnableSGDParams",
    "LearnedOptimizer",
    "LearnedOptimizerLearnerParams",
    "MLPOptimizerParams",
    "MLPOptimizerState",
    "MetaLSTMOptimizerParams",
    "MetaLSTMOptimizerState",
    "OuterState",
    "PESState",
    "TaskFamily",
    "TruncatedUnroll",
    "bootstrapped",
    "compare",
    "init_outer_state",
    "loss_curves",
    "inner_loop",
    "learnable_sgd",
    "learned_optimizer_learner",
    "summarize_curves",
    "tune_learning_rates",
    "verdict",
    "log_sign_features",
    "lstm_optimizer",
    "make_estimator",
    "make_outer_step",
    "meta_lstm",
    "meta_lstm_optimizer",
    "mlp_optimizer",
    "model_task_family",
    "outer_train",
    "pes",
    "training_curves",
    "truncated_backprop",
    "truncated_es",
    "truncated_unroll",
)
