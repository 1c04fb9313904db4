"""Batch-norm modes against each other: what each does to MAML and ProtoNet.

The same meta-training run (same seed, episodes and schedule) once per
``norm`` mode of the Conv-4 (``transductive``, ``running``, ``support``,
``none``), then validation and test accuracy on fixed episodes of Omniglot
5-way 1-shot (15 queries per class). A reduced schedule, so that it runs
on a CPU in minutes: it compares the modes with each other, not with the
papers (benchmarks/README.md has the full-schedule rows).

- MAML: Finn et al.'s strided Conv-4 with ``--features`` filters, one
  inner step of 0.4 in meta-training, three at test, meta-batch
  ``--meta-batch``, Adam 1e-3, Finn split (1100 training characters).
- ProtoNet: max-pool Conv-4 with ``--features`` filters, 20-way 5-query
  training episodes, one per step, Adam 1e-3, Vinyals split.

Validation (``--val-episodes`` from the validation split, key 1) is the
figure to compare modes by; test (``--test-episodes``, key 0) is reported
for the record.

    METALEARN_DATA_DIR=../shared/data python benchmarks/norm_modes.py \\
        --out results/norm_modes_cpu.json
    # --learners maml,protonet --modes transductive,running,support,none
    # --steps 1000 --features 32 --meta-batch 8 --smoke
"""

import argparse
import os
import sys
import time

import _harness
import jax
import optax

from metalearn import metalearners, models, tasks, training

LEARNERS = ("maml", "protonet")
MODES = ("transductive", "running", "support", "none")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--learners", default=",".join(LEARNERS))
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--features", type=int, default=32)
  p.add_argument("--meta-batch", type=int, default=8,
                 help="tasks per MAML meta-step (ProtoNet takes one)")
  p.add_argument("--val-episodes", type=int, default=300)
  p.add_argument("--test-episodes", type=int, default=600)
  p.add_argument("--data-dir", default=os.environ.get("METALEARN_DATA_DIR"))
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", help="JSON results")
  args = p.parse_args(argv)
  args.learners = tuple(args.learners.split(","))
  args.modes = tuple(args.modes.split(","))
  for name, given, known in (("learners", args.learners, LEARNERS),
                             ("modes", args.modes, MODES)):
    if set(given) - set(known):
      p.error(f"--{name}: choose from {known}")
  if args.data_dir is None:
    p.error("--data-dir (or METALEARN_DATA_DIR) is needed")
  if args.smoke:
    args.steps, args.features, args.meta_batch = 2, 4, 2
    args.val_episodes, args.test_episodes = 4, 4
  return args


def build(name: str, norm: str, args):
  """(learner, tasksets, meta-batch) of one row."""
  if name == "maml":
    model = models.conv4(5, features=args.features, downsample="stride",
                         norm=norm)
    learner = metalearners.maml(model, 0.4, 1, eval_num_inner_steps=3)
    sets = tasks.get_tasksets(
        "omniglot", num_ways=5, num_shots=1, num_queries=15,
        train_num_queries=1, split_scheme="finn", data_dir=args.data_dir)
    return learner, sets, args.meta_batch
  model = models.conv4(None, features=args.features, norm=norm)
  sets = tasks.get_tasksets(
      "omniglot", num_ways=5, num_shots=1, num_queries=15,
      train_num_ways=20, train_num_queries=5, split_scheme="vinyals",
      data_dir=args.data_dir)
  return metalearners.protonet(model), sets, 1


def run(name: str, norm: str, args) -> dict:
  learner, sets, batch = build(name, norm, args)
  start = time.perf_counter()
  state, _ = training.meta_train(
      learner, optax.adam(1e-3), sets.train, key=jax.random.key(0),
      num_steps=args.steps, meta_batch_size=batch, progress=False,
      log_every=args.steps)
  train_s = time.perf_counter() - start
  val = training.evaluate(learner, state.meta_params, sets.validation,
                          jax.random.key(1), num_episodes=args.val_episodes)
  test = training.evaluate(learner, state.meta_params, sets.test,
                           jax.random.key(0), num_episodes=args.test_episodes)
  return {
      "learner": name, "norm": norm, "transductive": learner.transductive,
      "train_seconds": train_s,
      "val_accuracy": val["outer/accuracy"],
      "val_ci95": val["outer/accuracy_ci95"],
      "test_accuracy": test["outer/accuracy"],
      "test_ci95": test["outer/accuracy_ci95"],
      "test_loss": test["outer/loss"],
  }


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  rows = []
  for name in args.learners:
    for norm in args.modes:
      rows.append(run(name, norm, args))
      r = rows[-1]
      print(f"{name} {norm}: val {100 * r['val_accuracy']:.2f}, test "
            f"{100 * r['test_accuracy']:.2f} ({r['train_seconds']:.0f} s)",
            flush=True)
  machine = _harness.machine_info()
  print(_harness.markdown_table(
      ["learner", "norm", "transductive", "val accuracy %", "test accuracy %",
       "train (s)"],
      [[r["learner"], r["norm"], r["transductive"],
        f"{100 * r['val_accuracy']:.2f} ± {100 * r['val_ci95']:.2f}",
        f"{100 * r['test_accuracy']:.2f} ± {100 * r['test_ci95']:.2f}",
        f"{r['train_seconds']:.0f}"] for r in rows]))
  config = {k: v for k, v in vars(args).items() if k not in ("out",
                                                             "data_dir")}
  _harness.write_json(args.out, {
      "benchmark": "norm_modes", "config": config, "machine": machine,
      "results": rows,
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
