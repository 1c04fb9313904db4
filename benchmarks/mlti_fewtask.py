"""Task interpolation (MLTI) in a few-task regime: Omniglot with 50 characters.

Meta-trains MAML and ProtoNet, each with and without MLTI, on a restricted
set of Omniglot training characters (vinyals split; by default 50
characters with their 4 rotations as classes, i.e. 200 classes), and tests
on the full vinyals test split (1692 classes with rotations): 5-way 1-shot,
600 test episodes with 15 queries per class, the same episodes for every
method and seed. Reports, per method, the mean test accuracy over seeds,
the per-seed 95% confidence intervals over the 600 episodes, and the
spread over seeds, as JSON and as a markdown table.

The character subset is fixed (``--subset-seed``); each seed changes the
initialisation and the training episodes. MLTI follows the authors' code
by default (every task interpolated, half of them with a class-shuffled
copy of themselves, lambda ~ Beta(2, 2), separate CutMix boxes for support
and query); ``--prob 0.5 --self-mix-prob 0 --shared-box`` is the earlier
variant. MAML mixes hidden features at a random layer, ProtoNet uses CutMix
(``--protonet-mix features`` for manifold mixup). ProtoNet's embedding
keeps running batch-norm statistics (``--protonet-norm``), MAML's
classifier normalises transductively (Finn et al.).

Usage:
  python benchmarks/mlti_fewtask.py --out results/mlti_fewtask.json
  python benchmarks/mlti_fewtask.py --smoke   # a few steps, to check it runs

Cost (XLA:CPU, measured under load on a 2-core VM): CPU seconds per
meta-step of 16 tasks are about 0.37 (MAML), 0.74 (MAML+MLTI: the partner
runs through the network too), 0.53 (ProtoNet) and 0.49 (ProtoNet+MLTI), so
the default run (4 methods x 3 seeds x 3000 steps) needs about 5.3 CPU-hours
(about 2.7 h on 2 idle cores); evaluation adds about 10-20 CPU-s per run.
A one-seed pilot (500 steps of 4 tasks) gave 83.8 / 83.5 % (MAML / +MLTI)
and 90.1 / 90.6 % (ProtoNet / +MLTI), +-0.6-0.8 %: no gain at that budget.
"""

import argparse
import functools
import statistics
import time

import _harness
import jax
import optax

from metalearn import metalearners, models, tasks, training

METHODS = ("maml", "maml+mlti", "protonet", "protonet+mlti")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", default=None, help="default $METALEARN_DATA_DIR")
  p.add_argument("--num-chars", type=int, default=50,
                 help="training characters kept")
  p.add_argument("--no-rotations", action="store_true",
                 help="characters without their rotations as extra classes")
  p.add_argument("--subset-seed", type=int, default=0)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=3000, help="meta-steps per run")
  p.add_argument("--meta-batch", type=int, default=16)
  p.add_argument("--meta-lr", type=float, default=1e-3)
  p.add_argument("--train-queries", type=int, default=5)
  p.add_argument("--episodes", type=int, default=600, help="test episodes")
  p.add_argument("--prob", type=float, default=1.0, help="MLTI mixing prob")
  p.add_argument("--self-mix-prob", type=float, default=0.5,
                 help="MLTI: probability that a task mixes with itself")
  p.add_argument("--shared-box", action="store_true",
                 help="MLTI CutMix: one box for support and query")
  p.add_argument("--protonet-norm", default="running",
                 help="ProtoNet embedding's batch norm (models.NORMS)")
  p.add_argument("--alpha", type=float, default=2.0, help="Beta(a, a)")
  p.add_argument("--protonet-mix", default="cutmix",
                 choices=("cutmix", "features"))
  p.add_argument("--features", type=int, default=64, help="Conv-4 width")
  p.add_argument("--first-order", action="store_true", help="FO-MAML")
  p.add_argument("--smoke", action="store_true", help="tiny run")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  args = p.parse_args(argv)
  args.methods = tuple(args.methods.split(","))
  unknown = set(args.methods) - set(METHODS)
  if unknown:
    p.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
  args.seeds = tuple(int(s) for s in args.seeds.split(","))
  if args.smoke:
    args.steps, args.meta_batch, args.episodes = 2, 2, 10
    args.seeds, args.features = (0,), 8
  return args


def make_learner(method: str, args, sampler):
  """The learner of a method; MLTI variants draw partners from sampler."""
  maml = functools.partial(
      metalearners.maml, inner_lr=0.4, num_inner_steps=1,
      eval_num_inner_steps=3, first_order=args.first_order,
  )
  mlti = functools.partial(metalearners.mlti, sampler=sampler,
                           prob=args.prob, alpha=args.alpha,
                           self_mix_prob=args.self_mix_prob)
  classifier = models.conv4(5, features=args.features, downsample="stride")
  embedding = models.conv4(None, features=args.features,
                           norm=args.protonet_norm)
  if method == "maml":
    return maml(classifier)
  if method == "maml+mlti":
    return mlti(maml, classifier, mix="features")
  if method == "protonet":
    return metalearners.protonet(embedding)
  box = {"shared_box": args.shared_box} if args.protonet_mix == "cutmix" else {}
  return mlti(metalearners.protonet, embedding, mix=args.protonet_mix, **box)


def run_one(method, seed, args, train, test) -> dict:
  learner = make_learner(method, args, train)
  start = time.perf_counter()
  state, _ = training.meta_train(
      learner, optax.adam(args.meta_lr), train, key=jax.random.key(seed),
      num_steps=args.steps, meta_batch_size=args.meta_batch,
      log_every=max(args.steps // 10, 1), progress=False,
  )
  train_s = time.perf_counter() - start
  result = training.evaluate(
      learner, state.meta_params, test, jax.random.key(12345),
      num_episodes=args.episodes,
  )
  row = {
      "method": method, "seed": seed, "train_seconds": round(train_s, 1),
      "accuracy": result["outer/accuracy"],
      "ci95": result["outer/accuracy_ci95"],
  }
  print(row, flush=True)
  return row


def summarize(runs: list[dict]) -> list[list]:
  rows = []
  for method in dict.fromkeys(r["method"] for r in runs):
    mine = [r for r in runs if r["method"] == method]
    accs = [100 * r["accuracy"] for r in mine]
    rows.append([
        method,
        statistics.mean(accs),
        statistics.mean(100 * r["ci95"] for r in mine),
        statistics.stdev(accs) if len(accs) > 1 else None,
        ", ".join(f"{a:.1f}" for a in accs),
    ])
  return rows


def main(argv=None):
  args = parse_args(argv)
  tasksets = tasks.get_tasksets(
      "omniglot", num_ways=5, num_shots=1, num_queries=15,
      train_num_queries=args.train_queries, data_dir=args.data_dir,
      image_size=28, split_scheme="vinyals",
      rotations=not args.no_rotations, train_classes=args.num_chars,
      train_class_group=1 if args.no_rotations else 4,
      train_class_seed=args.subset_seed,
  )
  train, test = tasksets.train, tasksets.test
  few = train.data
  runs = [run_one(m, s, args, train, test)
          for m in args.methods for s in args.seeds]
  table = _harness.markdown_table(
      ["method", "accuracy %", f"95% CI ({args.episodes} ep.)",
       "std over seeds",
       "per seed"],
      summarize(runs),
  )
  setting = (
      f"Omniglot 5-way 1-shot, {args.num_chars} training characters "
      f"({few.num_classes} classes), {args.steps} meta-steps of "
      f"{args.meta_batch} tasks, seeds {list(args.seeds)}, "
      f"{args.episodes} test episodes"
  )
  print(f"\n{setting}\n\n{table}\n")
  _harness.write_json(args.out, {
      "benchmark": "mlti_fewtask", "setting": setting, "config": vars(args),
      "machine": _harness.machine_info(), "results": runs, "markdown": table,
  })
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
