"""The jitted meta-training step, generic over meta-learners."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn.metalearners import MetaLearner
from metalearn.tasks import TaskSampler, sample_batch
from metalearn.training import _compile, _sharding
from metalearn.types import Episode

PyTree = Any
TASK_MAPS = ("vmap", "scan", "auto")


class MetaTrainState(NamedTuple):
  """Everything that changes during meta-training; arrays only.

  Attributes:
    step: the number of meta-steps taken (int32 scalar).
    meta_params: the meta-learner's parameters.
    opt_state: the state of :func:`outer_optimizer` of the learner and
      the meta-optimizer (the meta-optimizer's own unless the learner
      carries state).
  """

  step: jax.Array
  meta_params: PyTree
  opt_state: PyTree


def mean_over_tasks(x: jax.Array, axis: int = 0) -> jax.Array:
  """The mean over the task axis; an integer leaf's is rounded and exact.

  Float leaves (gradients, float carried state) get ``jnp.mean``. Integer
  leaves (an optimiser's step count in carried state) are summed and
  divided in integer arithmetic, rounded to the nearest (halves up), so
  that tasks that agree give back their common value exactly (as long as
  the sum fits the integer type: counts below ``2**31 / tasks`` for
  int32), where a float32 mean would lose counts above ``2**24``.

  Args:
    x: a leaf with a task axis.
    axis: the task axis.

  Returns:
    The mean, in ``x``'s dtype for integers.
  """
  if not jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.mean(x, axis)
  return _int_mean(jnp.sum(x, axis), x.shape[axis])


def _int_mean(total: jax.Array, n: int) -> jax.Array:
  """``round(total / n)`` in integer arithmetic, halves up."""
  quotient, remainder = total // n, total % n
  return quotient + (2 * remainder >= n).astype(total.dtype)


def _set_to(new: jax.Array, old: jax.Array) -> jax.Array:
  """The update that moves ``old`` to ``new`` under ``optax.apply_updates``:
  ``new - old`` in ``old``'s dtype (exact for integers, whose ``new`` is
  rounded to the nearest first)."""
  if jnp.issubdtype(old.dtype, jnp.integer):
    if not jnp.issubdtype(new.dtype, jnp.integer):
      new = jnp.floor(new + 0.5)  # to the nearest, halves up
    return new.astype(old.dtype) - old
  return (new - old).astype(old.dtype)


def set_carried() -> optax.GradientTransformation:
  """The update of carried leaves: from their (mean) new values to
  ``new - params``, so that ``optax.apply_updates`` sets them to those
  values. Stateless; needs ``params``."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(new, state, params=None):
    if params is None:
      raise ValueError("setting carried state needs params (the old value)")
    return jax.tree.map(_set_to, new, params), state

  return optax.GradientTransformation(init, update)


def outer_optimizer(
    learner: MetaLearner, meta_optimizer: optax.GradientTransformation
) -> optax.GradientTransformation:
  """The meta-update as the meta-step applies it.

  The meta-step averages the tasks' ``meta_grad`` outputs, shaped like the
  meta-parameters: meta-gradients on the learned leaves, the tasks' new
  values on the leaves ``learner.carried`` marks (state carried between
  meta-steps, such as Reptile's inner optimiser state or batch-norm
  running statistics; :attr:`~metalearn.metalearners.MetaLearner.carried`).
  This transformation turns that mean into updates:

  - learned leaves: ``meta_optimizer``'s update. It sees the learned
    leaves alone (the carried ones are ``optax.MaskedNode`` in its
    inputs and state, through ``optax.multi_transform``), so a clipping
    norm or Adam's moments never include the carried state;
  - carried leaves: ``new - old`` (:func:`set_carried`), so that
    ``optax.apply_updates`` sets them to the tasks' mean new value
    (integer leaves, such as a step count, exactly: the mean is rounded
    to the nearest integer, :func:`mean_over_tasks`; float leaves up to
    the rounding of ``old + (new - old)``).

  A learner without carried state gets ``meta_optimizer`` itself.

  Args:
    learner: the meta-learner.
    meta_optimizer: the outer optimizer of the learned leaves.

  Returns:
    The transformation; its ``update`` needs the meta-parameters.
  """
  if learner.carried is None:
    return meta_optimizer

  def labels(meta_params):
    return jax.tree.map(lambda c: "carried" if c else "learned",
                        learner.carried(meta_params))

  return optax.multi_transform(
      {"learned": meta_optimizer, "carried": set_carried()}, labels)


def init_state(
    learner: MetaLearner,
    meta_optimizer: optax.GradientTransformation,
    sampler: TaskSampler,
    key: jax.Array,
) -> MetaTrainState:
  """Initialises meta-parameters from an abstract episode of the sampler.

  Only shapes are read: the example episode is built with
  ``jax.eval_shape``, so nothing is sampled.
  """
  shapes = jax.eval_shape(sampler.sample, jax.random.key(0), sampler.data)
  example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  meta_params = learner.init(key, example)
  tx = outer_optimizer(learner, meta_optimizer)
  return MetaTrainState(
      jnp.zeros((), jnp.int32), meta_params, tx.init(meta_params)
  )


def default_task_map() -> str:
  """The fastest measured way to map tasks on the default backend.

  On accelerators ``vmap`` batches the tasks into wide kernels. On XLA:CPU,
  vmapping per-task weights turns convolutions into grouped convolutions,
  which run far below peak; a sequential ``scan`` over tasks runs each
  task's convolutions as ordinary ones (see ``benchmarks/README.md``).
  """
  return "scan" if jax.default_backend() == "cpu" else "vmap"


def map_tasks(
    fn: Callable[[Episode, jax.Array], tuple[PyTree, dict]],
    episodes: Episode,
    keys: jax.Array,
    task_map: str = "auto",
) -> tuple[PyTree, dict]:
  """Maps ``fn`` over the task axis and averages its outputs.

  ``vmap`` is the semantics; the execution is chosen per backend:

  - ``"vmap"``: all tasks at once.
  - ``"scan"``: one task at a time in a ``lax.scan`` that accumulates the
    sum, so memory does not grow with the number of tasks.
  - ``"auto"``: :func:`default_task_map`.

  Over several devices, :func:`make_meta_step` runs this on each device's
  share of the tasks (:func:`~metalearn.training.map_devices`).

  Args:
    fn: ``fn(episode, key) -> (tree, metrics)`` for one task.
    episodes: a batch of episodes, leading axis ``[B]``.
    keys: ``[B]`` keys.
    task_map: the strategy.

  Returns:
    The mean over tasks of ``fn``'s outputs (integer outputs, such as
    carried step counts, rounded to the nearest: :func:`mean_over_tasks`).
  """
  if task_map == "auto":
    task_map = default_task_map()
  if task_map not in TASK_MAPS:
    raise ValueError(f"task_map must be one of {TASK_MAPS}, got {task_map!r}")
  num_tasks = keys.shape[0]
  if task_map == "vmap":
    out = jax.vmap(fn)(episodes, keys)
    return jax.tree.map(mean_over_tasks, out)

  def body(total, inputs):
    out = fn(*inputs)
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda x: x[0], (episodes, keys))
  zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *first)
  )
  total, _ = jax.lax.scan(body, zeros, (episodes, keys))

  def mean(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      return _int_mean(x, num_tasks)
    return x / num_tasks

  return jax.tree.map(mean, total)


def make_meta_step(
    learner: MetaLearner,
    meta_optimizer: optax.GradientTransformation,
    sampler: TaskSampler,
    *,
    meta_batch_size: int,
    steps_per_call: int = 1,
    task_map: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
):
  """Builds the jitted meta-training step.

  One call samples ``meta_batch_size`` episodes on device, computes each
  task's meta-gradient with ``learner.meta_grad``, averages over tasks,
  applies the optax update, and repeats ``steps_per_call`` times in a
  ``lax.scan`` (to hide dispatch overhead). Step ``t`` draws its episodes
  from ``jax.random.fold_in(key, t)``, so a resumed run sees exactly the
  episodes an uninterrupted one would.

  Args:
    learner: any :class:`MetaLearner`.
    meta_optimizer: the outer optimizer.
    sampler: the meta-training task distribution.
    meta_batch_size: tasks per meta-step.
    steps_per_call: meta-steps per call.
    task_map: how tasks are mapped (:func:`map_tasks`), on each device.
    mesh: shard the tasks of each meta-batch over the devices of this mesh
      (axis ``"tasks"``, :func:`task_mesh`); ``None`` runs on one device.
      The state, ``data`` and ``metrics`` are replicated on the mesh
      (place them once with :func:`replicate`); the meta-gradient is the
      same mean over tasks, up to float rounding.

  Returns:
    ``step(state, data, key) -> (state, metrics)``, jitted, with ``state``
    donated. ``data`` is ``sampler.data``; ``metrics`` are the means over
    tasks of the last meta-step.

  Raises:
    ValueError: if ``meta_batch_size`` is not divisible by the number of
      devices in ``mesh``.

  Examples:
    >>> import jax, optax
    >>> from metalearn import metalearners, models, tasks, training
    >>> sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
    >>> learner = metalearners.maml(models.mlp(), inner_lr=0.01)
    >>> tx = optax.adam(1e-3)
    >>> state = training.init_state(learner, tx, sampler, jax.random.key(0))
    >>> step = training.make_meta_step(learner, tx, sampler,
    ...                                meta_batch_size=4)
    >>> state, metrics = step(state, sampler.data, jax.random.key(1))
    >>> int(state.step)
    1
  """
  step = meta_step_body(
      learner, meta_optimizer, sampler, meta_batch_size=meta_batch_size,
      steps_per_call=steps_per_call, task_map=task_map, mesh=mesh,
  )
  if mesh is None:
    return _compile.jit(step, donate_argnums=(0,))
  replicated = _sharding.replicated(mesh)
  return _compile.jit(
      step,
      donate_argnums=(0,),
      in_shardings=replicated,
      out_shardings=replicated,
  )


def check_step_sizes(meta_batch_size: Any, steps_per_call: Any) -> None:
  """Raises ``ValueError`` unless both are ints >= 1."""
  if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
    raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size!r}")
  if not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call!r}")


def meta_step_body(
    learner: MetaLearner,
    meta_optimizer: optax.GradientTransformation,
    sampler: TaskSampler,
    *,
    meta_batch_size: int,
    steps_per_call: int = 1,
    task_map: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
):
  """The function :func:`make_meta_step` jits: ``step(state, data, key)``.

  Unjitted, so that it can be traced inside another transformation (a
  population of runs maps it over its members:
  :func:`~metalearn.training.make_population_step`). Same arguments as
  :func:`make_meta_step`.
  """
  check_step_sizes(meta_batch_size, steps_per_call)
  if mesh is not None:
    _sharding.check_divisible(meta_batch_size, mesh, "meta_batch_size")
  meta_optimizer = outer_optimizer(learner, meta_optimizer)

  def one_step(state: MetaTrainState, data, key):
    step_key = jax.random.fold_in(key, state.step)
    task_key, learn_key = jax.random.split(step_key)
    keys = jax.random.split(learn_key, meta_batch_size)

    def mean_grad(episodes, keys, meta_params):
      def task_grad(episode, k):
        return learner.meta_grad(meta_params, episode, k)

      return map_tasks(task_grad, episodes, keys, task_map)

    if mesh is None:
      episodes = sample_batch(sampler._replace(data=data), task_key,
                              meta_batch_size)
      grads, metrics = mean_grad(episodes, keys, state.meta_params)
    else:
      # Each device draws its own episodes (episode i from the i-th split
      # key, as in sample_batch) and averages its tasks' meta-gradients;
      # the mean over devices is an all-reduce that XLA inserts.
      def local(device_keys, meta_params, data):
        task_keys, keys = device_keys
        episodes = jax.vmap(sampler.sample, (0, None))(task_keys, data)
        return mean_grad(episodes, keys, meta_params)

      task_keys = jax.random.split(task_key, meta_batch_size)
      # Every device holds as many tasks: the mean of the means is the mean.
      grads, metrics = jax.tree.map(
          mean_over_tasks,
          _sharding.map_devices(
              local, (task_keys, keys), mesh, state.meta_params, data
          ),
      )
    updates, opt_state = meta_optimizer.update(
        grads, state.opt_state, state.meta_params
    )
    meta_params = optax.apply_updates(state.meta_params, updates)
    return MetaTrainState(state.step + 1, meta_params, opt_state), metrics

  def step(state, data, key):
    if steps_per_call == 1:
      return one_step(state, data, key)

    def body(s, _):
      return one_step(s, data, key)

    state, metrics = jax.lax.scan(body, state, None, length=steps_per_call)
    return state, jax.tree.map(lambda m: m[-1], metrics)

  return step
