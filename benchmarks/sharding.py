"""Meta-training throughput against the number of devices the tasks span.

Each meta-batch's tasks are sharded over a ``training.task_mesh(n)`` of
``n`` devices (``make_meta_step(..., mesh=...)``), with ``n`` = 1, 2, 4, 8
by default, for ProtoNet and second-order MAML (1 inner step) on a small
workload: 5-way 1-shot, 5 queries per class, 28x28 images from a synthetic
``uint8`` pool, Conv-4 with ``--features`` filters, meta-batch 16.

The device count of XLA:CPU is fixed when JAX starts, so every ``n`` runs
in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_
count=n`` (on a GPU/TPU host, the first ``n`` real devices are used
instead). The one-device process also times the step built without a mesh,
which shows what the mesh machinery itself costs.

**Simulated CPU devices share the host's cores**: their numbers show that
the sharded program is correct and what its partitioning and all-reduce
cost, not a speed-up. Real speed-ups need real devices (several GPUs, or
hosts joined with ``training.initialize_distributed``).

Reported per (learner, devices): compile time (``lower().compile()``),
the median step time of ``--repeats`` calls (each to
``block_until_ready``, after ``--warmup`` untimed ones), tasks/s, and
tasks/s relative to the one-device mesh.

Usage:
  python benchmarks/sharding.py --out results/sharding.json
  python benchmarks/sharding.py --devices 1,8 --learners protonet --smoke
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import _harness
import jax
import numpy as np
import optax

from metalearn import metalearners, models, tasks, training
from metalearn.types import ClassPool

LEARNERS = {
    "protonet": "ProtoNet",
    "maml": "MAML k=1",
}
IMAGE_SHAPE = (28, 28, 1)
COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--learners", default=",".join(LEARNERS),
                 help=f"comma-separated subset of {tuple(LEARNERS)}")
  p.add_argument("--devices", default=None,
                 help="comma-separated device counts (default 1,2,4,8; "
                 "1,2 with --smoke)")
  p.add_argument("--batch", type=int, default=16, help="tasks per meta-step")
  p.add_argument("--features", type=int, default=32, help="Conv-4 filters")
  p.add_argument("--ways", type=int, default=5)
  p.add_argument("--shots", type=int, default=1)
  p.add_argument("--queries", type=int, default=5)
  p.add_argument("--pool-classes", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5, help="timed calls")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls")
  p.add_argument("--smoke", action="store_true",
                 help="1 and 2 devices, 8 filters, 2 queries, 1 repeat, to "
                 "check that it runs")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:
    args.features, args.queries, args.repeats, args.warmup = 8, 2, 1, 1
    args.pool_classes = 2 * args.ways
  if args.devices is None:
    args.devices = "1,2" if args.smoke else "1,2,4,8"
  args.learners = tuple(args.learners.split(","))
  unknown = sorted(set(args.learners) - set(LEARNERS))
  if unknown:
    p.error(f"--learners: unknown {unknown}; choose from {tuple(LEARNERS)}")
  try:
    args.devices = tuple(int(n) for n in args.devices.split(","))
  except ValueError:
    p.error(f"--devices must be comma-separated ints, got {args.devices!r}")
  for n in args.devices:
    if n < 1 or args.batch % n:
      p.error(f"--devices: {n} must be >= 1 and divide --batch={args.batch}")
  for name in ("batch", "features", "ways", "shots", "queries",
               "pool_classes", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def build(name: str, args):
  """``(learner, meta_optimizer)`` for a name of :data:`LEARNERS`."""
  if name == "protonet":
    learner = metalearners.protonet(
        models.conv4(None, features=args.features))
  else:
    learner = metalearners.maml(
        models.conv4(args.ways, features=args.features), inner_lr=0.4,
        num_inner_steps=1)
  return learner, optax.adam(1e-3)


def synthetic_sampler(args) -> tasks.TaskSampler:
  """Episodes over random ``uint8`` images (the values do not change the
  work done)."""
  shape = (args.pool_classes, args.shots + args.queries, *IMAGE_SHAPE)
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  pool = ClassPool(images, np.arange(shape[0], dtype=np.int32))
  return tasks.episode_sampler(pool, num_ways=args.ways,
                               num_shots=args.shots,
                               num_queries=args.queries)


def time_step(learner, tx, sampler, args, mesh) -> dict:
  """Compiles one meta-step (sharded over ``mesh``, or not) and times it."""
  key = jax.random.key(0)
  state = training.init_state(learner, tx, sampler, key)
  data = sampler.data
  if mesh is not None:
    state, data = training.replicate((state, data), mesh)
  step = training.make_meta_step(learner, tx, sampler,
                                 meta_batch_size=args.batch, mesh=mesh)
  start = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  compile_s = time.perf_counter() - start

  def call():
    nonlocal state
    state, metrics = jax.block_until_ready(compiled(state, data, key))
    return metrics

  for _ in range(args.warmup):
    call()
  times = _harness.time_calls(call, args.repeats)
  loss = float(call()["outer/loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"outer/loss is {loss}")
  return {
      "compile_s": compile_s,
      "step_times_s": times,
      "step_ms": 1e3 * _harness.median(times),
      "tasks_per_s": args.batch / _harness.median(times),
      "outer_loss": loss,
  }


def run_worker(args) -> list[dict]:
  """Times every learner on a mesh of ``args.worker`` devices."""
  num_devices = args.worker
  mesh = training.task_mesh(num_devices)
  sampler = synthetic_sampler(args)
  rows = []
  for name in args.learners:
    learner, tx = build(name, args)
    meshes = [("mesh", mesh)] + ([("none", None)] if num_devices == 1 else [])
    for label, m in meshes:
      row = time_step(learner, tx, sampler, args, m)
      row.update(learner=name, devices=num_devices, mesh=label,
                 device_count=jax.device_count(),
                 platform=jax.devices()[0].platform)
      rows.append(row)
  return rows


def spawn_worker(args, num_devices: int) -> list[dict]:
  """Runs this script as a ``--worker`` process that sees ``num_devices``
  CPU devices (a GPU/TPU host uses its real ones)."""
  env = dict(os.environ)
  flags = re.sub(rf"{COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} {COUNT_FLAG}={num_devices}".strip()
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "worker.json")
    cmd = [sys.executable, os.path.abspath(__file__),
           "--worker", str(num_devices), "--out", out,
           "--learners", ",".join(args.learners),
           "--devices", str(num_devices)]
    for flag in ("batch", "features", "ways", "shots", "queries",
                 "pool_classes", "repeats", "warmup"):
      cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
      raise RuntimeError(
          f"worker with {num_devices} devices failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)["rows"]


def report(args, machine, rows) -> None:
  base = {r["learner"]: r["tasks_per_s"] for r in rows
          if r["devices"] == 1 and r["mesh"] == "mesh"}
  print(f"\n{args.ways}-way {args.shots}-shot, {args.queries} queries, "
        f"meta-batch {args.batch}, Conv-4 ({args.features} filters, "
        f"max-pool), 28x28; median of {args.repeats}; {machine['cpu']} "
        f"({machine['cpu_count']} cores, load {machine['load_average_1m']}),"
        f" jax {machine['jax']}, {rows[0]['platform']} devices.")
  if rows[0]["platform"] == "cpu":
    print("Simulated CPU devices share the host's cores: these numbers show "
          "correctness and overhead, not a speed-up.\n")
  print(_harness.markdown_table(
      ["learner", "devices", "tasks/device", "mesh", "compile (s)",
       "step (ms)", "tasks/s", "vs 1 device"],
      [[LEARNERS[r["learner"]], r["devices"], args.batch // r["devices"],
        "yes" if r["mesh"] == "mesh" else "no", r["compile_s"], r["step_ms"],
        r["tasks_per_s"], r["tasks_per_s"] / base[r["learner"]]]
       for r in rows],
  ))


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker is not None:
    _harness.write_json(args.out, {"rows": run_worker(args)})
    return 0
  machine = _harness.machine_info()
  rows = []
  for n in args.devices:
    print(f"{n} device(s) ...", flush=True)
    rows += spawn_worker(args, n)
  rows.sort(key=lambda r: (args.learners.index(r["learner"]), r["devices"],
                           r["mesh"]))
  report(args, machine, rows)
  config = {k: v for k, v in vars(args).items()
            if k not in ("out", "worker")}
  _harness.write_json(args.out, {
      "benchmark": "sharding", "machine": machine, "config": config,
      "results": rows,
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
