"""The standard few-shot networks: Conv-4 variants, ResNet-12, sinusoid MLP."""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn.models._base import Model, check_norm, from_flax
from metalearn.models._conv import conv2d
from metalearn.models._layers import max_pool_2x2, norm_layer

_DOWNSAMPLE = ("max_pool", "stride")
_READOUT = ("mean", "flatten")
Stage = Callable[[dict, jax.Array], jax.Array]


def _stage(module: nn.Module, name: str, activation=None) -> Stage:
  """A :attr:`Model.layers` stage: ``module`` with the params under
  ``name``, then an optional activation."""

  def stage(params, h):
    h = module.apply({"params": params[name]}, h)
    return h if activation is None else activation(h)

  return stage


def _readout(pool: Callable[[jax.Array], jax.Array],
             num_outputs: int | None) -> Stage:
  """The last stage: spatial pooling, then the ``head`` if there is one."""

  def stage(params, h):
    h = pool(h)
    if num_outputs is not None:
      h = nn.Dense(num_outputs).apply({"params": params["head"]}, h)
    return h

  return stage


def _check_readout(readout: str | None) -> None:
  if readout is not None and readout not in _READOUT:
    raise ValueError(
        f"readout must be None or one of {_READOUT}, got {readout!r}")


def _conv4_pool(x: jax.Array, downsample: str,
                readout: str | None = None) -> jax.Array:
  """Conv-4's features: averaged over space or flattened (by default
  averaged after stride-2 convolutions, flattened after max-pooling)."""
  if readout is None:
    readout = "mean" if downsample == "stride" else "flatten"
  _check_readout(readout)
  if readout == "mean":
    return x.mean(axis=(-3, -2))
  return x.reshape(*x.shape[:-3], -1)


# Blocks after the fourth keep the resolution (Chen et al.'s Conv-6).
_DOWNSAMPLING_BLOCKS = 4


def _block_downsample(downsample: str, index: int) -> str | None:
  return downsample if index < _DOWNSAMPLING_BLOCKS else None


def _global_average(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(-3, -2))


class ConvBlock(nn.Module):
  """3x3 convolution, BatchNorm (``norm``), ReLU, then 2x downsampling
  (``downsample``: ``"max_pool"``, ``"stride"``, or ``None`` for none)."""

  features: int
  downsample: str | None = "max_pool"
  norm: str = "transductive"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    stride = 2 if self.downsample == "stride" else 1
    x = nn.Conv(
        self.features,
        (3, 3),
        strides=stride,
        padding="SAME",
        conv_general_dilated=conv2d,
    )(x)
    x = nn.relu(norm_layer(self.norm, x, train))
    if self.downsample == "max_pool":
      x = max_pool_2x2(x)
    return x


class Conv4(nn.Module):
  """The four-block convolutional network of the few-shot literature.

  Attributes:
    num_outputs: size of the linear ``head``; ``None`` returns the flattened
      features (an embedding, as Prototypical Networks use).
    features: filters per block (64 for Omniglot, 32 for MAML on
      Mini-ImageNet).
    downsample: ``"max_pool"`` (2x2 max-pooling after each block; features
      are flattened) or ``"stride"`` (stride-2 convolutions; features are
      averaged over space), the variant Finn et al. use on Omniglot.
    readout: ``None`` (as ``downsample`` says), ``"mean"`` (average the last
      map over space) or ``"flatten"`` (Nichol et al.'s Reptile network:
      stride-2 convolutions, the last 2x2 map flattened).
    norm: ``"transductive"``, ``"running"``, ``"support"`` or ``"none"``
      (see :func:`conv4`).
    num_blocks: convolutional blocks (see :func:`conv4`).
  """

  num_outputs: int | None
  features: int = 64
  downsample: str = "max_pool"
  readout: str | None = None
  norm: str = "transductive"
  num_blocks: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    for i in range(self.num_blocks):
      x = ConvBlock(self.features, _block_downsample(self.downsample, i),
                    self.norm, name=f"block{i}")(x, train)
    x = _conv4_pool(x, self.downsample, self.readout)
    if self.num_outputs is not None:
      x = nn.Dense(self.num_outputs, name="head")(x)
    return x


def conv4(
    num_outputs: int | None,
    *,
    features: int = 64,
    downsample: str = "max_pool",
    readout: str | None = None,
    norm: str = "transductive",
    num_blocks: int = 4,
) -> Model:
  """Conv-4 as a pure :class:`Model`.

  The standard forms: ``conv4(N, downsample="stride")`` for MAML on
  Omniglot (Finn et al., 2017); ``conv4(N, features=32)`` for MAML on
  Mini-ImageNet; ``conv4(None)`` for the Prototypical Networks embedding
  (Snell et al., 2017).

  Args:
    num_outputs: classes of the linear head, or ``None`` for an embedding.
    features: filters per block.
    downsample: ``"max_pool"`` or ``"stride"``.
    readout: how the last feature map becomes a vector: ``"mean"`` over
      space or ``"flatten"``; ``None`` averages after ``"stride"`` and
      flattens after ``"max_pool"``.
    norm: the batch normalisation of each block. ``"transductive"``
      (default): the statistics of the batch at hand, in training and at
      test, as Finn et al.'s code (a query's output depends on the other
      queries normalised with it). ``"running"``: batch statistics in
      training, running statistics kept as the model's state (updated from
      the training batches) and used alone at meta-test, as Snell et al.
      and most libraries. ``"support"``: each task's queries normalised
      with the statistics of its support set, in meta-training and at
      test alike (Bronskill et al.'s support-set moments; no query
      influences another, and nothing is carried between tasks).
      ``"none"``: no normalisation.
    num_blocks: convolutional blocks, 4 by default. The first four
      downsample and later ones keep the resolution, so ``num_blocks=6``
      is Chen et al.'s Conv-6. Fewer blocks make a smaller network (the
      time XLA takes to compile a meta-step grows with the blocks).

  Returns:
    The model; params are ``{"block0".."block3", "head"}`` (one
    ``block<i>`` per block). Its ``layers`` are the blocks and the readout
    (pooling and head).
    With ``norm="running"`` it has state (:func:`~metalearn.models.forward`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> m = conv4(5, downsample="stride")
    >>> x = jnp.zeros((10, 28, 28, 1))
    >>> params = jax.jit(m.init)(jax.random.key(0), x)
    >>> jax.jit(m.apply)(params, x).shape
    (10, 5)

  References:
    Vinyals et al., `Matching Networks for One Shot Learning
    <https://arxiv.org/abs/1606.04080>`_, 2016.
    Chen et al., `A Closer Look at Few-shot Classification
    <https://arxiv.org/abs/1904.04232>`_, 2019 (Conv-6).
  """
  if downsample not in _DOWNSAMPLE:
    raise ValueError(
        f"downsample must be one of {_DOWNSAMPLE}, got {downsample!r}"
    )
  _check_readout(readout)
  check_norm(norm)
  if num_outputs is not None and num_outputs < 1:
    raise ValueError(f"num_outputs must be >= 1 or None, got {num_outputs}")
  if not isinstance(features, int) or features < 1:
    raise ValueError(f"features must be an int >= 1, got {features!r}")
  if (isinstance(num_blocks, bool) or not isinstance(num_blocks, int)
      or num_blocks < 1):
    raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
  blocks = [
      _stage(ConvBlock(features, _block_downsample(downsample, i), norm),
             f"block{i}")
      for i in range(num_blocks)
  ]
  last = _readout(lambda x: _conv4_pool(x, downsample, readout),
                  num_outputs)
  module = Conv4(num_outputs, features, downsample, readout, norm,
                 num_blocks)
  return _from_module(module, norm)._replace(layers=(*blocks, last))


def _from_module(module: nn.Module, norm: str) -> Model:
  """A model of ours as a :class:`Model`, with state for running and
  support norm."""
  keeps = norm in ("running", "support")
  return from_flax(module, train_arg="train" if keeps else None,
                   transductive=norm == "transductive",
                   state_gradients=norm == "support")._replace(
                       support_norm=norm == "support")


class MLP(nn.Module):
  """A ReLU multilayer perceptron with a linear ``head``."""

  hidden: Sequence[int]
  num_outputs: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
    return nn.Dense(self.num_outputs, name="head")(x)


def mlp(num_outputs: int = 1, hidden: Sequence[int] = (40, 40)) -> Model:
  """The 40-40 ReLU network of Finn et al.'s sinusoid regression.

  Args:
    num_outputs: output size.
    hidden: widths of the hidden layers.

  Returns:
    The model; its ``layers`` are the hidden layers and the head.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> m = mlp()
    >>> x = jnp.zeros((10, 1))
    >>> m.apply(m.init(jax.random.key(0), x), x).shape
    (10, 1)
  """
  hidden_layers = [
      _stage(nn.Dense(width), f"dense{i}", nn.relu)
      for i, width in enumerate(hidden)
  ]
  head = _stage(nn.Dense(num_outputs), "head")
  return from_flax(MLP(tuple(hidden), num_outputs))._replace(
      layers=(*hidden_layers, head)
  )


class ResBlock(nn.Module):
  """ResNet-12 block: three 3x3 convs, a 1x1 shortcut, 2x2 max-pooling."""

  features: int
  norm: str = "transductive"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    shortcut = norm_layer(self.norm, nn.Conv(
        self.features, (1, 1), use_bias=False, conv_general_dilated=conv2d
    )(x), train)
    for i in range(3):
      x = nn.Conv(
          self.features,
          (3, 3),
          padding="SAME",
          use_bias=False,
          conv_general_dilated=conv2d,
      )(x)
      x = norm_layer(self.norm, x, train)
      if i < 2:
        x = nn.leaky_relu(x, 0.1)
    return max_pool_2x2(nn.leaky_relu(x + shortcut, 0.1))


class ResNet12(nn.Module):
  """ResNet-12 (Oreshkin et al., 2018; Lee et al., 2019)."""

  num_outputs: int | None
  widths: Sequence[int] = (64, 160, 320, 640)
  norm: str = "transductive"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = ResBlock(width, self.norm, name=f"block{i}")(x, train)
    x = _global_average(x)
    if self.num_outputs is not None:
      x = nn.Dense(self.num_outputs, name="head")(x)
    return x


def resnet12(
    num_outputs: int | None = None,
    widths: Sequence[int] = (64, 160, 320, 640),
    norm: str = "transductive",
) -> Model:
  """ResNet-12 for Mini-ImageNet as a pure :class:`Model`.

  Args:
    num_outputs: classes of the linear head, or ``None`` for an embedding
      (640 features after global average pooling).
    widths: channels of the four residual blocks.
    norm: ``"transductive"``, ``"running"``, ``"support"`` or ``"none"``,
      as in :func:`conv4`.

  Returns:
    The model; its ``layers`` are the four blocks and the readout.

  References:
    Oreshkin, Rodriguez & Lacoste, `TADAM: Task dependent adaptive metric
    for improved few-shot learning <https://arxiv.org/abs/1805.10123>`_, 2018.
  """
  check_norm(norm)
  blocks = [_stage(ResBlock(w, norm), f"block{i}")
            for i, w in enumerate(widths)]
  return _from_module(ResNet12(num_outputs, tuple(widths), norm),
                      norm)._replace(
      layers=(*blocks, _readout(_global_average, num_outputs))
  )
