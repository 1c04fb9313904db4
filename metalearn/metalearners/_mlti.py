"""Meta-learning with fewer tasks through task interpolation (MLTI)."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn import models
from metalearn.metalearners._base import MetaLearner, MixedLabels
from metalearn.models import Model
from metalearn.tasks import TaskSampler
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


class EpisodePair(NamedTuple):
  """A task and the partner it is interpolated with (:func:`paired_sampler`).

  Attributes:
    episode: the task.
    partner: another task of the same shapes.
  """

  episode: Episode
  partner: Episode


def paired_sampler(sampler: TaskSampler) -> TaskSampler:
  """A sampler of :class:`EpisodePair`, for :func:`mlti` on large pools.

  The task drawn from ``key`` is the one ``sampler`` draws from ``key``; its
  partner comes from ``jax.random.fold_in(key, 1)``. The pool stays an
  argument of the jitted step instead of a constant captured by the
  learner (see :func:`mlti`).

  Args:
    sampler: the meta-training task distribution.

  Returns:
    A :class:`~metalearn.tasks.TaskSampler` over the same data.

  Examples:
    >>> import jax
    >>> from metalearn import tasks
    >>> pairs = paired_sampler(tasks.sinusoid_sampler(num_shots=5,
    ...                                               num_queries=5))
    >>> pair = pairs.sample(jax.random.key(0), pairs.data)
    >>> pair.episode.support_x.shape == pair.partner.support_x.shape
    True
  """

  def sample(key, data):
    return EpisodePair(
        sampler.sample(key, data),
        sampler.sample(jax.random.fold_in(key, 1), data),
    )

  return TaskSampler(sample=sample, data=sampler.data)


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


def mlti(
    learner_fn: Callable[[Model], MetaLearner],
    model: Model,
    sampler: TaskSampler | None = None,
    *,
    mix: str = "features",
    prob: float = 1.0,
    self_mix_prob: float = 0.5,
    shared_box: bool = False,
    alpha: float = 2.0,
    beta: float | None = None,
    mix_layers: Sequence[int] | None = None,
    label_sharing: bool = False,
    fixed_lambda: float | None = None,
) -> MetaLearner:
  r"""Task interpolation (MLTI) around any meta-learner.

  By default, as in the authors' code, every meta-training task
  :math:`\tau_i` is replaced by an interpolation with a partner task: with
  probability ``self_mix_prob`` the partner is :math:`\tau_i` itself with
  its classes shuffled (class :math:`k` is mixed with class :math:`\pi(k)`
  of the same episode for a random permutation :math:`\pi`, which may fix
  some classes), otherwise another task :math:`\tau_j`. With
  :math:`\lambda \sim \mathrm{Beta}(\alpha, \beta)` (one per task, the same
  for support and query) and the classes of the two tasks paired by a
  random permutation,

  .. math::
    h^{mix} = \lambda\, f_{\le l}(x_i) + (1 - \lambda)\, f_{\le l}(x_j'),

  at a layer :math:`l` drawn uniformly from ``mix_layers`` per task, and the
  model continues from :math:`h^{mix}` (``mix="features"``, the paper's
  choice for MAML, and manifold mixup for ProtoNet); or the images are
  mixed by CutMix (``mix="cutmix"``, as the authors' ProtoNet code does),
  with one box for the support images and another for the query images.
  Each mixed class pair is a new class (``label_sharing=False``); when the
  tasks share their label space the labels are mixed too
  (:func:`interpolate_tasks`). The wrapped learner then computes its usual
  meta-gradient on the interpolated task; meta-test ``adapt`` and
  ``evaluate`` are the wrapped learner's, on plain episodes.

  Variants: ``prob < 1`` leaves a task unmixed with probability
  ``1 - prob``. This library's first variant, where half of the tasks stay
  unmixed, the partner is always another task and CutMix pastes one box
  into both sets, is ``prob=0.5, self_mix_prob=0.0, shared_box=True``.
  The defaults follow the authors' released code, which is ProtoNet's
  (``ProtoNet/Image_NLS``; their MAML code is unreleased); their
  RainbowMNIST code mixes a quarter of the tasks with themselves
  (``self_mix_prob=0.25``). Their ProtoNet code also embeds the
  mixed support and query sets in one batch (one set of batch statistics
  per episode); :func:`~metalearn.metalearners.protonet` already does so
  in meta-training, so this wrapper adds nothing for it. Two details
  differ from their CutMix: they paste the task's box into the partner's
  image (here the partner's box goes into the task's image, equivalent in
  distribution for a symmetric Beta up to clipping at the border), and
  their box sides are rounded down to even numbers.

  Design: the trainer maps ``meta_grad`` over tasks, one episode and one
  key at a time, so the partner must reach it per task. It comes either
  (a) from ``sampler``, drawn inside ``meta_grad`` from the task's key:
  sampling is pure and on device, so this costs one extra episode gather,
  fits every trainer and test written for plain episodes, and the partner
  is an independent task from the same distribution (as the authors' other
  task of the meta-batch is); but the pool is then captured by the
  compiled step as a constant (about 3 MB for 50 Omniglot characters with
  rotations, 150 MB for Mini-ImageNet-S at 84 px, which slows compilation);
  or (b) from an :class:`EpisodePair` when training on
  ``paired_sampler(sampler)``, which keeps the pool a step argument. A
  task mixed with itself ignores the partner drawn for it (the choice is a
  traced select, so one program serves both). The wrapper takes a learner
  *factory* rather than a built learner because feature mixing happens
  inside the network: it builds the learner on :func:`feature_mixing` of
  ``model``, so the learner cannot be built on the wrong model, and any
  learner that passes its inputs to its model (MAML, ANIL, Meta-SGD,
  Reptile, ProtoNet) works unchanged. Tasks left unmixed go through the
  same program with :math:`\lambda = 1`, which reproduces the wrapped
  learner (so does ``fixed_lambda=1.0``, whatever the partner).

  Args:
    learner_fn: builds the wrapped learner from a model, e.g.
      ``functools.partial(maml, inner_lr=0.4)`` or ``protonet``.
    model: the network (with ``layers`` for ``mix="features"``).
    sampler: the meta-training task distribution that partners are drawn
      from; may be ``None`` if training uses ``paired_sampler`` or if
      ``self_mix_prob=1``.
    mix: ``"features"`` or ``"cutmix"``.
    prob: the probability that a task is interpolated (1 in the authors'
      code; 0.5 in this library's first variant).
    self_mix_prob: the probability that an interpolated task's partner is
      the task itself with its classes shuffled rather than another task
      (0.5 in the authors' Image_NLS code, 0.25 in their RainbowMNIST code;
      0 in this library's first variant). With ``label_sharing=True`` the
      self-partner's rows are paired at random (mixup within the task).
    shared_box: ``"cutmix"`` only: one box for the support and the query
      images of a task (this library's first variant) instead of one each.
    alpha: the first Beta parameter (2 in the authors' code).
    beta: the second Beta parameter (default ``alpha``).
    mix_layers: candidate layers for ``"features"`` (0 = inputs; default:
      every layer before the model's last stage).
    label_sharing: whether the tasks share labels (mixed labels through
      :class:`MixedLabels`, which only learners whose loss is
      :func:`task_loss` accept, i.e. the MAML family, not ProtoNet).
    fixed_lambda: use this :math:`\lambda` instead of sampling it (1.0
      reproduces the wrapped learner).

  Returns:
    A :class:`MetaLearner`. Its ``init`` and ``meta_grad`` accept an
    :class:`~metalearn.types.Episode` or an :class:`EpisodePair`.

  Raises:
    ValueError: for a ``mix`` outside ``MIX_MODES``, a probability or
      ``fixed_lambda`` outside ``[0, 1]``, a Beta parameter that is not
      positive, ``mix_layers`` or ``shared_box=True`` without the mix they
      apply to, or a ``learner_fn`` that does not return a
      :class:`MetaLearner`.

  Examples:
    >>> import functools, jax, numpy as np
    >>> from metalearn import metalearners, models, tasks
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((8, 4, 28, 28, 1), np.uint8),
    ...                  np.arange(8, dtype=np.int32))
    >>> sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
    ...                                 num_queries=2)
    >>> learner = mlti(functools.partial(metalearners.maml, inner_lr=0.4),
    ...                models.conv4(3, features=8), sampler)
    >>> ep = sampler.sample(jax.random.key(0), pool)
    >>> params = learner.init(jax.random.key(1), ep)
    >>> grads, metrics = learner.meta_grad(params, ep, jax.random.key(2))
    >>> sorted(metrics)
    ['outer/accuracy', 'outer/loss']

    The first variant (half of the tasks unmixed, partners always other
    tasks, one CutMix box per task):

    >>> first = mlti(metalearners.protonet, models.conv4(None, features=8),
    ...              sampler, mix="cutmix", prob=0.5, self_mix_prob=0.0,
    ...              shared_box=True)

  References:
    Yao, Zhang & Finn, `Meta-Learning with Fewer Tasks through Task
    Interpolation <https://arxiv.org/abs/2106.02695>`_, 2022; the authors'
    code, https://github.com/huaxiuyao/MLTI (``ProtoNet/*/main.py``,
    ``protonet.py``).
  """
  beta = alpha if beta is None else beta
  _check_mlti(mix, prob, self_mix_prob, shared_box, alpha, beta, mix_layers,
              fixed_lambda)
  if mix == "features":
    points = _mix_points(model, mix_layers)
    base = learner_fn(feature_mixing(model, points))
  else:
    points = (0,)
    base = learner_fn(model)
  if not isinstance(base, MetaLearner):
    raise ValueError(
        f"learner_fn must return a MetaLearner, got {type(base).__name__}"
    )

  def init(key, episode):
    if isinstance(episode, EpisodePair):
      episode = episode.episode
    return base.init(key, episode)

  def partner_of(episode, key):
    if isinstance(episode, EpisodePair):
      return episode
    if self_mix_prob == 1.0:
      return EpisodePair(episode, episode)
    if sampler is None:
      raise ValueError(
          "mlti was built with sampler=None, so meta_grad needs an "
          "EpisodePair: train on paired_sampler(sampler), or pass sampler"
      )
    return EpisodePair(episode, sampler.sample(key, sampler.data))

  def meta_grad(meta_params, episode, key):
    partner_key, mix_key, base_key = jax.random.split(key, 3)
    episode, partner = partner_of(episode, partner_key)
    on_key, lam_key, layer_key, pair_key = jax.random.split(mix_key, 4)
    # Folded in rather than split, so that self_mix_prob=0 draws the same
    # numbers as before the option existed.
    self_key = jax.random.fold_in(mix_key, 1)
    if self_mix_prob > 0.0:
      itself = jax.random.bernoulli(self_key, self_mix_prob)
      partner = jax.tree.map(lambda a, b: jnp.where(itself, a, b), episode,
                             partner)
    if fixed_lambda is None:
      lam = jax.random.beta(lam_key, alpha, beta)
    else:
      lam = jnp.float32(fixed_lambda)
    lam = jnp.where(jax.random.bernoulli(on_key, prob), lam, 1.0)
    layer = jnp.asarray(points)[
        jax.random.randint(layer_key, (), 0, len(points))
    ]
    mixed = interpolate_tasks(
        episode, partner, lam, key=pair_key, mix=mix, layer=layer,
        label_sharing=label_sharing, shared_box=shared_box,
    )
    return base.meta_grad(meta_params, mixed, base_key)

  # Without a sampler of its own, the learner trains on pairs of tasks.
  return base._replace(
      init=init, meta_grad=meta_grad,
      train_sampler=paired_sampler if sampler is None else None)


def _check_mlti(mix, prob, self_mix_prob, shared_box, alpha, beta,
                mix_layers, fixed_lambda):
  if mix not in MIX_MODES:
    raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob must be in [0, 1], got {prob}")
  if not 0.0 <= self_mix_prob <= 1.0:
    raise ValueError(f"self_mix_prob must be in [0, 1], got {self_mix_prob}")
  if not (alpha > 0 and beta > 0):
    raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
  if mix_layers is not None and mix != "features":
    raise ValueError("mix_layers applies only to mix='features'")
  if shared_box and mix != "cutmix":
    raise ValueError("shared_box=True applies only to mix='cutmix'")
  if fixed_lambda is not None and not 0.0 <= fixed_lambda <= 1.0:
    raise ValueError(f"fixed_lambda must be in [0, 1], got {fixed_lambda}")
