"""Networks used by the meta-learners, as pure ``init``/``apply`` pairs."""

from metalearn.models._base import (
    NORMS,
    Model,
    bind,
    forward,
    from_flax,
    has_state,
    support_forward,
    support_statistics,
    uses_support_statistics,
)
from metalearn.models._conv import conv2d
from metalearn.models._layers import BatchNorm, max_pool_2x2, standardize
from metalearn.models._nets import Conv4, ResNet12, conv4, mlp, resnet12
from metalearn.models._nnx import from_nnx

__all__ = (
    "NORMS",
    "BatchNorm",
    "Conv4",
    "Model",
    "ResNet12",
    "bind",
    "conv2d",
    "conv4",
    "forward",
    "from_flax",
    "from_nnx",
    "has_state",
    "max_pool_2x2",
    "mlp",
    "resnet12",
    "standardize",
    "support_forward",
    "support_statistics",
    "uses_support_statistics",
)
