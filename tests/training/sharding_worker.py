"""Runs the sharding checks on 8 simulated CPU devices; prints one JSON line.

Started by ``test_sharding.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts, so the rest of the suite keeps its single device).
It only measures; the assertions live in the test file.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python tests/training/sharding_worker.py
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn import metalearners, models, tasks, training
from metalearn.training import _sharding
from metalearn.types import ClassPool

NUM_DEVICES = 8
META_BATCH = 8


def _pool():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 6, 28, 28, 1), dtype=np.uint8)
  return ClassPool(images, np.arange(12, dtype=np.int32))


def _max_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
  return max(jax.tree.leaves(diffs))


def _sharding_report(tree, mesh):
  """Whether every leaf is replicated over exactly the mesh's devices."""
  leaves = jax.tree.leaves(tree)
  return {
      "replicated": all(x.sharding.is_fully_replicated for x in leaves),
      "on_mesh_devices": all(
          x.sharding.device_set == set(mesh.devices.flat) for x in leaves
      ),
  }


def _error(fn):
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


def check_meta_train(sampler, mesh):
  """ProtoNet through meta_train: 2 meta-steps with and without the mesh."""
  learner = metalearners.protonet(models.conv4(None, features=8))
  kwargs = dict(key=jax.random.key(0), num_steps=2, meta_batch_size=META_BATCH,
                log_every=1, progress=False)
  single, hist_single = training.meta_train(
      learner, optax.sgd(0.1), sampler, **kwargs
  )
  sharded, hist_sharded = training.meta_train(
      learner, optax.sgd(0.1), sampler, mesh=mesh, **kwargs
  )
  init = training.init_state(
      learner, optax.sgd(0.1), sampler, jax.random.split(kwargs["key"])[0]
  )
  return {
      "param_diff": _max_diff(single.meta_params, sharded.meta_params),
      "param_change": _max_diff(init.meta_params, single.meta_params),
      "loss": [h["outer/loss"] for h in hist_single],
      "loss_sharded": [h["outer/loss"] for h in hist_sharded],
      "state": _sharding_report(sharded, mesh),
  }


def check_step(sampler, mesh):
  """MAML through make_meta_step: one step, compiled HLO inspected."""
  learner = metalearners.maml(models.conv4(5, features=8), inner_lr=0.4)
  tx = optax.sgd(0.1)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  key = jax.random.key(1)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 (state is donated)
  single_fn = training.make_meta_step(
      learner, tx, sampler, meta_batch_size=META_BATCH
  )
  single, metrics = single_fn(copy(state), sampler.data, key)
  sharded_fn = training.make_meta_step(
      learner, tx, sampler, meta_batch_size=META_BATCH, mesh=mesh
  )
  placed = training.replicate((copy(state), sampler.data), mesh)
  compiled = sharded_fn.lower(*placed, key).compile()
  hlo = compiled.as_text()
  sharded, sharded_metrics = compiled(*placed, key)
  return {
      "param_diff": _max_diff(single.meta_params, sharded.meta_params),
      "param_change": _max_diff(state.meta_params, single.meta_params),
      "metric_diff": _max_diff(metrics, sharded_metrics),
      "state": _sharding_report(sharded, mesh),
      "metrics": _sharding_report(sharded_metrics, mesh),
      "hlo_all_reduce": "all-reduce" in hlo,
      "hlo_all_gather": "all-gather" in hlo,
  }


def check_carried(sampler, mesh):
  """Reptile's carried Adam state under a clipping meta-optimizer, 2 steps."""
  learner = metalearners.reptile(
      models.conv4(5, features=8), num_inner_steps=2,
      inner_optimizer=optax.adam(1e-3, b1=0.0), carry_inner_state=True)
  tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-3))
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 (state is donated)
  out = {}
  for name, kwargs in (("single", {}), ("sharded", {"mesh": mesh})):
    step = training.make_meta_step(learner, tx, sampler,
                                   meta_batch_size=META_BATCH, **kwargs)
    s, data = copy(state), sampler.data
    if kwargs:
      s, data = training.replicate((s, data), mesh)
    for i in range(2):
      s, _ = step(s, data, jax.random.key(1 + i))
    out[name] = s
  single, sharded = out["single"].meta_params, out["sharded"].meta_params
  return {
      "model_diff": _max_diff(single.model, sharded.model),
      "model_change": _max_diff(state.meta_params.model, single.model),
      "nu_diff": _max_diff(single.inner_state[0].nu,
                           sharded.inner_state[0].nu),
      "nu_change": _max_diff(state.meta_params.inner_state[0].nu,
                             single.inner_state[0].nu),
      "count": [int(single.inner_state[0].count),
                int(sharded.inner_state[0].count)],
      "state": _sharding_report(out["sharded"], mesh),
  }


def check_eval(sampler, mesh):
  """MAML evaluation (adaptation included) with and without the mesh."""
  learner = metalearners.maml(
      models.conv4(5, features=8), inner_lr=0.4, eval_num_inner_steps=2
  )
  params = learner.init(
      jax.random.key(0), sampler.sample(jax.random.key(0), sampler.data)
  )
  key = jax.random.key(2)
  # 6 episodes per batch on one device, rounded up to 8 on the mesh.
  kwargs = dict(num_episodes=12, batch_size=6)
  single = training.evaluate(learner, params, sampler, key, **kwargs)
  sharded = training.evaluate(learner, params, sampler, key, mesh=mesh,
                              **kwargs)
  # Where the per-episode outputs live (a cheaper learner to compile).
  embed = metalearners.protonet(models.conv4(None, features=8))
  fn = training.make_eval_fn(embed, sampler, batch_size=NUM_DEVICES,
                             mesh=mesh)
  embed_params = embed.init(
      jax.random.key(0), sampler.sample(jax.random.key(0), sampler.data)
  )
  per_episode = fn(*training.replicate((embed_params, sampler.data), mesh),
                   jax.random.split(key, NUM_DEVICES))
  return {
      "single": single,
      "sharded": sharded,
      "per_episode": _sharding_report(per_episode, mesh),
      "per_episode_shape": list(per_episode["outer/accuracy"].shape),
  }


def check_errors(sampler, mesh):
  learner = metalearners.protonet(models.conv4(None, features=8))
  return {
      "meta_batch": _error(lambda: training.make_meta_step(
          learner, optax.sgd(0.1), sampler, meta_batch_size=6, mesh=mesh)),
      "meta_train": _error(lambda: training.meta_train(
          learner, optax.sgd(0.1), sampler, key=jax.random.key(0),
          num_steps=1, meta_batch_size=12, mesh=mesh, progress=False)),
      "eval_batch": _error(lambda: training.make_eval_fn(
          learner, sampler, batch_size=6, mesh=mesh)),
      "too_many_devices": _error(lambda: training.task_mesh(NUM_DEVICES + 1)),
  }


def check_shard_tasks(mesh):
  x = training.shard_tasks(jnp.arange(16.0), mesh)
  return {
      "shape": list(x.shape),
      "spec": list(x.sharding.spec),
      "shard_shapes": sorted({s.data.shape for s in x.addressable_shards}),
      "num_shards": len(x.addressable_shards),
      "first_shard": x.addressable_shards[0].data.ravel().tolist(),
      "sub_mesh_size": training.task_mesh(4).size,
      "throttle": _sharding.needs_throttle(mesh),
  }


def main():
  if jax.device_count() != NUM_DEVICES:
    raise SystemExit(
        f"expected {NUM_DEVICES} devices, got {jax.device_count()}: run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES}"
    )
  mesh = training.task_mesh()
  sampler = tasks.episode_sampler(_pool(), num_ways=5, num_shots=1,
                                  num_queries=2)
  report = {"device_count": jax.device_count(), "seconds": {}}
  checks = {
      "errors": lambda: check_errors(sampler, mesh),
      "shard_tasks": lambda: check_shard_tasks(mesh),
      "meta_train": lambda: check_meta_train(sampler, mesh),
      "step": lambda: check_step(sampler, mesh),
      "carried": lambda: check_carried(sampler, mesh),
      "eval": lambda: check_eval(sampler, mesh),
  }
  for name, check in checks.items():
    start = time.perf_counter()
    report[name] = check()
    report["seconds"][name] = round(time.perf_counter() - start, 2)
  print(json.dumps(report, default=str))


if __name__ == "__main__":
  main()
