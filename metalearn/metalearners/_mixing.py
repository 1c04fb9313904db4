"""Task-interpolation primitives: feature mixing, CutMix, mixing two tasks.

:func:`~metalearn.metalearners.mlti` builds on these; they work on any
:class:`~metalearn.types.Episode` and any model with ``layers``.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn import models
from metalearn.metalearners._base import MixedLabels
from metalearn.models import Model
from metalearn.types import Episode

MIX_MODES = ("features", "cutmix")


class MixedInputs(NamedTuple):
  """A task's inputs to be mixed with a partner's inside the network.

  A model built by :func:`feature_mixing` runs ``x`` and ``other`` through
  its first ``layer`` stages and continues from ``lam * h_x + (1 - lam) *
  h_other``. Meta-learners pass inputs through to their model untouched, so
  an :class:`~metalearn.types.Episode` whose ``support_x`` and ``query_x``
  are ``MixedInputs`` is an interpolated task for any of them.

  Attributes:
    x: the task's inputs ``[n, ...]``.
    other: the partner's inputs, paired row by row, same shape.
    lam: the weight of ``x``, a float scalar.
    layer: where to mix, an int scalar: ``0`` mixes the inputs, ``l`` the
      output of the model's ``l``-th stage (``model.layers[l - 1]``).
  """

  x: jax.Array
  other: jax.Array
  lam: jax.Array
  layer: jax.Array


def feature_mixing(
    model: Model, mix_layers: Sequence[int] | None = None
) -> Model:
  """The model, also accepting :class:`MixedInputs` (manifold mixup).

  On an array, ``apply`` is ``model.apply``. On ``MixedInputs(x, other,
  lam, layer)`` it runs both inputs through the stages in
  ``model.layers`` (each with its own batch statistics), replaces the
  task's features at ``layer`` by ``lam * h_x + (1 - lam) * h_other`` and
  runs the rest on the mix. ``layer`` may be traced, so one compiled
  program serves every layer: the partner is run up to the last candidate
  layer and the mix is selected with ``jnp.where``, which costs up to one
  extra forward pass but avoids a ``lax.switch`` (one branch per layer to
  compile, and all of them executed under ``vmap``).

  Args:
    model: a model with ``layers`` (``conv4``, ``mlp``, ``resnet12``).
    mix_layers: the layers where features may be mixed (0 = inputs); the
      default is every layer before the last stage. The layer itself comes
      with each input; one outside ``mix_layers`` mixes nothing.

  Returns:
    A :class:`~metalearn.models.Model` with the same ``init`` and params
    (and state: with ``norm="running"`` a mixed task's running statistics
    move with its own inputs ``x``, in training only).

  Raises:
    ValueError: if ``model.layers`` is ``None`` or a layer is out of range.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metalearn import models
    >>> m = feature_mixing(models.mlp())
    >>> x, other = jnp.ones((4, 1)), jnp.zeros((4, 1))
    >>> params = m.init(jax.random.key(0), x)
    >>> mixed = MixedInputs(x, other, jnp.float32(1.0), jnp.int32(2))
    >>> bool(jnp.allclose(m.apply(params, mixed), m.apply(params, x)))
    True
  """
  points = _mix_points(model, mix_layers)
  stages, last = model.layers, max(points)

  def apply(params, x):
    if not isinstance(x, MixedInputs):
      return model.apply(params, x)
    h, other = x.x, x.other
    for i, stage in enumerate(stages):
      if i in points:
        mixed = x.lam * h + (1.0 - x.lam) * other
        h = jnp.where(x.layer == i, mixed, h)
      h = stage(params, h)
      if i < last:
        other = stage(params, other)
    return h

  if not models.has_state(model):
    return model._replace(apply=apply)

  def apply_with_state(params, state, x, training):
    if not isinstance(x, MixedInputs):
      return model.apply_with_state(params, state, x, training)
    # A mixed task's running statistics move with its own (unmixed)
    # inputs; its outputs are the mix's, with batch statistics.
    return apply(params, x), model.apply_with_state(params, state, x.x,
                                                    training)[1]

  return model._replace(apply=apply, apply_with_state=apply_with_state)


def _mix_points(model: Model, mix_layers) -> tuple[int, ...]:
  if model.layers is None:
    raise ValueError(
        "model.layers is None: feature mixing needs a model that can be run "
        "up to a layer (conv4, mlp, resnet12), or use mix='cutmix'"
    )
  num = len(model.layers)
  if mix_layers is None:
    return tuple(range(num))
  points = tuple(sorted(set(mix_layers)))
  if not points or not all(
      isinstance(p, int) and 0 <= p < num for p in points
  ):
    raise ValueError(
        f"mix_layers must be ints in [0, {num}) for a model with {num} "
        f"layers, got {mix_layers!r}"
    )
  return points


def cutmix(
    key: jax.Array, x: jax.Array, other: jax.Array, lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
  r"""Pastes a box of ``other`` into ``x`` (CutMix), one box for all images.

  The box covers about a fraction :math:`1 - \lambda` of the image (side
  ``floor(S * sqrt(1 - lam))``), centred uniformly and clipped at the
  border, as in Yun et al.; ``lam = 1`` leaves ``x`` unchanged.

  Args:
    key: the box position; the same key gives the same box for images of
      the same size (:func:`interpolate_tasks` passes one key per set, or
      one for both sets with ``shared_box=True``).
    x: images ``[..., H, W, C]``.
    other: images of the same shape.
    lam: the intended weight of ``x``.

  Returns:
    ``(mixed, lam_eff)``, where ``lam_eff`` is the fraction of pixels taken
    from ``x`` after clipping.

  References:
    Yun et al., `CutMix: Regularization Strategy to Train Strong Classifiers
    with Localizable Features <https://arxiv.org/abs/1905.04899>`_, 2019.
  """
  if x.ndim < 3 or x.shape != other.shape:
    raise ValueError(
        f"cutmix needs two image batches [..., H, W, C] of one shape, got "
        f"{x.shape} and {other.shape}"
    )
  h, w = x.shape[-3:-1]
  ratio = jnp.sqrt(1.0 - lam)
  key_y, key_x = jax.random.split(key)

  def span(k, size):
    cut = jnp.floor(size * ratio).astype(jnp.int32)
    centre = jax.random.randint(k, (), 0, size)
    lo = centre - cut // 2
    idx = jnp.arange(size)
    return (idx >= lo) & (idx < lo + cut)

  mask = span(key_y, h)[:, None] & span(key_x, w)[None, :]
  mixed = jnp.where(mask[:, :, None], other, x)
  lam_eff = 1.0 - jnp.mean(mask.astype(jnp.float32))
  return mixed, lam_eff


def _pairing(key, y, y_other, label_sharing, scores):
  """Row ``t`` of the task is paired with row ``pairing[t]`` of the partner.

  Without label sharing, class ``k`` of the task goes with the partner's
  class of ``k``-th smallest score (a random bijection, the same for support
  and query), shot ``s`` with shot ``s``; with label sharing, rows are
  paired by a random permutation.
  """
  if label_sharing:
    return jax.random.permutation(key, y.shape[0])
  rank = jnp.argsort(jnp.argsort(y, stable=True))
  return jnp.argsort(scores[y_other], stable=True)[rank]


def interpolate_tasks(
    episode: Episode,
    partner: Episode,
    lam: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    mix: str = "features",
    layer: jax.typing.ArrayLike = 0,
    label_sharing: bool = False,
    shared_box: bool = False,
) -> Episode:
  r"""One task interpolated from two, with weight ``lam`` on ``episode``.

  Support and query are mixed with the same ``lam`` and pairing; with
  ``mix="cutmix"`` each set gets its own box, as in the authors' code
  (``shared_box=True``: one box for both). ``partner`` may be ``episode``
  itself: its classes are then paired with a random permutation of its own
  classes (a class-shuffled copy of the task, the authors' self-mixing).

  Without label sharing (classification where a label names a different
  class in every task), the classes are paired by a random permutation
  and each mixed pair is a new class that keeps ``episode``'s label; this
  needs int labels and the same number of examples of each of the ``N``
  classes in both tasks (as :func:`~metalearn.tasks.episode_sampler`
  draws). With label sharing, rows are paired at random and the labels are
  mixed too: int labels become :class:`MixedLabels`, float targets
  ``lam * y + (1 - lam) * y_other``.

  Args:
    episode: the task.
    partner: the other task, same shapes.
    lam: the weight of ``episode``, a scalar in ``[0, 1]``.
    key: the pairing (and the CutMix box).
    mix: ``"features"``: inputs become :class:`MixedInputs` mixed at
      ``layer`` by a :func:`feature_mixing` model; ``"cutmix"``: images are
      mixed by :func:`cutmix` (mixed labels then use its effective weight).
    layer: the mixing layer for ``"features"`` (may be traced).
    label_sharing: whether the tasks share their label space.
    shared_box: ``"cutmix"`` only: paste one box into the support and the
      query images (this library's first variant) instead of one box each.

  Returns:
    The interpolated :class:`~metalearn.types.Episode`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metalearn import tasks
    >>> s = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
    >>> a = s.sample(jax.random.key(0), None)
    >>> b = s.sample(jax.random.key(1), None)
    >>> mixed = interpolate_tasks(a, b, 0.5, key=jax.random.key(2),
    ...                           label_sharing=True)
    >>> type(mixed.support_x).__name__, mixed.support_y.shape
    ('MixedInputs', (5, 1))
  """
  if mix not in MIX_MODES:
    raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
  shapes = [(a.shape, a.dtype) for a in episode]
  if shapes != [(a.shape, a.dtype) for a in partner]:
    raise ValueError(
        "the two tasks must have the same shapes and dtypes, got "
        f"{shapes} and {[(a.shape, a.dtype) for a in partner]}"
    )
  integer = jnp.issubdtype(episode.support_y.dtype, jnp.integer)
  if not label_sharing and not integer:
    raise ValueError(
        "label_sharing=False pairs classes and needs int labels; tasks with "
        "float targets (regression) share their label space: pass "
        "label_sharing=True"
    )
  lam = jnp.asarray(lam, jnp.float32)
  score_key, support_key, query_key, box_key = jax.random.split(key, 4)
  scores = jax.random.permutation(score_key, episode.support_y.shape[0])
  # With a shared box both sets use box_key, as before the option existed.
  boxes = (box_key, box_key) if shared_box else jax.random.split(box_key)

  def one(x, y, x_other, y_other, k, k_box):
    idx = _pairing(k, y, y_other, label_sharing, scores)
    x_other, y_other = x_other[idx], y_other[idx]
    if mix == "cutmix":
      x, weight = cutmix(k_box, x, x_other, lam)
    else:
      x = MixedInputs(x, x_other, lam, jnp.asarray(layer, jnp.int32))
      weight = lam
    if not label_sharing:
      return x, y
    if integer:
      return x, MixedLabels(y, y_other, weight)
    return x, weight * y + (1.0 - weight) * y_other

  support_x, support_y = one(episode.support_x, episode.support_y,
                             partner.support_x, partner.support_y,
                             support_key, boxes[0])
  query_x, query_y = one(episode.query_x, episode.query_y,
                         partner.query_x, partner.query_y, query_key,
                         boxes[1])
  return Episode(support_x, support_y, query_x, query_y)
