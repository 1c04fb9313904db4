"""Aggregate meta-training throughput of a population against its size.

A sweep (seeds x step sizes) trains ``N`` members that share every shape;
``training.make_population_step`` advances all of them in one jitted call,
mapping the members with ``vmap`` (all at once: accelerators) or
``lax.map`` (one after another inside the program: CPU). This script times
that call for each ``N`` in ``--sizes`` and reports the aggregate tasks/s
(members x meta-batch / the median call) and its ratio to ``N = 1`` measured
in the same run: the speed-up a sweep gets from running as one program
instead of ``N`` separate runs one after another.

The workload is ``throughput.py``'s: Omniglot-shaped 5-way 1-shot episodes
with 15 queries per class from a synthetic pool, Conv-4, a learner of
``throughput.LEARNERS`` (default MAML k=1). The members differ in seed,
inner step size (spread over [0.1, 0.5]) and Adam learning rate (spread
over [3e-4, 3e-3]), so that nothing is shared but the shapes.

Usage:
  python benchmarks/population.py --out results/population_cpu.json
  python benchmarks/population.py --sizes 1,4,16,64 --member-map vmap \\
      --out results/population_gpu.json
"""

import argparse
import sys

import _harness
import jax
import numpy as np
import optax
import throughput

from metalearn import metalearners, models, training

# The learners whose step size the population sweeps (their factory with a
# traced inner_lr), by throughput.py's names.
FACTORIES = {
    "maml1": lambda lr: metalearners.maml(models.conv4(5), lr, 1),
    "fomaml1": lambda lr: metalearners.maml(models.conv4(5), lr, 1,
                                            first_order=True),
    "maml5": lambda lr: metalearners.maml(models.conv4(5), lr, 5),
    "protonet": lambda lr: metalearners.protonet(models.conv4(None)),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--learner", default="maml1", choices=tuple(FACTORIES))
  p.add_argument("--sizes", default="1,4,16",
                 help="comma-separated population sizes")
  p.add_argument("--member-map", default="auto",
                 choices=("auto", "map", "vmap"))
  p.add_argument("--batch", type=int, default=32,
                 help="tasks per meta-step of each member")
  p.add_argument("--repeats", type=int, default=3, help="timed calls")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls")
  p.add_argument("--pool-classes", type=int, default=4112)
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, one repeat: checks the script runs")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  args = p.parse_args(argv)
  try:
    args.sizes = [int(s) for s in args.sizes.split(",")]
  except ValueError:
    p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
  if not args.sizes or min(args.sizes) < 1:
    p.error("--sizes must be integers >= 1")
  for name in ("batch", "repeats", "pool_classes"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.smoke:
    args.sizes, args.batch, args.repeats, args.warmup = [1, 2], 2, 1, 0
    args.pool_classes = 20
  # throughput.synthetic_sampler reads these.
  args.shape, args.ways, args.shots, args.queries = "omniglot", 5, 1, 15
  return args


def population(size: int) -> training.Population:
  """``size`` members with distinct seeds and spread step sizes."""
  spread = np.linspace(0.0, 1.0, size) if size > 1 else np.zeros(1)
  return training.make_population(
      seeds=list(range(size)),
      hparams={"inner_lr": 0.1 + 0.4 * spread,
               "lr": 3e-4 * 10.0 ** spread},
  )


def measure(args, size: int, sampler) -> dict:
  factory = FACTORIES[args.learner]

  def make_member(hparams):
    return factory(hparams["inner_lr"]), optax.adam(hparams["lr"])

  members = population(size)
  training.check_members(make_member, members)
  step = training.make_population_step(
      make_member, sampler, meta_batch_size=args.batch,
      member_map=args.member_map,
  )
  states = training.init_population(make_member, sampler, members)
  _, compile_s, times, metrics = _harness.compile_and_time(
      step, states, sampler.data, training.step_keys(members),
      members.hparams, warmup=args.warmup, repeats=args.repeats,
  )
  call_s = _harness.median(times)
  return {
      "members": size,
      "compile_s": compile_s,
      "call_s": call_s,
      "step_times_s": times,
      "aggregate_tasks_per_s": size * args.batch / call_s,
      "finite": bool(np.isfinite(np.asarray(metrics["outer/loss"])).all()),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  machine = _harness.machine_info()
  member_map = args.member_map
  if member_map == "auto":
    member_map = "map" if jax.default_backend() == "cpu" else "vmap"
  sampler = throughput.synthetic_sampler(args)
  rows = []
  for size in args.sizes:
    row = measure(args, size, sampler)
    rows.append(row)
    print(f"N={size}: {row['aggregate_tasks_per_s']:.3g} tasks/s "
          f"(compile {row['compile_s']:.1f} s)", flush=True)
  base = rows[0]["aggregate_tasks_per_s"] if args.sizes[0] == 1 else None
  for row in rows:
    row["vs_one_member"] = (row["aggregate_tasks_per_s"] / base
                            if base else None)
  print(_harness.markdown_table(
      ["members", "aggregate tasks/s", "vs N=1", "compile s"],
      [[r["members"], r["aggregate_tasks_per_s"], r["vs_one_member"],
        r["compile_s"]] for r in rows]))
  _harness.write_json(args.out, {
      "benchmark": "population",
      "machine": machine,
      "config": {**{k: v for k, v in vars(args).items() if k != "out"},
                 "member_map": member_map},
      "results": rows,
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
