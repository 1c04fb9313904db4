"""Supervised pretraining baselines: Baseline, Baseline++ and RFS."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn import models
from metalearn.metalearners._base import (
    MetaLearner,
    WithModelState,
    make_learner,
    split_model_state,
    task_loss,
    with_model_state,
)
from metalearn.models import Model
from metalearn.tasks import augment_images, augmentation, batch_sampler
from metalearn.types import Episode

PyTree = Any
Transform = Callable[[jax.Array, jax.Array], jax.Array]
TRAIN_HEADS = ("linear", "cosine")
TEST_HEADS = ("linear", "cosine", "logistic")


class Head(NamedTuple):
  """A classifier on features: ``weights [d, k]`` and ``bias [k]``
  (``None`` for a cosine head, which has none)."""

  weights: jax.Array
  bias: jax.Array | None


class SupervisedParams(NamedTuple):
  """The pretrained meta-parameters: the backbone's ``embed`` and the
  global :class:`Head` over all the meta-training classes."""

  embed: PyTree
  head: Head


class Distilled(NamedTuple):
  """Meta-parameters of a student trained by self-distillation: the
  ``student``'s (learned; what is tested) and the fixed ``teacher``'s (the
  previous generation, carried unchanged), each as the learner without
  distillation has them (:class:`SupervisedParams`, in
  :class:`WithModelState` with running statistics). ``trainer.init_from``
  loads a run's network into ``teacher`` and nothing else."""

  student: PyTree
  teacher: PyTree


class FittedHead(NamedTuple):
  """A task's head fitted on its support set: ``head`` (one column per
  slot, one slot per support image) and ``present [slots]``, which slots
  the support set labels; the others get ``-inf`` logits. ``embed``: the
  backbone fine-tuned on the support set with the head
  (``backbone_steps > 0``), or ``None`` (the pretrained one is used)."""

  head: Head
  present: jax.Array
  embed: PyTree | None = None


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / (||x|| + 1e-5)`` along ``axis`` (Chen et al.'s ``distLinear``).

  The norm's gradient is 0, not NaN, at the zero vector (an absent slot's
  column of a cosine head), so no NaN reaches the other parameters.
  """
  squares = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.maximum(squares, jnp.finfo(squares.dtype).tiny))
  return x / (norm + 1e-5)


def head_logits(head: Head, z: jax.Array, kind: str,
                scale: float = 1.0) -> jax.Array:
  r"""Logits ``[n, k]`` of features ``z [n, d]``.

  ``"linear"``: :math:`z W + b`. ``"cosine"``: :math:`s \cos(z, w_k)`,
  features and weight columns L2-normalised, scaled by ``scale``.
  """
  if kind == "cosine":
    return scale * l2_normalize(z) @ l2_normalize(head.weights, axis=0)
  return z @ head.weights + head.bias


def _masked(logits, present):
  return jnp.where(present[None, :], logits, -jnp.inf)


def _slots(labels, num_slots):
  one_hot = jax.nn.one_hot(labels, num_slots)
  return one_hot, one_hot.sum(0) > 0


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  r"""Hinton et al.'s distillation loss, as Tian et al. use it.

  :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,
  \mathrm{softmax}(s/T))`, summed over classes and averaged over the
  batch; the :math:`T^2` keeps its gradient's scale independent of
  :math:`T`. The teacher's logits are constants (no gradient).

  Args:
    student_logits: ``[n, k]``.
    teacher_logits: ``[n, k]``.
    temperature: :math:`T > 0`.

  Returns:
    The scalar loss.
  """
  t = jax.lax.stop_gradient(teacher_logits) / temperature
  log_p_t = jax.nn.log_softmax(t)
  log_p_s = jax.nn.log_softmax(student_logits / temperature)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def finetune_head(
    z: jax.Array, labels: jax.Array, num_slots: int, *, kind: str = "linear",
    scale: float = 2.0, steps: int = 100, learning_rate: float = 0.01,
    momentum: float = 0.9, dampening: float = 0.9,
    weight_decay: float = 1e-3,
) -> FittedHead:
  """Fits a new head on frozen features by full-batch SGD (Chen et al.).

  Minimises the mean cross-entropy of the support set with ``steps``
  steps of PyTorch-style SGD (weight decay added to the gradient,
  momentum with dampening), in a ``lax.scan``. A linear head starts at
  zero (the problem is convex, so no random start is needed); a cosine
  head starts at the support set's class means (imprinting), since the
  zero vector has no direction. Deterministic and vmappable.

  Args:
    z: support features ``[n, d]``.
    labels: int ``[n]`` in ``[0, num_slots)``.
    num_slots: the head's outputs (static); absent ones are masked.
    kind: ``"linear"`` or ``"cosine"``.
    scale: the cosine head's logit scale.
    steps: SGD steps.
    learning_rate, momentum, dampening, weight_decay: the SGD settings.

  Returns:
    The :class:`FittedHead`.
  """
  one_hot, present = _slots(labels, num_slots)
  d = z.shape[-1]
  if kind == "cosine":
    init = Head(z.T @ one_hot / jnp.maximum(one_hot.sum(0), 1.0), None)
  else:
    init = Head(jnp.zeros((d, num_slots), z.dtype),
                jnp.zeros((num_slots,), z.dtype))
  tx = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale(1.0 - dampening),
      optax.trace(momentum),
      optax.scale(-learning_rate),
  )

  def loss(head):
    logits = _masked(head_logits(head, z, kind, scale), present)
    return _cross_entropy(logits, labels)

  def step(carry, _):
    head, state = carry
    updates, state = tx.update(jax.grad(loss)(head), state, head)
    return (optax.apply_updates(head, updates), state), None

  (head, _), _ = jax.lax.scan(step, (init, tx.init(init)), None,
                              length=steps)
  return FittedHead(head, present)


def logistic_regression(
    z: jax.Array, labels: jax.Array, num_slots: int, *, c: float = 1.0,
    steps: int = 100,
) -> FittedHead:
  r"""Multinomial logistic regression with an L2 penalty, by L-BFGS.

  Minimises scikit-learn's ``LogisticRegression(C=c)`` objective
  :math:`C \sum_i \mathrm{CE}_i + \tfrac12 \lVert W \rVert^2` (the
  intercept is not penalised), divided by :math:`C n` for the solver's
  sake (same minimiser): ``steps`` iterations of ``optax.lbfgs`` with its
  zoom line search, in a ``lax.scan``; an iterate whose gradient norm is
  below 1e-6 (converged) or that is not finite is kept. The problem is
  strictly convex in :math:`W`; the intercept is determined up to a shift
  common to all slots, which the softmax ignores. Deterministic and
  vmappable. Features are used as given (RFS normalises them first).

  Args:
    z: support features ``[n, d]``.
    labels: int ``[n]`` in ``[0, num_slots)``.
    num_slots: the head's outputs (static); absent ones are masked.
    c: the inverse regularisation strength (scikit-learn's ``C``).
    steps: L-BFGS iterations.

  Returns:
    A linear :class:`FittedHead`.
  """
  _, present = _slots(labels, num_slots)
  n, d = z.shape

  def objective(head):
    logits = _masked(head_logits(head, z, "linear"), present)
    penalty = jnp.sum(jnp.square(head.weights)) / (2.0 * c * n)
    return _cross_entropy(logits, labels) + penalty

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)
  init = Head(jnp.zeros((d, num_slots), z.dtype),
              jnp.zeros((num_slots,), z.dtype))

  def step(carry, _):
    head, state = carry
    value, grad = value_and_grad(head, state=state)
    updates, new_state = opt.update(grad, state, head, value=value,
                                    grad=grad, value_fn=objective)
    new = (optax.apply_updates(head, updates), new_state)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                                for x in jax.tree.leaves(new[0])]))
    keep = (optax.tree_utils.tree_norm(grad) < 1e-6) | ~finite
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), carry, new), None

  (head, _), _ = jax.lax.scan(step, (init, opt.init(init)), None,
                              length=steps)
  return FittedHead(head, present)


def finetune_backbone(
    apply: Callable[[PyTree, jax.Array], jax.Array],
    embed_params: PyTree,
    fitted: FittedHead,
    x: jax.Array,
    labels: jax.Array,
    *,
    kind: str = "linear",
    scale: float = 2.0,
    steps: int = 50,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    transform: Transform | None = None,
    key: jax.Array | None = None,
) -> FittedHead:
  """Fine-tunes the backbone and a fitted head together on a support set.

  ``steps`` steps of SGD with momentum (``optax.sgd``) on the mean
  cross-entropy of the support set, over the backbone's parameters and
  the head's, from ``embed_params`` and ``fitted.head`` (the head already
  fitted on the frozen features, so the first steps do not spend the
  backbone on a random head). With a ``transform``, step ``t`` reads the
  support images augmented with keys from ``jax.random.fold_in(key, t)``
  (fresh views each step, as Hu et al. fine-tune on augmented support
  sets). Deterministic given the key, and vmappable.

  Args:
    apply: ``apply(embed_params, x) -> features [n, d]``, as the head
      reads them (normalised for a logistic head; fixed batch-norm
      statistics).
    embed_params: the backbone's parameters to start from.
    fitted: the head fitted on the frozen features.
    x: support images ``[n, H, W, C]``.
    labels: int ``[n]``, the head's slots.
    kind: the head's logits, ``"linear"`` or ``"cosine"``.
    scale: the cosine head's logit scale.
    steps: SGD steps.
    learning_rate, momentum: the SGD settings (the same for backbone
      and head).
    transform: a transform of one image (:func:`metalearn.tasks.
      augmentation`), or ``None`` to fine-tune on the images as given.
    key: the augmentation's key (required with a ``transform``).

  Returns:
    ``fitted`` with the fine-tuned head and ``embed`` set to the
    fine-tuned backbone.

  Raises:
    ValueError: for a ``transform`` without a ``key``.
  """
  if transform is not None and key is None:
    raise ValueError("fine-tuning on augmented support sets needs a key")
  tx = optax.sgd(learning_rate, momentum)

  def loss(params, t):
    embed, head = params
    images = x
    if transform is not None:
      images = augment_images(transform, jax.random.fold_in(key, t), x)
    logits = _masked(head_logits(head, apply(embed, images), kind, scale),
                     fitted.present)
    return _cross_entropy(logits, labels)

  def step(carry, t):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params, t), state, params)
    return (optax.apply_updates(params, updates), state), None

  params = (embed_params, fitted.head)
  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                jnp.arange(steps))
  return fitted._replace(head=params[1], embed=params[0])


def _transform(augment: Transform | Mapping | None) -> Transform | None:
  """A transform, or one built from an ``augment`` config's fields."""
  if augment is None or callable(augment):
    return augment
  _check(isinstance(augment, Mapping),
         "backbone_augment must be null, a transform or a mapping of "
         f"metalearn.tasks.augmentation's arguments, got {augment!r}")
  args = {k: v for k, v in augment.items() if k != "apply_to"}
  try:
    return augmentation(**args)
  except (TypeError, ValueError) as e:
    raise ValueError(f"backbone_augment.{e}") from e


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def _positive_int(value, name):
  _check(isinstance(value, int) and not isinstance(value, bool)
         and value >= 1, f"{name} must be a positive int, got {value!r}")


def supervised(
    embed: Model,
    num_classes: int,
    *,
    batch_size: int = 128,
    train_head: str = "linear",
    test_head: str = "linear",
    train_scale: float = 10.0,
    test_scale: float = 2.0,
    finetune_steps: int = 100,
    finetune_lr: float = 0.01,
    momentum: float = 0.9,
    dampening: float = 0.9,
    weight_decay: float = 1e-3,
    c: float = 1.0,
    backbone_steps: int = 0,
    backbone_lr: float = 0.01,
    backbone_augment: Transform | Mapping | None = None,
    kd_weight: float = 0.0,
    ce_weight: float = 1.0,
    kd_temperature: float = 4.0,
) -> MetaLearner:
  r"""Supervised pretraining on all classes, then a new head per task.

  Meta-training is ordinary classification: the learner's
  ``train_sampler`` turns the meta-training sampler into mini-batches of
  ``batch_size`` images over all the classes of its pool with global
  labels (:func:`~metalearn.tasks.batch_sampler`; augmentation configured
  for episodes is not applied to them), and ``meta_grad`` is the gradient
  of the cross-entropy of the global head (``num_classes`` outputs,
  ``train_head``) on all the labelled images of the episode it is given,
  support and query. At meta-test the backbone is frozen: ``adapt``
  embeds the support set and fits a new head on it (``test_head``),
  ``evaluate`` scores the queries with it. Everything runs under the
  ordinary trainer (checkpoints, exact resume, validation-based
  selection), a "task" of the meta-batch being one mini-batch.

  Test heads, one slot per support image (absent slots masked, so any
  number of ways and shots works):

  - ``"linear"`` (Baseline): a linear layer fitted by
    :func:`finetune_head` (Chen et al.: 100 passes of SGD, lr 0.01,
    momentum 0.9, dampening 0.9, weight decay 1e-3, in mini-batches of 4;
    here ``finetune_steps`` full-batch steps from zero);
  - ``"cosine"`` (Baseline++): a cosine classifier with scale
    ``test_scale`` (Chen et al.'s 2 for at most 200 classes), fitted the
    same way from the class means;
  - ``"logistic"`` (RFS): :func:`logistic_regression` with ``C=c`` on
    L2-normalised features (Tian et al.: scikit-learn's default
    ``LogisticRegression``), ``finetune_steps`` L-BFGS iterations.

  Self-distillation (``kd_weight > 0``; Tian et al.'s born-again
  generations): the meta-parameters are :class:`Distilled`, a freshly
  initialised student and a fixed teacher that ``trainer.init_from``
  loads from the previous generation's run (its student, for a run that
  was itself distilled). The pretraining loss is ``ce_weight`` times the
  cross-entropy plus ``kd_weight`` times :func:`distillation_loss` of the
  student's global-head logits against the teacher's (the teacher's
  network normalised by its running statistics, as PyTorch's ``eval()``),
  at temperature ``kd_temperature``. Tests read the student.

  Test-time fine-tuning of the backbone (``backbone_steps > 0``): after
  the head is fitted, backbone and head are trained together on the
  support set by :func:`finetune_backbone` (``backbone_steps`` steps of
  SGD, momentum 0.9, learning rate ``backbone_lr``; augmented views of
  the support images at each step with ``backbone_augment``), as Hu et
  al.'s pipeline does at meta-test; the task's parameters then hold its
  own backbone. Batch-norm statistics stay the running ones. Choose the
  learning rate on validation episodes, as they do (0 is no fine-tuning).

  Batch norm: ``norm="running"`` normalises the training batches with
  their statistics and carries the running statistics
  (:class:`WithModelState`), used alone at meta-test (PyTorch's
  ``eval()``, as Chen et al. and Tian et al. test), so no query
  influences another; ``norm="none"`` does not normalise. Other modes are
  rejected.

  Args:
    embed: the backbone, with flat features (``conv4(None)``).
    num_classes: outputs of the global head; at least the classes of the
      meta-training pool (checked by ``train_sampler``).
    batch_size: images per mini-batch.
    train_head: the global head, ``"linear"`` or ``"cosine"``.
    test_head: ``"linear"``, ``"cosine"`` or ``"logistic"``.
    train_scale: the global cosine head's scale (Chen et al.: 10 for more
      than 200 classes, as Omniglot's).
    test_scale: the test cosine head's scale.
    finetune_steps: SGD steps, or L-BFGS iterations for ``"logistic"``.
    finetune_lr, momentum, dampening, weight_decay: the test head's SGD.
    c: the logistic regression's inverse regularisation strength.
    backbone_steps: test-time fine-tuning steps of the backbone (0: the
      backbone stays frozen, as Chen et al. and Tian et al. test).
    backbone_lr: their SGD learning rate.
    backbone_augment: ``None``, a transform of one image, or the
      arguments of :func:`metalearn.tasks.augmentation` (an ``augment``
      config: ``learner.backbone_augment=${augment}``; its ``apply_to``
      is ignored, only support images are read).

    kd_weight: the distillation loss's weight (0: no teacher).
    ce_weight: the cross-entropy's weight.
    kd_temperature: the distillation temperature.

  Returns:
    A :class:`MetaLearner`; meta-parameters :class:`SupervisedParams` (in
    :class:`WithModelState` with running statistics; both in
    :class:`Distilled` with ``kd_weight > 0``), task parameters
    :class:`FittedHead`.

  Raises:
    ValueError: for a bad argument or normalisation mode.

  Examples:
    >>> import jax
    >>> import numpy as np
    >>> from metalearn import models, tasks
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((8, 4, 28, 28, 1), np.uint8),
    ...                  np.arange(8, dtype=np.int32))
    >>> episodes = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
    ...                                  num_queries=2)
    >>> learner = supervised(models.conv4(None, norm="running"), 8,
    ...                      batch_size=4, finetune_steps=2)
    >>> batches = learner.train_sampler(episodes)
    >>> batch = batches.sample(jax.random.key(0), batches.data)
    >>> params = learner.init(jax.random.key(1), batch)
    >>> params.params.head.weights.shape  # 64 features, 8 classes
    (64, 8)
    >>> ep = episodes.sample(jax.random.key(2), pool)
    >>> learner.adapt(params, ep, None, training=False).head.weights.shape
    (64, 3)

  References:
    Chen, Liu, Kira, Wang & Huang, `A Closer Look at Few-shot
    Classification <https://arxiv.org/abs/1904.04232>`_, ICLR 2019.

    Tian, Wang, Krishnan, Tenenbaum & Isola, `Rethinking Few-Shot Image
    Classification: a Good Embedding Is All You Need?
    <https://arxiv.org/abs/2003.11539>`_, ECCV 2020.

    Hu, Li, Stühmer, Kim & Hospedales, `Pushing the Limits of Simple
    Pipelines for Few-Shot Learning: External Data and Fine-Tuning Make a
    Difference <https://arxiv.org/abs/2204.07305>`_, CVPR 2022.
  """
  _positive_int(num_classes, "num_classes")
  _positive_int(batch_size, "batch_size")
  _positive_int(finetune_steps, "finetune_steps")
  _check(train_head in TRAIN_HEADS,
         f"train_head must be one of {TRAIN_HEADS}, got {train_head!r}")
  _check(test_head in TEST_HEADS,
         f"test_head must be one of {TEST_HEADS}, got {test_head!r}")
  for name, value in (("train_scale", train_scale), ("c", c),
                      ("test_scale", test_scale),
                      ("finetune_lr", finetune_lr)):
    _check(value > 0, f"{name} must be > 0, got {value}")
  _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
  _check(0 <= dampening < 1, f"dampening must be in [0, 1), got {dampening}")
  _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
  _check(isinstance(backbone_steps, int) and not isinstance(
      backbone_steps, bool) and backbone_steps >= 0,
         f"backbone_steps must be an int >= 0, got {backbone_steps!r}")
  _check(backbone_lr >= 0, f"backbone_lr must be >= 0, got {backbone_lr}")
  _check(kd_weight >= 0, f"kd_weight must be >= 0, got {kd_weight}")
  _check(ce_weight >= 0, f"ce_weight must be >= 0, got {ce_weight}")
  _check(ce_weight + kd_weight > 0, "ce_weight + kd_weight must be > 0")
  _check(kd_temperature > 0,
         f"kd_temperature must be > 0, got {kd_temperature}")
  distill = kd_weight > 0
  transform = _transform(backbone_augment)
  _check(not (embed.transductive or models.uses_support_statistics(embed)),
         "supervised pretraining supports norm='running' or norm='none' "
         "(the test head is fitted on frozen features normalised alone)")
  stateful = models.has_state(embed)
  test_kind = "cosine" if test_head == "cosine" else "linear"

  def split(meta_params):
    """``(SupervisedParams, model state)`` of the tested network."""
    if distill:
      meta_params = meta_params.student
    return split_model_state(meta_params, stateful)

  def init(key, episode: Episode):
    if not distill:
      return init_network(key, episode)
    student_key, teacher_key = jax.random.split(key)
    return Distilled(init_network(student_key, episode),
                     init_network(teacher_key, episode))

  def init_network(key, episode: Episode):
    embed_key, head_key = jax.random.split(key)
    x = episode.support_x
    params = embed.init(embed_key, x)
    out = jax.eval_shape(embed.apply, params, x)
    _check(len(out.shape) == 2,
           f"embed must give flat features [n, d], got {out.shape}")
    d = out.shape[-1]
    w_key, b_key = jax.random.split(head_key)
    bound = 1.0 / jnp.sqrt(d)  # PyTorch's nn.Linear initialisation
    weights = jax.random.uniform(w_key, (d, num_classes), jnp.float32,
                                 -bound, bound)
    bias = (None if train_head == "cosine" else jax.random.uniform(
        b_key, (num_classes,), jnp.float32, -bound, bound))
    params = SupervisedParams(params, Head(weights, bias))
    if not stateful:
      return params
    return WithModelState(params, embed.init_state(embed_key, x))

  def test_apply(meta_params):
    """``apply(embed_params, x)``: test features, normalised alone."""
    _, state = split(meta_params)
    bound = models.bind(embed, state)

    def apply(embed_params, x):
      z = bound.apply(embed_params, x)
      return l2_normalize(z) if test_head == "logistic" else z

    return apply

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    del training  # the head's fit is the same in training and test
    meta_params = jax.lax.stop_gradient(meta_params)
    apply, embed_params = test_apply(meta_params), split(meta_params)[0].embed
    x, y = episode.support_x, episode.support_y
    z, slots = apply(embed_params, x), y.shape[-1]
    if test_head == "logistic":
      fitted = logistic_regression(z, y, slots, c=c, steps=finetune_steps)
    else:
      fitted = finetune_head(
          z, y, slots, kind=test_head, scale=test_scale,
          steps=finetune_steps, learning_rate=finetune_lr,
          momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if backbone_steps == 0:
      return fitted
    return finetune_backbone(
        apply, embed_params, fitted, x, y, kind=test_kind, scale=test_scale,
        steps=backbone_steps, learning_rate=backbone_lr,
        transform=transform, key=key)

  def predict(meta_params, task_params: FittedHead, x):
    embed_params = task_params.embed
    if embed_params is None:
      embed_params = split(meta_params)[0].embed
    logits = head_logits(task_params.head,
                         test_apply(meta_params)(embed_params, x),
                         test_kind, test_scale)
    return _masked(logits, task_params.present)

  def evaluate(meta_params, task_params, episode: Episode):
    return task_loss(predict(meta_params, task_params, episode.query_x),
                     episode.query_y)

  def meta_grad(meta_params, episode: Episode, key):
    del key
    params, state = split(meta_params)
    x = jnp.concatenate([episode.support_x, episode.query_x])
    y = jnp.concatenate([episode.support_y, episode.query_y])
    if distill:  # The teacher's logits, its statistics fixed.
      teacher, teacher_state = split_model_state(meta_params.teacher,
                                                 stateful)
      teacher_logits = head_logits(
          teacher.head,
          models.bind(embed, teacher_state).apply(teacher.embed, x),
          train_head, train_scale)

    def loss_fn(params):
      z, new = models.forward(embed, params.embed, state, x, training=True)
      logits = head_logits(params.head, z, train_head, train_scale)
      loss, metrics = task_loss(logits, y)
      if distill:
        kd = distillation_loss(logits, teacher_logits, kd_temperature)
        loss = ce_weight * loss + kd_weight * kd
        metrics = {**metrics, "outer/kd_loss": kd}
      return loss, (metrics, new)

    grads, (metrics, new) = jax.grad(loss_fn, has_aux=True)(params)
    if stateful:  # the carried entry is the new value (MetaLearner.carried)
      grads = WithModelState(grads, jax.lax.stop_gradient(new))
    if distill:  # The teacher is carried: its new value is its value.
      grads = Distilled(grads, jax.lax.stop_gradient(meta_params.teacher))
    return grads, metrics

  def carried(meta_params):
    """The student's running statistics and the whole teacher."""
    student = (with_model_state()(meta_params.student) if stateful else
               jax.tree.map(lambda _: False, meta_params.student))
    return Distilled(student, jax.tree.map(lambda _: True,
                                           meta_params.teacher))

  def train_sampler(sampler):
    pool = sampler.data
    _check(hasattr(pool, "images"),
           "supervised pretraining needs a class-pool dataset (images by "
           "class), not a synthetic task family")
    have = pool.images.shape[0]
    _check(num_classes >= have,
           f"learner.num_classes={num_classes} is smaller than the {have} "
           f"classes of the meta-training pool; set learner.num_classes="
           f"{have}")
    return batch_sampler(pool, batch_size)

  if distill:
    mark = carried
  else:
    mark = with_model_state() if stateful else None
  return make_learner(init, adapt, evaluate, meta_grad, mark, predict,
                      False, train_sampler=train_sampler)


def baseline(embed: Model, num_classes: int, **kwargs) -> MetaLearner:
  """Chen et al.'s Baseline: a linear head in pretraining and at test.

  :func:`supervised` with ``train_head="linear"``, ``test_head="linear"``.

  References:
    Chen, Liu, Kira, Wang & Huang, `A Closer Look at Few-shot
    Classification <https://arxiv.org/abs/1904.04232>`_, ICLR 2019.
  """
  return supervised(embed, num_classes, train_head="linear",
                    test_head="linear", **kwargs)


def baseline_pp(embed: Model, num_classes: int, **kwargs) -> MetaLearner:
  """Chen et al.'s Baseline++: cosine heads in pretraining and at test.

  :func:`supervised` with ``train_head="cosine"``, ``test_head="cosine"``
  (scales 10 and 2 by default, their choice for over and under 200
  classes).

  References:
    Chen, Liu, Kira, Wang & Huang, `A Closer Look at Few-shot
    Classification <https://arxiv.org/abs/1904.04232>`_, ICLR 2019.
  """
  return supervised(embed, num_classes, train_head="cosine",
                    test_head="cosine", **kwargs)


def rfs(embed: Model, num_classes: int, **kwargs) -> MetaLearner:
  """Tian et al.'s RFS: a linear head in pretraining, logistic regression
  on L2-normalised features at test.

  :func:`supervised` with ``train_head="linear"``,
  ``test_head="logistic"``; RFS-distill's later generations add
  ``kd_weight`` (Tian et al.: ``ce_weight=0.5, kd_weight=0.5,
  kd_temperature=4``) and a teacher run in ``trainer.init_from``.

  References:
    Tian, Wang, Krishnan, Tenenbaum & Isola, `Rethinking Few-Shot Image
    Classification: a Good Embedding Is All You Need?
    <https://arxiv.org/abs/2003.11539>`_, ECCV 2020.
  """
  return supervised(embed, num_classes, train_head="linear",
                    test_head="logistic", **kwargs)
