"""Networks used by the meta-learners, as pure ``init``/``apply`` pairs."""

from metalearn.models._base import Model, from_flax
from metalearn.models._conv import conv2d
from metalearn.models._layers import BatchNorm, max_pool_2x2
from metalearn.models._nets import Conv4, ResNet12, conv4, mlp, resnet12

__all__ = (
    "BatchNorm",
    "Conv4",
    "Model",
    "ResNet12",
    "conv2d",
    "conv4",
    "from_flax",
    "max_pool_2x2",
    "mlp",
    "resnet12",
)
