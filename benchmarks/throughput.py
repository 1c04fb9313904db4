"""Meta-training throughput of every meta-learner on the Omniglot workload
(and of Mini-ImageNet's models on Mini-ImageNet-shaped images).

The workload: Omniglot 5-way 1-shot, 15 queries per class, meta-batch 32,
Conv-4 with max-pooling and 64 filters (``models.conv4(5)`` for the
gradient-based learners, ``models.conv4(None)`` for ProtoNet). Episodes are
drawn on device from a synthetic ``uint8`` pool of Omniglot's shape (4112
classes x 20 examples x 28 x 28 x 1, the Vinyals training split with
rotations), so no dataset is needed; the pixel values do not change the
work done. ``--shape mini_imagenet`` draws from a pool of 84 x 84 x 3
images instead (64 classes) and runs Mini-ImageNet's models: MAML k=5 with
Finn et al.'s 32-filter Conv-4 (``maml5_c32``), ProtoNet on the same
(``protonet_c32``) and on ResNet-12 (``protonet_resnet12``).

For each learner (and each ``--task-map``), a fresh subprocess builds
``training.make_meta_step`` and reports:

- compile time: ``step.lower(...).compile()``, i.e. tracing, lowering and
  XLA compilation of the first call;
- tasks/s: meta-batch size / the median duration of ``--repeats`` timed
  calls after ``--warmup`` untimed ones, each to ``block_until_ready``;
- peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that
  subprocess (jax runtime, pool, compilation and execution included).

The parent counts the FLOPs of one task's meta-gradient with XLA's cost
analysis (``jax.jit(learner.meta_grad).lower(...).compile()
.cost_analysis()["flops"]``, with every ``lax.scan`` unrolled while
tracing, because XLA counts a while-loop body once), measures the float32
matmul peak of the machine (a jitted 4096 x 4096 ``jnp.dot``, median), and
reports the achieved FLOP rate (FLOPs per task x tasks/s) as a fraction of
that peak.

Usage:
  python benchmarks/throughput.py --out results/throughput.json
  python benchmarks/throughput.py --learners maml1,protonet \\
      --task-map scan,vmap --out results/scan_vs_vmap.json
  python benchmarks/throughput.py --shape mini_imagenet --batch 4 \\
      --out results/throughput_mini_imagenet.json
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn import metalearners, models, tasks, training
from metalearn.types import ClassPool

# name -> (table label, factory of (learner, meta-optimizer)).
LEARNERS = {
    "maml1": ("MAML k=1", lambda: metalearners.maml(
        models.conv4(5), inner_lr=0.4, num_inner_steps=1)),
    "maml5": ("MAML k=5", lambda: metalearners.maml(
        models.conv4(5), inner_lr=0.4, num_inner_steps=5)),
    "fomaml1": ("FOMAML k=1", lambda: metalearners.maml(
        models.conv4(5), inner_lr=0.4, num_inner_steps=1, first_order=True)),
    "fomaml5": ("FOMAML k=5", lambda: metalearners.maml(
        models.conv4(5), inner_lr=0.4, num_inner_steps=5, first_order=True)),
    "anil": ("ANIL k=1", lambda: metalearners.anil(
        models.conv4(5), inner_lr=0.4, num_inner_steps=1)),
    "metasgd": ("Meta-SGD k=1", lambda: metalearners.metasgd(
        models.conv4(5), inner_lr=0.4, num_inner_steps=1)),
    "reptile": ("Reptile k=5", lambda: metalearners.reptile(
        models.conv4(5), inner_lr=0.001, num_inner_steps=5)),
    "protonet": ("ProtoNet", lambda: metalearners.protonet(
        models.conv4(None))),
    # The learners added by the meta-gradient issue, at their experiment
    # files' settings: iMAML's 16 inner steps, pull-back and 5 damped
    # conjugate-gradient steps (omniglot_5w1s_imaml), the in-context
    # transformer's 2 blocks of width 128 (omniglot_5w1s_incontext).
    "imaml": ("iMAML k=16, 5 CG steps", lambda: metalearners.imaml(
        models.conv4(5), inner_lr=0.1, num_inner_steps=16, reg=2.0,
        cg_steps=5, inner="pull_back", cg_damping=1.0,
        cg_reg_damping=10.0)),
    "incontext": ("In-context transformer", lambda: metalearners.in_context(
        models.conv4(None, norm="running"), max_ways=5)),
    # Supervised pretraining (Baseline, Baseline++ and RFS train alike): a
    # "task" is one mini-batch of PRETRAIN_BATCH images over the 4112
    # classes, as many images as a 5-way 1-shot 15-query episode.
    "baseline": ("Baseline pretraining (batches of 80)", lambda: (
        metalearners.baseline(models.conv4(None, norm="running"), 4112,
                              batch_size=PRETRAIN_BATCH))),
    # Mini-ImageNet's models (--shape mini_imagenet): Finn et al.'s Conv-4
    # with 32 filters, and the ResNet-12 of MetaOptNet and its successors.
    "maml5_c32": ("MAML k=5, Conv-4 (32)", lambda: metalearners.maml(
        models.conv4(5, features=32), inner_lr=0.01, num_inner_steps=5)),
    "protonet_c32": ("ProtoNet, Conv-4 (32)", lambda: metalearners.protonet(
        models.conv4(None, features=32))),
    "protonet_resnet12": ("ProtoNet, ResNet-12", lambda: (
        metalearners.protonet(models.resnet12(None)))),
}
# GFLOP per task counted by hand for 5-way 1-shot, 15 queries: 2 x the
# multiply-adds of the convolutions, zero padding included (XLA counts only
# in-bounds taps, but also counts element-wise operations).
ANALYTIC_GFLOP = {"maml1": 5.21, "maml5": 8.68, "fomaml1": 4.64,
                  "protonet": 4.64}
TASK_MAPS = ("auto", "vmap", "scan")
PRETRAIN_BATCH = 80
# Synthetic pools: (classes, examples per class, height, width, channels).
# Omniglot: the Vinyals training split with rotations; Mini-ImageNet: its 64
# training classes (20 examples each: how many there are does not change the
# work of a step, only the memory of the pool).
POOLS = {"omniglot": (4112, 20, 28, 28, 1),
         "mini_imagenet": (64, 20, 84, 84, 3)}
# The learners each shape runs unless --learners names others.
DEFAULT_LEARNERS = {
    "omniglot": ("maml1", "maml5", "fomaml1", "fomaml5", "anil", "metasgd",
                 "reptile", "protonet", "baseline"),
    "mini_imagenet": ("maml5_c32", "protonet_c32", "protonet_resnet12"),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--learners", default=None,
                 help=f"comma-separated subset of {tuple(LEARNERS)} "
                      "(default: the --shape's own, DEFAULT_LEARNERS)")
  p.add_argument("--task-map", default="auto",
                 help=f"comma-separated subset of {TASK_MAPS}")
  p.add_argument("--batch", type=int, default=32, help="tasks per meta-step")
  p.add_argument("--ways", type=int, default=5)
  p.add_argument("--shots", type=int, default=1)
  p.add_argument("--queries", type=int, default=15)
  p.add_argument("--repeats", type=int, default=5, help="timed calls")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls")
  p.add_argument("--shape", default="omniglot", choices=tuple(POOLS),
                 help="the image shape of the synthetic pool")
  p.add_argument("--pool-classes", type=int, default=None,
                 help="classes in the pool (default: the dataset's)")
  p.add_argument("--matmul-size", type=int, default=4096)
  p.add_argument("--smoke", action="store_true",
                 help="batch 2, 1 repeat, tiny pool and matmul, for CI")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.pool_classes is None:
    args.pool_classes = POOLS[args.shape][0]
  if args.learners is None:
    args.learners = ",".join(DEFAULT_LEARNERS[args.shape])
  if args.smoke:
    args.batch, args.repeats, args.warmup = 2, 1, 1
    args.pool_classes, args.matmul_size = 2 * args.ways, 256
  args.learners = tuple(args.learners.split(","))
  args.task_map = tuple(args.task_map.split(","))
  for name, given, known in (("learners", args.learners, LEARNERS),
                             ("task-map", args.task_map, TASK_MAPS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      p.error(f"--{name}: unknown {unknown}; choose from {tuple(known)}")
  for name in ("batch", "ways", "shots", "repeats", "pool_classes",
               "matmul_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def synthetic_sampler(args) -> tasks.TaskSampler:
  """An episode sampler over random ``uint8`` images of the dataset's
  shape (``--shape``)."""
  shape = (args.pool_classes, *POOLS[args.shape][1:])
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  pool = ClassPool(jax.device_put(images),
                   jax.device_put(np.arange(shape[0], dtype=np.int32)))
  return tasks.episode_sampler(pool, num_ways=args.ways,
                               num_shots=args.shots,
                               num_queries=args.queries)


def images_per_task(name: str, args) -> int:
  """Images one task embeds: an episode's, or a pretraining mini-batch."""
  if name == "baseline":
    return PRETRAIN_BATCH
  return args.ways * (args.shots + args.queries)


def training_sampler(learner, sampler):
  """The sampler the learner meta-trains on (pretraining: mini-batches)."""
  if learner.train_sampler is None:
    return sampler
  return learner.train_sampler(sampler)


def build(name: str):
  """``(learner, meta_optimizer)`` for a learner name of :data:`LEARNERS`."""
  learner = LEARNERS[name][1]()
  # Reptile's meta-gradient is theta - phi; SGD with step 1 is its update.
  tx = optax.sgd(1.0) if name == "reptile" else optax.adam(1e-3)
  return learner, tx


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per device.
    cost = cost[0]
  return float(cost["flops"])


def run_worker(args) -> dict:
  """Compiles and times one learner's meta-step (in its own process)."""
  name, task_map = args.worker, args.task_map[0]
  learner, tx = build(name)
  sampler = training_sampler(learner, synthetic_sampler(args))
  key = jax.random.key(0)
  state = training.init_state(learner, tx, sampler, key)
  step = training.make_meta_step(learner, tx, sampler,
                                 meta_batch_size=args.batch,
                                 task_map=task_map)
  compiled, compile_s, times, metrics = _harness.compile_and_time(
      step, state, sampler.data, key, warmup=args.warmup,
      repeats=args.repeats)
  loss = float(metrics["outer/loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{name}: outer/loss is {loss}")
  return {
      "learner": name,
      "task_map": (training.default_task_map() if task_map == "auto"
                   else task_map),
      "compile_s": compile_s,
      "step_times_s": times,
      "tasks_per_s": args.batch / _harness.median(times),
      "peak_rss_bytes": _harness.max_rss_bytes(),
      # Accelerators: the device allocator's high-water mark (None on CPU).
      "device_peak_bytes": (jax.local_devices()[0].memory_stats()
                            or {}).get("peak_bytes_in_use"),
      "xla_step_flops_as_compiled": _flops(compiled),
      "outer_loss": loss,
  }


@contextlib.contextmanager
def unrolled_scans():
  """Makes ``jax.lax.scan`` unroll fully while tracing inside the block.

  XLA's cost analysis counts the body of a while loop once, whatever its
  trip count; unrolled, every iteration is counted.
  """
  original = jax.lax.scan

  def scan(*args, **kwargs):
    kwargs["unroll"] = True
    return original(*args, **kwargs)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def flops_per_task(name: str, args) -> float:
  """XLA's count of one task's meta-gradient, loops unrolled."""
  learner, _ = build(name)
  sampler = training_sampler(learner, synthetic_sampler(args))
  key = jax.random.key(0)
  episode = sampler.sample(key, sampler.data)
  params = learner.init(key, episode)
  with unrolled_scans():
    compiled = jax.jit(learner.meta_grad).lower(params, episode,
                                                key).compile()
  return _flops(compiled)


def matmul_peak_gflops(size: int, repeats: int) -> float:
  """Median GFLOP/s of a jitted float32 ``size x size`` matmul."""
  a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  times = _harness.time_calls(
      lambda: jax.block_until_ready(dot(a, b)), max(repeats, 3))
  return 2 * size**3 / _harness.median(times) / 1e9


def spawn_worker(args, name: str, task_map: str) -> dict:
  """Runs this script as a fresh ``--worker`` process and reads its JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "worker.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--task-map", task_map, "--out", out]
    for flag in ("shape", "batch", "ways", "shots", "queries", "repeats",
                 "warmup", "pool_classes"):
      cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(
          f"worker {name} ({task_map}) failed with exit status "
          f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)


def measure(args) -> tuple[float, list[dict]]:
  peak = matmul_peak_gflops(args.matmul_size, args.repeats)
  counted = {n: flops_per_task(n, args) for n in args.learners}
  rows = []
  for name in args.learners:
    for task_map in args.task_map:
      print(f"{name} ({task_map}) ...", flush=True)
      try:
        row = spawn_worker(args, name, task_map)
      except RuntimeError as e:  # Recorded; the other learners still run.
        print(e, flush=True)
        rows.append({"learner": name, "task_map": task_map,
                     "error": str(e)[-1000:]})
        continue
      gflop = counted[name] / 1e9
      analytic = (ANALYTIC_GFLOP.get(name)
                  if (args.shape, args.ways, args.shots, args.queries)
                  == ("omniglot", 5, 1, 15) else None)
      row.update(
          images_per_s=images_per_task(name, args) * row["tasks_per_s"],
          gflop_per_task_xla=gflop,
          gflop_per_task_analytic=analytic,
          achieved_gflops=gflop * row["tasks_per_s"],
          fraction_of_peak=gflop * row["tasks_per_s"] / peak,
      )
      rows.append(row)
  return peak, rows


def report(args, machine, peak, rows) -> None:
  image = "x".join(map(str, POOLS[args.shape][2:]))
  print(f"\n{args.shape} ({image}) {args.ways}-way {args.shots}-shot, "
        f"{args.queries} queries, meta-batch {args.batch}; median "
        f"of {args.repeats}; {machine['cpu']} ({machine['cpu_count']} "
        f"cores), jax {machine['jax']}; float32 matmul peak "
        f"{peak:.0f} GFLOP/s; % of peak from XLA's FLOP count\n")
  print(_harness.markdown_table(
      ["learner", "task map", "tasks/s", "images/s", "compile (s)",
       "peak RSS (GB)",
       "GFLOP/task (XLA)", "GFLOP/task (analytic)", "GFLOP/s",
       "% of matmul peak"],
      [[LEARNERS[r["learner"]][0], r["task_map"], r["tasks_per_s"],
        r["images_per_s"], r["compile_s"], r["peak_rss_bytes"] / 1e9,
        r["gflop_per_task_xla"],
        r["gflop_per_task_analytic"], r["achieved_gflops"],
        100 * r["fraction_of_peak"]] for r in rows if "error" not in r],
  ))
  for r in rows:
    if "error" in r:
      print(f"{LEARNERS[r['learner']][0]} ({r['task_map']}): "
            f"{r['error'].splitlines()[0]}")


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker is not None:
    _harness.write_json(args.out, run_worker(args))
    return 0
  machine = _harness.machine_info()
  peak, rows = measure(args)
  report(args, machine, peak, rows)
  config = {k: v for k, v in vars(args).items()
            if k not in ("out", "worker")}
  _harness.write_json(args.out, {
      "benchmark": "throughput", "machine": machine, "config": config,
      "matmul_peak_gflops": peak, "fraction_of_peak_uses": "xla",
      "results": rows,
  })
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
