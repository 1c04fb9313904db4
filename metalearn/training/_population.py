"""A population: many independent meta-training runs as one program.

A sweep over seeds and continuous hyper-parameters (inner and outer
learning rates) trains members that share every shape: the same network,
task and meta-batch. Their states stack along a leading member axis, and
one jitted call advances all of them: a ``vmap`` over members on
accelerators (one run leaves most of a GPU idle), a ``lax.map`` on CPU
(where a vmap turns every convolution into a grouped one). Each member is
the run :func:`~metalearn.training.meta_train` would make with its own key
and hyper-parameters, up to float rounding.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from metalearn.metalearners import MetaLearner
from metalearn.tasks import TaskSampler
from metalearn.training import _compile
from metalearn.training._loop import summarize
from metalearn.training._step import (
    MetaTrainState,
    check_step_sizes,
    default_task_map,
    init_state,
    meta_step_body,
)

PyTree = Any
MEMBER_MAPS = ("vmap", "map", "auto")
# make_member(hparams) -> (learner, meta_optimizer); hparams maps each swept
# name to a scalar (a Python float when checked, a traced one in the step).
MakeMember = Callable[
    [Mapping[str, Any]], tuple[MetaLearner, optax.GradientTransformation]
]


class Population(NamedTuple):
  """The members of a population: their run keys and hyper-parameters.

  Attributes:
    keys: ``[N]`` run keys; member ``i`` is the run of ``keys[i]`` (as
      ``meta_train(key=keys[i])``: parameters from the first half of
      its split, episodes from the second).
    hparams: each swept name to ``float32 [N]`` values.
  """

  keys: jax.Array
  hparams: dict[str, jax.Array]

  @property
  def size(self) -> int:
    return int(self.keys.shape[0])

  def member(self, i: int) -> dict[str, float]:
    """Member ``i``'s hyper-parameters as Python floats."""
    return {k: float(v[i]) for k, v in self.hparams.items()}


def make_population(
    seeds: Sequence[int], hparams: Mapping[str, Sequence[float]] | None = None
) -> Population:
  """Members from seeds and per-member hyper-parameter values.

  Args:
    seeds: one seed per member (member ``i`` uses ``jax.random.key(seeds[i])``,
      as a run with ``seed=seeds[i]`` does).
    hparams: each swept name to one value per member.

  Returns:
    The population.

  Raises:
    ValueError: if there are no members or a value list has the wrong
      length or a non-finite value.
  """
  seeds = list(seeds)
  if not seeds:
    raise ValueError("a population needs at least one member (seeds=[])")
  values = {}
  for name, vals in (hparams or {}).items():
    vals = np.asarray(vals, np.float32)
    if vals.shape != (len(seeds),):
      raise ValueError(
          f"hparams[{name!r}] has {vals.size} values for {len(seeds)} "
          "members; give one value per member"
      )
    if not np.isfinite(vals).all():
      raise ValueError(f"hparams[{name!r}] has a non-finite value: {vals}")
    values[name] = jnp.asarray(vals)
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
  return Population(keys, values)


def grid(
    seeds: Sequence[int], **axes: Sequence[float]
) -> Population:
  """The Cartesian product of seeds and hyper-parameter values.

  Members are ordered with the seed varying fastest, then the axes in the
  order given (the last one slowest):
  ``grid([0, 1], inner_lr=[0.1, 0.4])`` is (0, 0.1), (1, 0.1), (0, 0.4),
  (1, 0.4).
  """
  seeds = list(seeds)
  names = list(axes)
  rows = [(s,) for s in seeds]
  for name in names:
    rows = [row + (v,) for v in axes[name] for row in rows]
  return make_population(
      [r[0] for r in rows],
      {n: [r[i + 1] for r in rows] for i, n in enumerate(names)},
  )


def check_members(make_member: MakeMember, population: Population) -> None:
  """Builds every member with its concrete values, so that the factories'
  own checks (a step size <= 0) run before anything is traced."""
  for i in range(population.size):
    try:
      make_member(population.member(i))
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"population member {i} ({population.member(i)}): {e}"
      ) from e


def _member_map(member_map: str) -> str:
  if member_map not in MEMBER_MAPS:
    raise ValueError(
        f"member_map must be one of {MEMBER_MAPS}, got {member_map!r}"
    )
  if member_map == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return member_map


def _over_members(fn, member_map: str, num_shared: int = 1):
  """``fn(*member_args, *shared)`` mapped over the leading axis of the
  member arguments; the last ``num_shared`` arguments (the data, the
  episode keys) are passed whole to every member."""

  def mapped(*args):
    member_args, shared = args[:-num_shared], args[-num_shared:]
    if member_map == "vmap":
      return jax.vmap(lambda *a: fn(*a, *shared))(*member_args)
    return jax.lax.map(lambda a: fn(*a, *shared), tuple(member_args))

  return mapped


def init_population(
    make_member: MakeMember,
    sampler: TaskSampler,
    population: Population,
) -> MetaTrainState:
  """The members' initial states, stacked on a leading ``[N]`` axis.

  Member ``i`` is :func:`~metalearn.training.init_state` with the first
  half of ``jax.random.split(population.keys[i])``, as in ``meta_train``.
  """

  def one(key, hparams):
    learner, tx = make_member(hparams)
    return init_state(learner, tx, sampler, jax.random.split(key)[0])

  return _compile.jit(jax.vmap(one))(population.keys, population.hparams)


def make_population_step(
    make_member: MakeMember,
    sampler: TaskSampler,
    *,
    meta_batch_size: int,
    steps_per_call: int = 1,
    task_map: str = "auto",
    member_map: str = "auto",
):
  """Builds the jitted step of a whole population.

  Each member runs :func:`~metalearn.training.meta_step_body` of the
  learner and meta-optimizer that ``make_member`` builds from its
  hyper-parameters, traced: a swept step size is an array in the program,
  so every member shares one compilation.

  Args:
    make_member: ``make_member(hparams) -> (learner, meta_optimizer)``.
      The hyper-parameters arrive traced; a factory may use them in
      arithmetic only (``optax.adam(hparams["lr"])``,
      ``metalearners.maml(model, hparams["inner_lr"])``).
    sampler: the meta-training task distribution, shared by all members.
    meta_batch_size: tasks per meta-step of each member.
    steps_per_call: meta-steps per call (``lax.scan``).
    task_map: how each member maps its tasks
      (:func:`~metalearn.training.map_tasks`).
    member_map: ``"vmap"`` (all members at once: accelerators), ``"map"``
      (one member after another inside the program: CPU) or ``"auto"``.

  Returns:
    ``step(states, data, step_keys) -> (states, metrics)``, jitted with
    ``states`` donated; ``step_keys[i]`` is the second half of member
    ``i``'s split key (:func:`step_keys`), every metric is ``[N]``.
  """
  check_step_sizes(meta_batch_size, steps_per_call)
  member_map = _member_map(member_map)

  def member(state, key, hparams, data):
    learner, tx = make_member(hparams)
    body = meta_step_body(
        learner, tx, sampler, meta_batch_size=meta_batch_size,
        steps_per_call=steps_per_call, task_map=task_map,
    )
    return body(state, data, key)

  mapped = _over_members(member, member_map)

  def step(states, data, keys, hparams):
    return mapped(states, keys, hparams, data)

  return _compile.jit(step, donate_argnums=(0,))


def step_keys(population: Population) -> jax.Array:
  """Each member's episode key: the second half of its split run key."""
  return jax.vmap(lambda k: jax.random.split(k)[1])(population.keys)


def member_state(states: MetaTrainState, i: int) -> MetaTrainState:
  """Member ``i``'s state out of the stacked states."""
  return jax.tree.map(lambda x: x[i], states)


def meta_train_population(
    make_member: MakeMember,
    sampler: TaskSampler,
    population: Population,
    *,
    num_steps: int,
    meta_batch_size: int,
    states: MetaTrainState | None = None,
    steps_per_call: int = 1,
    task_map: str = "auto",
    member_map: str = "auto",
    log_every: int = 100,
    callback: Callable[[MetaTrainState, dict[str, np.ndarray]], None]
    | None = None,
    progress: bool = True,
) -> tuple[MetaTrainState, list[dict[str, np.ndarray]]]:
  """Meta-trains every member of a population for ``num_steps`` meta-steps.

  Member ``i`` follows the run ``meta_train(make_member(hparams_i),
  key=keys[i])`` would: same initial parameters, same episodes, same
  updates, up to float rounding (a traced step size is not constant-folded
  as a separate run's is; ``"vmap"`` also batches the kernels). A member
  whose loss turns non-finite does not stop the others (separate runs
  would not either): its metrics say so (``member_finite`` is 0 from then
  on).

  Args:
    make_member: ``hparams -> (learner, meta_optimizer)``
      (:func:`make_population_step`).
    sampler: the meta-training task distribution.
    population: the members (:func:`make_population`, :func:`grid`).
    num_steps: total meta-steps per member (a resumed run stops at the
      same total).
    meta_batch_size: tasks per meta-step of each member.
    states: stacked states to continue from, else fresh ones.
    steps_per_call: meta-steps per jitted call; must divide ``log_every``.
    task_map: how each member maps its tasks.
    member_map: ``"vmap"``, ``"map"`` or ``"auto"``.
    log_every: meta-steps between metric records and callbacks.
    callback: ``callback(states, metrics)`` every ``log_every`` steps.
    progress: show a console progress bar.

  Returns:
    The final stacked states and the logged metrics: each a dict of ``[N]``
    arrays, plus ``step`` and ``tasks_per_sec`` (all members together).

  Raises:
    ValueError: for bad sizes or a member whose hyper-parameters its
      factory rejects.
  """
  check_step_sizes(meta_batch_size, steps_per_call)
  if log_every % steps_per_call:
    raise ValueError(
        f"steps_per_call={steps_per_call} must divide log_every={log_every}"
    )
  check_members(make_member, population)
  step_fn = make_population_step(
      make_member, sampler, meta_batch_size=meta_batch_size,
      steps_per_call=steps_per_call, task_map=task_map,
      member_map=member_map,
  )
  if states is None:
    states = init_population(make_member, sampler, population)
  keys = step_keys(population)
  finite = np.ones(population.size, bool)
  start = int(np.asarray(states.step).max())
  history = []
  bar = tqdm(total=num_steps, initial=start, disable=not progress,
             unit="step", dynamic_ncols=True)
  tick, tick_step = time.perf_counter(), start
  step = start
  while step < num_steps:
    states, metrics = step_fn(states, sampler.data, keys,
                              population.hparams)
    step += steps_per_call
    bar.update(steps_per_call)
    if step % log_every and step < num_steps:
      continue
    metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
    finite &= np.all([np.isfinite(v) for v in metrics.values()], axis=0)
    now = time.perf_counter()
    metrics["member_finite"] = finite.astype(np.float64)
    metrics["step"] = step
    metrics["tasks_per_sec"] = (
        (step - tick_step) * meta_batch_size * population.size
        / max(now - tick, 1e-9)
    )
    tick, tick_step = now, step
    loss = metrics.get("outer/loss")
    if loss is not None and finite.any():
      bar.set_postfix({"best_loss": f"{np.nanmin(loss[finite]):.3g}",
                       "finite": f"{finite.sum()}/{finite.size}"})
    history.append(metrics)
    if callback is not None:
      callback(states, metrics)
  bar.close()
  return states, history


def evaluate_population(
    make_member: MakeMember,
    meta_params: PyTree,
    population: Population,
    sampler: TaskSampler,
    key: jax.Array,
    *,
    num_episodes: int = 600,
    batch_size: int = 50,
    task_map: str = "auto",
    member_map: str = "auto",
) -> list[dict[str, float]]:
  """Meta-tests every member on the same fixed episodes, in one program.

  Member ``i`` gets what :func:`~metalearn.training.evaluate` gives its
  learner (``make_member`` of its hyper-parameters) with the same ``key``:
  episode ``j`` is drawn from ``fold_in(key, j)``, adaptation uses the
  meta-test settings. One compilation serves all members.

  Args:
    make_member: ``hparams -> (learner, meta_optimizer)``.
    meta_params: the members' stacked meta-parameters (``states
      .meta_params``).
    population: the members.
    sampler: the meta-test task distribution.
    key: the evaluation key.
    num_episodes: episodes per member.
    batch_size: episodes per call and member.
    task_map: ``"vmap"`` or ``"scan"`` (sequential) over each member's
      episodes, or ``"auto"``.
    member_map: ``"vmap"``, ``"map"`` or ``"auto"``.

  Returns:
    One dict per member, as :func:`~metalearn.training.evaluate` returns.
  """
  if num_episodes < 1:
    raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
  member_map = _member_map(member_map)
  if task_map == "auto":
    task_map = default_task_map()
  batch_size = min(batch_size, num_episodes)

  def member(meta_params, hparams, keys, data):
    learner, _ = make_member(hparams)

    def one(k):
      episode_key, adapt_key = jax.random.split(k)
      episode = sampler.sample(episode_key, data)
      task_params = learner.adapt(meta_params, episode, adapt_key,
                                  training=False)
      return learner.evaluate(meta_params, task_params, episode)[1]

    return jax.vmap(one)(keys) if task_map == "vmap" else jax.lax.map(
        one, keys)

  fn = _compile.jit(_over_members(member, member_map, num_shared=2))
  ids = np.arange(-(-num_episodes // batch_size) * batch_size)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ids))
  chunks = []
  for start in range(0, len(ids), batch_size):
    chunks.append(jax.device_get(fn(
        meta_params, population.hparams, keys[start:start + batch_size],
        sampler.data)))
  return [
      summarize({name: np.concatenate([c[name][i] for c in chunks])
                 [:num_episodes] for name in chunks[0]})
      for i in range(population.size)
  ]


def nonfinite_members(history: Sequence[Mapping[str, Any]]) -> list[int]:
  """The members whose metrics turned non-finite during training."""
  if not history:
    return []
  return [int(i) for i in np.flatnonzero(history[-1]["member_finite"] == 0)]


__all__ = (
    "MEMBER_MAPS",
    "Population",
    "check_members",
    "evaluate_population",
    "grid",
    "init_population",
    "make_population",
    "make_population_step",
    "member_state",
    "meta_train_population",
    "nonfinite_members",
    "step_keys",
)
