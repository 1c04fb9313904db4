"""Core datatypes shared by samplers, meta-learners and the trainer."""

from typing import Any, NamedTuple

import jax

PyTree = Any


class Episode(NamedTuple):
  """One few-shot task: a support set to adapt on and a query set to score.

  Shapes for an ``N``-way ``K``-shot episode with ``Q`` queries per class:
  ``support_x [N*K, ...]``, ``support_y [N*K]``, ``query_x [N*Q, ...]``,
  ``query_y [N*Q]``. A batch of episodes has a leading task axis ``[B]`` on
  every field. Classification labels are ``int32`` in ``[0, N)``; regression
  task families (sinusoid) use float targets of shape ``[..., 1]``.
  """

  support_x: jax.Array
  support_y: jax.Array
  query_x: jax.Array
  query_y: jax.Array


class ClassPool(NamedTuple):
  """A labelled image dataset laid out densely by class, ready for sampling.

  Attributes:
    images: ``uint8 [num_classes, examples_per_class, H, W, C]``. Pixel value
      255 means full intensity (for Omniglot: ink).
    class_ids: ``int32 [num_classes]``, a stable identifier of each class in
      its source dataset (Omniglot: global character id times 4 plus the
      rotation index), so tests and users can tell which classes a split
      holds.
    alphabets: ``int32 [num_classes]``, the alphabet (more generally, the
      super-class) of each class, for episodes whose classes all come from
      one alphabet (``within_alphabet``); ``None`` for a dataset without
      them. Omniglot: alphabet index (0..49, by first global character id)
      times 4 plus the rotation index, so a rotated alphabet is an alphabet
      of its own, as a rotated character is a class of its own.
  """

  images: jax.Array
  class_ids: jax.Array
  alphabets: jax.Array | None = None

  @property
  def num_classes(self) -> int:
    return self.images.shape[0]

  @property
  def examples_per_class(self) -> int:
    return self.images.shape[1]

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[2:])
