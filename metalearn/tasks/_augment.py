"""On-device image augmentation: jittable, key-driven transforms of episodes.

A transform is a pure function ``transform(key, image) -> image`` of one
image ``[H, W, C]`` (float32 in ``[0, 1]``), the same key giving the same
image. The factories below build them (random affine warps for Omniglot,
random crops with padding, flips and colour jitter for natural images);
:func:`chain` composes them; :func:`augmentation` builds a chain from plain
arguments (a config's ``augment`` fields); :func:`augmented` wraps a
:class:`TaskSampler` so that every episode it draws is augmented on device,
inside the same jitted call that samples it.
"""

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from metalearn.tasks._episodes import TaskSampler
from metalearn.types import Episode

Transform = Callable[[jax.Array, jax.Array], jax.Array]

APPLY_TO = ("support", "both")
# Fold-in constant of the augmentation keys: the augmented sampler draws the
# episode from the key itself, so the same seed draws the same episodes
# with and without augmentation, and only the augmentation differs.
_AUGMENT_STREAM = 0x61756700


def _check_range(name: str, value: Any, high: float | None = None) -> float:
  """A number in ``[0, high]``; a ValueError whose message starts with
  ``name`` otherwise."""
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or not math.isfinite(value)
      or value < 0
      or (high is not None and value > high)
  ):
    bound = "" if high is None else f" and <= {high}"
    raise ValueError(f"{name} must be a number >= 0{bound}, got {value!r}")
  return float(value)


def _uniform(key: jax.Array, bound: float, shape=()) -> jax.Array:
  """Uniform in ``[-bound, bound]``."""
  return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def affine_warp(
    image: jax.Array,
    matrix: jax.typing.ArrayLike,
    shift: jax.typing.ArrayLike,
    *,
    fill: float = 0.0,
) -> jax.Array:
  """Warps an image by ``p = matrix (q - c) + c + shift`` about its centre.

  Pixel coordinates are (row, column) and ``c`` is the image's centre. Each
  output pixel ``p`` reads the input at ``q = matrix^-1 (p - c - shift) +
  c`` (inverse mapping, so there are no holes), by bilinear interpolation;
  what falls outside the image reads ``fill``.

  Args:
    image: ``[H, W, C]``.
    matrix: the ``[2, 2]`` linear part, invertible.
    shift: ``[2]``, in pixels (rows, columns).
    fill: the value outside the image.

  Returns:
    The warped image, shaped and typed as ``image``.

  Examples:
    >>> import jax.numpy as jnp
    >>> image = jnp.zeros((5, 5, 1)).at[1, 1, 0].set(1.0)
    >>> moved = affine_warp(image, jnp.eye(2), jnp.array([2.0, 1.0]))
    >>> [int(i) for i in jnp.argwhere(moved[..., 0] == 1.0)[0]]
    [3, 2]
  """
  height, width = image.shape[:2]
  matrix = jnp.asarray(matrix, jnp.float32)
  # The closed-form inverse of a 2x2 matrix.
  (a, b), (c, d) = matrix
  inverse = jnp.array([[d, -b], [-c, a]]) / (a * d - b * c)
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
  rows, cols = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32),
      jnp.arange(width, dtype=jnp.float32), indexing="ij")
  offset = centre + jnp.asarray(shift, jnp.float32)
  out = jnp.stack([rows, cols]) - offset[:, None, None]
  source = jnp.einsum("ij,jhw->ihw", inverse, out) + centre[:, None, None]

  def warp(channel):
    return jax.scipy.ndimage.map_coordinates(
        channel, [source[0], source[1]], order=1, mode="constant",
        cval=fill)

  return jax.vmap(warp, in_axes=2, out_axes=2)(image).astype(image.dtype)


def random_affine(
    *,
    max_shift: float = 0.0,
    max_rotation: float = 0.0,
    max_scale: float = 0.0,
    max_shear: float = 0.0,
    fill: float = 0.0,
) -> Transform:
  """A random affine warp about the image centre, bilinearly resampled.

  The warp maps an input pixel ``q`` (row, column) to ``p = A (q - c) + c +
  t``, with ``c`` the centre, ``A = R(theta) Sh(rho) S(s)`` and every
  parameter drawn independently and uniformly: rotation ``theta`` in
  ``[-max_rotation, max_rotation]`` degrees, shears ``rho_x, rho_y`` in
  ``[-max_shear, max_shear]``, scales ``s_x, s_y`` in ``[1 - max_scale, 1 +
  max_scale]`` and shifts ``t`` in ``[-max_shift, max_shift]`` times the
  image's height and width. Each output pixel reads the input at ``q =
  A^-1 (p - c - t) + c`` (inverse mapping, so there are no holes), by
  bilinear interpolation; pixels that map outside the image read ``fill``
  (:func:`affine_warp`).

  With every range zero the warp is the identity.

  Args:
    max_shift: the largest shift, as a fraction of the image's side.
    max_rotation: the largest rotation, in degrees.
    max_scale: the largest relative change of scale (``< 1``).
    max_shear: the largest shear factor (``< 1``, so the warp stays
      invertible).
    fill: the value outside the image: the background. Omniglot as loaded
      has ink 1 and background 0, hence the default.

  Returns:
    A transform of one ``[H, W, C]`` image.

  Raises:
    ValueError: for a negative range (or a scale or shear >= 1); the message
      starts with the argument's name.

  References:
    Koch, Zemel and Salakhutdinov, `Siamese Neural Networks for One-shot
    Image Recognition <https://www.cs.toronto.edu/~rsalakhu/papers/oneshot1.pdf>`_,
    2015 (section 4.1: rotation, shear, scale and shift ranges).

    Lake, Salakhutdinov and Tenenbaum, `Human-level concept learning
    through probabilistic program induction
    <https://doi.org/10.1126/science.aab3050>`_, 2015 (affine warps of
    characters).
  """
  max_shift = _check_range("max_shift", max_shift)
  max_rotation = _check_range("max_rotation", max_rotation, 180)
  max_scale = _check_range("max_scale", max_scale, 0.99)
  max_shear = _check_range("max_shear", max_shear, 0.99)
  if isinstance(fill, bool) or not isinstance(fill, (int, float)):
    raise ValueError(f"fill must be a number, got {fill!r}")

  def transform(key: jax.Array, image: jax.Array) -> jax.Array:
    height, width = image.shape[:2]
    k_rot, k_shear, k_scale, k_shift = jax.random.split(key, 4)
    theta = jnp.deg2rad(_uniform(k_rot, max_rotation))
    rho = _uniform(k_shear, max_shear, (2,))
    scale = 1.0 + _uniform(k_scale, max_scale, (2,))
    shift = _uniform(k_shift, max_shift, (2,)) * jnp.array(
        [height, width], jnp.float32)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rotate = jnp.array([[cos, -sin], [sin, cos]])
    shear = jnp.array([[1.0, rho[0]], [rho[1], 1.0]])
    return affine_warp(
        image, rotate @ shear @ jnp.diag(scale), shift, fill=fill)

  return transform


def random_crop(*, padding: int, fill: float = 0.0) -> Transform:
  """Pads the image by ``padding`` pixels of ``fill``, then crops it back.

  The crop's corner is uniform over the ``(2 * padding + 1)^2`` positions,
  so the content moves by up to ``padding`` pixels each way; ``padding=0``
  is the identity.

  Args:
    padding: pixels added on each side (an int >= 0).
    fill: the padding's value.

  Returns:
    A transform of one ``[H, W, C]`` image.

  Raises:
    ValueError: for a negative or non-int ``padding``.

  References:
    Lee, Maji, Ravichandran and Soatto, `Meta-Learning with Differentiable
    Convex Optimization <https://arxiv.org/abs/1904.03758>`_, 2019 (random
    crop with padding, flip and colour jitter on Mini-ImageNet).
  """
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ValueError(f"padding must be an int >= 0, got {padding!r}")
  if isinstance(fill, bool) or not isinstance(fill, (int, float)):
    raise ValueError(f"fill must be a number, got {fill!r}")

  def transform(key: jax.Array, image: jax.Array) -> jax.Array:
    height, width, channels = image.shape
    padded = jnp.pad(
        image, ((padding, padding), (padding, padding), (0, 0)),
        constant_values=fill)
    corner = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(
        padded, (corner[0], corner[1], 0), (height, width, channels))

  return transform


def random_flip(*, prob: float = 0.5) -> Transform:
  """Mirrors the image left to right with probability ``prob``.

  Args:
    prob: the probability of a flip, in ``[0, 1]``.

  Returns:
    A transform of one ``[H, W, C]`` image.

  Raises:
    ValueError: for a ``prob`` outside ``[0, 1]``.
  """
  prob = _check_range("prob", prob, 1)

  def transform(key: jax.Array, image: jax.Array) -> jax.Array:
    return jnp.where(jax.random.uniform(key) < prob, image[:, ::-1], image)

  return transform


def color_jitter(
    *,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
) -> Transform:
  """Random brightness, contrast and saturation, in that order.

  Each factor is uniform in ``[1 - s, 1 + s]`` for its strength ``s``, as
  torchvision's ``ColorJitter``: brightness scales the pixels; contrast
  blends the image with its mean grey level; saturation blends each pixel
  with its grey level (no effect on one channel). Each result is clipped to
  ``[0, 1]``. Strength zero is the identity.

  Args:
    brightness: the brightness strength, in ``[0, 1]``.
    contrast: the contrast strength, in ``[0, 1]``.
    saturation: the saturation strength, in ``[0, 1]``.

  Returns:
    A transform of one ``[H, W, C]`` image with ``C`` 1 or 3.

  Raises:
    ValueError: for a strength outside ``[0, 1]``.
  """
  brightness = _check_range("brightness", brightness, 1)
  contrast = _check_range("contrast", contrast, 1)
  saturation = _check_range("saturation", saturation, 1)

  def grey(image):
    if image.shape[-1] == 1:
      return image
    weights = jnp.array([0.299, 0.587, 0.114], image.dtype)
    return (image @ weights)[..., None]

  def transform(key: jax.Array, image: jax.Array) -> jax.Array:
    k_b, k_c, k_s = jax.random.split(key, 3)
    image = jnp.clip(image * (1.0 + _uniform(k_b, brightness)), 0.0, 1.0)
    mean = jnp.mean(grey(image))
    image = jnp.clip(
        mean + (1.0 + _uniform(k_c, contrast)) * (image - mean), 0.0, 1.0)
    level = grey(image)
    return jnp.clip(
        level + (1.0 + _uniform(k_s, saturation)) * (image - level), 0.0, 1.0)

  return transform


def chain(*transforms: Transform) -> Transform:
  """Applies ``transforms`` in order, each with its own key.

  Args:
    *transforms: transforms of one image.

  Returns:
    Their composition; with none, the identity.
  """

  def transform(key: jax.Array, image: jax.Array) -> jax.Array:
    keys = jax.random.split(key, max(len(transforms), 1))
    for k, fn in zip(keys, transforms, strict=False):
      image = fn(k, image)
    return image

  return transform


_FACTORIES = {
    "affine": random_affine,
    "crop": random_crop,
    "flip": random_flip,
    "color": color_jitter,
}


def augmentation(
    *,
    affine: Mapping[str, Any] | None = None,
    crop: Mapping[str, Any] | None = None,
    flip: Mapping[str, Any] | None = None,
    color: Mapping[str, Any] | None = None,
) -> Transform | None:
  """A chain of transforms from plain arguments (a config's fields).

  Each argument is ``None`` (left out) or the keyword arguments of its
  factory; the chain applies them in the order affine, crop, flip, colour.

  Args:
    affine: arguments of :func:`random_affine`.
    crop: arguments of :func:`random_crop`.
    flip: arguments of :func:`random_flip`.
    color: arguments of :func:`color_jitter`.

  Returns:
    The transform, or ``None`` if every argument is ``None``.

  Raises:
    ValueError: for an unknown or bad argument; the message starts with its
      dotted name (``affine.max_rotation must be ...``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> fn = augmentation(affine={"max_rotation": 10.0}, flip={"prob": 0.5})
    >>> fn(jax.random.key(0), jnp.zeros((28, 28, 1))).shape
    (28, 28, 1)
    >>> augmentation() is None
    True
  """
  chosen = {"affine": affine, "crop": crop, "flip": flip, "color": color}
  transforms = []
  for name, args in chosen.items():
    if args is None:
      continue
    if not isinstance(args, Mapping):
      raise ValueError(
          f"{name} must be null or a mapping of the arguments of "
          f"{_FACTORIES[name].__name__}, got {args!r}")
    factory = _FACTORIES[name]
    known = inspect.signature(factory).parameters
    unknown = sorted(set(args) - set(known))
    if unknown:
      raise ValueError(
          f"{name}.{unknown[0]} is not an argument of {factory.__name__} "
          f"(it takes {', '.join(known)})")
    missing = [n for n, p in known.items()
               if p.default is p.empty and n not in args]
    if missing:
      raise ValueError(f"{name}.{missing[0]} is required")
    try:
      transforms.append(factory(**args))
    except ValueError as e:
      raise ValueError(f"{name}.{e}") from e
  return chain(*transforms) if transforms else None


def augment_images(
    transform: Transform, key: jax.Array, images: jax.Array
) -> jax.Array:
  """Applies ``transform`` to each image of ``[n, H, W, C]``, keys split.

  Image ``i`` uses ``jax.random.split(key, n)[i]``.
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(transform)(keys, images)


def augmented(
    sampler: TaskSampler,
    transform: Transform,
    *,
    apply_to: str = "both",
) -> TaskSampler:
  """A sampler whose episodes are augmented by ``transform``, on device.

  The episode is the one ``sampler`` draws from the key, so a seed draws
  the same episodes with and without augmentation; the augmentation's keys
  come from ``jax.random.fold_in(key, ...)``, one per image. Everything is
  a pure function of the key: a resumed run draws the same augmented
  episodes. Use it for meta-training only: validation and test episodes
  stay as they are.

  Args:
    sampler: a sampler of image episodes (``support_x [n, H, W, C]``).
    transform: a transform of one image (e.g. from :func:`augmentation`).
    apply_to: ``"support"`` (the support images only) or ``"both"`` (support
      and query images, the default: every training image is augmented, as
      in the papers).

  Returns:
    A :class:`TaskSampler` over the same data.

  Raises:
    ValueError: for an unknown ``apply_to``, or a sampler whose episodes are
      not images.

  Examples:
    >>> import jax, numpy as np
    >>> from metalearn.types import ClassPool
    >>> from metalearn.tasks import episode_sampler
    >>> pool = ClassPool(np.zeros((10, 20, 28, 28, 1), np.uint8),
    ...                  np.arange(10, dtype=np.int32))
    >>> sampler = augmented(
    ...     episode_sampler(pool, num_ways=5, num_shots=1, num_queries=15),
    ...     random_flip(), apply_to="support")
    >>> sampler.sample(jax.random.key(0), sampler.data).support_x.shape
    (5, 28, 28, 1)
  """
  if apply_to not in APPLY_TO:
    raise ValueError(
        f"apply_to={apply_to!r} is not one of {', '.join(APPLY_TO)}")
  shapes = jax.eval_shape(sampler.sample, jax.random.key(0), sampler.data)
  if not isinstance(shapes, Episode) or shapes.support_x.ndim != 4:
    shape = getattr(getattr(shapes, "support_x", None), "shape", None)
    raise ValueError(
        "augmentation needs episodes of images (support_x [n, H, W, C]), "
        f"got support_x of shape {shape}")

  def sample(key: jax.Array, data: Any) -> Episode:
    episode = sampler.sample(key, data)
    support_key, query_key = jax.random.split(
        jax.random.fold_in(key, _AUGMENT_STREAM))
    episode = episode._replace(
        support_x=augment_images(transform, support_key, episode.support_x))
    if apply_to == "both":
      episode = episode._replace(
          query_x=augment_images(transform, query_key, episode.query_x))
    return episode

  return TaskSampler(sample=sample, data=sampler.data)
