"""The meta-training loop and few-shot evaluation with confidence intervals."""

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from metalearn.metalearners import MetaLearner
from metalearn.tasks import TaskSampler
from metalearn.training import _compile, _sharding
from metalearn.training._step import (
    MetaTrainState,
    default_task_map,
    init_state,
    make_meta_step,
)

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """Raised when meta-training produces a NaN or infinite loss."""


def meta_train(
    learner: MetaLearner,
    meta_optimizer: optax.GradientTransformation,
    sampler: TaskSampler,
    *,
    key: jax.Array,
    num_steps: int,
    meta_batch_size: int,
    state: MetaTrainState | None = None,
    steps_per_call: int = 1,
    task_map: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    log_every: int = 100,
    callback: Callable[[MetaTrainState, dict[str, float]], None] | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
) -> tuple[MetaTrainState, list[dict[str, float]]]:
  """Meta-trains a learner for ``num_steps`` meta-steps.

  All randomness comes from ``key``, split into ``init_key, step_key =
  jax.random.split(key)``: parameters are initialised from ``init_key`` and
  step ``t`` samples from ``fold_in(step_key, t)``, so continuing from a
  saved ``state`` reproduces an uninterrupted run exactly.

  Args:
    learner: any :class:`MetaLearner`.
    meta_optimizer: the outer optax optimizer.
    sampler: the meta-training task distribution.
    key: the run's key.
    num_steps: the total number of meta-steps (a resumed run stops at the
      same total).
    meta_batch_size: tasks per meta-step.
    state: a state to continue from, else a fresh one.
    steps_per_call: meta-steps per jitted call (``lax.scan``); must divide
      ``log_every``.
    task_map: how tasks are mapped (:func:`metalearn.training.map_tasks`).
    mesh: shard each meta-batch's tasks over this mesh's devices
      (:func:`metalearn.training.task_mesh`); the state and the pool are
      replicated on it. ``None`` runs on one device.
    log_every: meta-steps between metric records and callbacks.
    callback: ``callback(state, metrics)`` every ``log_every`` steps, after
      the metrics are checked to be finite (checkpointing, logging).
    progress: show a console progress bar.
    max_seconds: stop at the first metric record (a multiple of
      ``log_every``) reached after this many seconds of this call, even if
      ``num_steps`` is not reached; ``None``: no limit. Where it stops
      depends on the machine's speed, but the state at any given step does
      not: it equals an uninterrupted run's, so the run can be resumed.

  Returns:
    The final state and the list of logged metrics (with ``step`` and
    ``tasks_per_sec``).

  Raises:
    NonFiniteLossError: if the loss becomes NaN or infinite; the callback is
      not called for that state, so the last checkpoint stays good.
  """
  if log_every % steps_per_call:
    raise ValueError(
        f"steps_per_call={steps_per_call} must divide log_every={log_every}"
    )
  init_key, step_key = jax.random.split(key)
  step_fn = make_meta_step(
      learner,
      meta_optimizer,
      sampler,
      meta_batch_size=meta_batch_size,
      steps_per_call=steps_per_call,
      task_map=task_map,
      mesh=mesh,
  )
  if state is None:
    state = init_state(learner, meta_optimizer, sampler, init_key)
  data = sampler.data
  if mesh is not None:
    state, data = _sharding.replicate((state, data), mesh)
  throttle = mesh is not None and _sharding.needs_throttle(mesh)
  in_flight = None
  start = int(state.step)
  history = []
  bar = tqdm(
      total=num_steps, initial=start, disable=not progress, unit="step",
      dynamic_ncols=True,
  )
  tick, tick_step = time.perf_counter(), start
  deadline = None if max_seconds is None else tick + max_seconds
  step = start
  while step < num_steps:
    state, metrics = step_fn(state, data, step_key)
    if throttle:  # At most two calls in flight (see needs_throttle).
      jax.block_until_ready(in_flight)
      in_flight = metrics
    step += steps_per_call
    bar.update(steps_per_call)
    if step % log_every and step < num_steps:
      continue
    metrics = {k: float(v) for k, v in metrics.items()}
    now = time.perf_counter()
    metrics["step"] = step
    metrics["tasks_per_sec"] = (
        (step - tick_step) * meta_batch_size / max(now - tick, 1e-9)
    )
    tick, tick_step = now, step
    if not all(math.isfinite(v) for v in metrics.values()):
      bar.close()
      raise NonFiniteLossError(
          f"non-finite metrics at meta-step {step}: {metrics}; lower the "
          "learning rates or resume from the last checkpoint"
      )
    bar.set_postfix(
        {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
         if k.startswith("outer/") or k == "tasks_per_sec"}
    )
    history.append(metrics)
    if callback is not None:
      callback(state, metrics)
    if deadline is not None and now >= deadline:
      break
  bar.close()
  return state, history


def make_eval_fn(
    learner: MetaLearner,
    sampler: TaskSampler,
    *,
    batch_size: int,
    task_map: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
):
  """Jitted ``fn(meta_params, data, keys [batch_size]) -> per-episode
  metrics``, adapting with the learner's meta-test settings.

  With a ``mesh``, each device evaluates ``batch_size // D`` of the
  episodes; the inputs and the ``[batch_size]`` outputs are replicated
  (so every host can read them). ``batch_size`` must then be divisible by
  the number of devices (``ValueError`` otherwise).
  """
  if task_map == "auto":
    task_map = default_task_map()
  if mesh is not None:
    _sharding.check_divisible(batch_size, mesh, "batch_size")

  def one(meta_params, data, key):
    episode_key, adapt_key = jax.random.split(key)
    episode = sampler.sample(episode_key, data)
    task_params = learner.adapt(meta_params, episode, adapt_key,
                                training=False)
    return learner.evaluate(meta_params, task_params, episode)[1]

  def local(keys, meta_params, data):
    run = lambda k: one(meta_params, data, k)  # noqa: E731
    if task_map == "vmap":
      return jax.vmap(run)(keys)
    return jax.lax.map(run, keys)

  def fn(meta_params, data, keys):
    if mesh is None:
      return local(keys, meta_params, data)
    out = _sharding.map_devices(local, keys, mesh, meta_params, data)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)

  if mesh is None:
    return _compile.jit(fn)
  replicated = _sharding.replicated(mesh)
  return _compile.jit(fn, in_shardings=replicated, out_shardings=replicated)


@functools.lru_cache(maxsize=16)
def _cached_eval_fn(learner, sample, batch_size, task_map, mesh):
  """One compiled evaluation per learner and sampler, so that repeated
  validation during training does not recompile (``data`` is an argument
  of the compiled function, never a constant in it)."""
  return make_eval_fn(
      learner, TaskSampler(sample, None), batch_size=batch_size,
      task_map=task_map, mesh=mesh,
  )


def evaluate(
    learner: MetaLearner,
    meta_params: PyTree,
    sampler: TaskSampler,
    key: jax.Array,
    *,
    num_episodes: int = 600,
    batch_size: int = 50,
    task_map: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
  """Meta-test accuracy (or loss) over a fixed set of episodes, with a 95%
  confidence interval, as the few-shot papers report it.

  Episode ``i`` is drawn from ``jax.random.fold_in(key, i)``, so the same key
  gives the same test episodes for every learner and every batch size.

  Args:
    learner: the meta-learner; adapts with its meta-test settings.
    meta_params: the meta-trained parameters.
    sampler: the meta-test task distribution.
    key: the evaluation key (fixed across runs for comparable numbers).
    num_episodes: number of test episodes (600 in most papers).
    batch_size: episodes per jitted call.
    task_map: ``"auto"``, ``"vmap"`` or ``"scan"``.
    mesh: split each batch of episodes over this mesh's devices; the batch
      is rounded up to a multiple of the device count (the episodes, and
      so the results, do not depend on the batch size).

  Returns:
    For each metric ``m`` (``outer/accuracy``, ``outer/loss``): ``m`` (the
    mean), ``m_ci95`` (1.96 standard errors) and ``m_std``; plus
    ``num_episodes``.
  """
  if num_episodes < 1:
    raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
  batch_size = min(batch_size, num_episodes)
  data = sampler.data
  if mesh is not None:
    num_devices = mesh.shape[_sharding.TASK_AXIS]
    batch_size = -(-batch_size // num_devices) * num_devices
    meta_params, data = _sharding.replicate((meta_params, data), mesh)
  try:
    fn = _cached_eval_fn(learner, sampler.sample, batch_size, task_map, mesh)
  except TypeError:  # An unhashable learner or sampler: compile afresh.
    fn = make_eval_fn(learner, sampler, batch_size=batch_size,
                      task_map=task_map, mesh=mesh)
  ids = np.arange(-(-num_episodes // batch_size) * batch_size)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ids))
  chunks = []
  for start in range(0, len(ids), batch_size):
    chunks.append(
        jax.device_get(
            fn(meta_params, data, keys[start : start + batch_size])
        )
    )
  return summarize({
      name: np.concatenate([c[name] for c in chunks])[:num_episodes]
      for name in chunks[0]
  })


def summarize(per_episode: dict[str, np.ndarray]) -> dict[str, float]:
  """Mean, standard deviation and 95% interval of per-episode metrics.

  Args:
    per_episode: each metric name to its ``[episodes]`` values.

  Returns:
    For each metric ``m``: ``m`` (the mean), ``m_std`` and ``m_ci95`` (1.96
    standard errors); plus ``num_episodes``.
  """
  num_episodes = len(next(iter(per_episode.values())))
  out: dict[str, float] = {"num_episodes": num_episodes}
  for name, values in per_episode.items():
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if num_episodes > 1 else 0.0
    out[name] = float(values.mean())
    out[f"{name}_std"] = std
    out[f"{name}_ci95"] = 1.96 * std / math.sqrt(num_episodes)
  return out
