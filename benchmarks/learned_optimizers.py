"""A meta-trained learned optimiser against tuned Adam and SGD.

The task family: train a fresh ReLU MLP (40-40, Finn et al.'s sinusoid
network) on one sinusoid regression task (50 training points, minibatches
of 10) for 200 steps; its 50 query points are the held-out data. The
learned optimiser (``mlp_optimizer``, a per-parameter MLP over momentum and
second-moment features) is meta-trained on this family with persistent
evolution strategies (PES), with truncated backprop (TBPTT) and with
bootstrapped meta-gradients (BMG), truncations of 20 steps over the
200-step horizon, on the mean log training loss. BMG matches TBPTT's
inner steps per outer step, 8 particles x 20 = 160: its target is one
gradient step (lr 0.1 on the log loss) from the end of the truncation
(Flennerhag et al.'s L = 1), so it adds only 8 gradient evaluations.
Targets bootstrapped with the optimiser's own steps (``bmg_steps`` > 0)
diverged here. Adam
and SGD get the learning rate from a grid that gives the lowest final
training loss on training tasks. Everything is then run on the same
held-out tasks (fresh draws from the family, never seen in meta-training
or tuning), for several seeds: each seed meta-trains its own learned
optimiser and draws its own held-out tasks.

    python benchmarks/learned_optimizers.py --out results/lopt.json \
        --plot results/lopt.png
    # --smoke: a tiny run that only checks the script works

Losses are geometric means over tasks (``exp(mean log MSE)``), since
sinusoid amplitudes, hence losses, vary 2500-fold across tasks.
"""

import argparse
import sys
import time

import _harness
import jax
import numpy as np
import optax

from metalearn import learned_optimizers as lo
from metalearn import models, tasks

FULL = dict(
    hidden=(40, 40), num_shots=50, num_queries=50, batch_size=10,
    horizon=200, truncation=20, outer_steps=1200, steps_per_call=20,
    pes_pairs=16, tbptt_particles=8, sigma=0.01, meta_lr=1e-3,
    bmg_particles=8, bmg_steps=0, bmg_target_lr=0.1,
    step_mult=1e-2, adam_exp_mult=1.0, seeds=3, eval_tasks=100,
    tune_tasks=64, ood_horizon_mult=2, ood_hidden=(80, 80),
    lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
)
SMOKE = dict(
    FULL, hidden=(8,), num_shots=6, num_queries=4, batch_size=3, horizon=4,
    truncation=2, outer_steps=2, steps_per_call=1, pes_pairs=2,
    tbptt_particles=2, bmg_particles=2, bmg_steps=1, seeds=2, eval_tasks=4,
    tune_tasks=4, lrs=(1e-2, 1e-1), ood_hidden=(16,),
)
ESTIMATORS = lo.ESTIMATORS


def build(cfg, adam_lr=None, hidden=None):
  """The task family and the learned optimiser (with ``adam_lr``: the
  residual form that starts as Adam with that learning rate; ``hidden``:
  another network than ``cfg["hidden"]``)."""
  sinusoid = tasks.get_tasksets(
      "sinusoid", num_ways=None, num_shots=cfg["num_shots"],
      num_queries=cfg["num_queries"],
  )
  family = lo.model_task_family(
      models.mlp(hidden=hidden or cfg["hidden"]), sinusoid.train,
      batch_size=cfg["batch_size"],
  )
  if adam_lr is None:
    return family, lo.mlp_optimizer(step_mult=cfg["step_mult"])
  return family, lo.mlp_optimizer(step_mult=cfg["step_mult"],
                                  adam_lr=adam_lr,
                                  exp_mult=cfg["adam_exp_mult"])


def make_trainer(cfg, family, lopt, estimator_name):
  """``train(seed) -> (theta, history, seconds)``; compiles once."""
  unroll = lo.truncated_unroll(
      family, lopt, truncation_length=cfg["truncation"],
      horizon=cfg["horizon"], log_loss=True,
  )
  estimator = lo.make_estimator(
      estimator_name, unroll, pes_pairs=cfg["pes_pairs"], sigma=cfg["sigma"],
      tbptt_particles=cfg["tbptt_particles"],
      bmg_particles=cfg["bmg_particles"], bmg_steps=cfg["bmg_steps"],
      bmg_target_lr=cfg["bmg_target_lr"])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg["meta_lr"]))
  step = lo.make_outer_step(estimator, tx,
                            steps_per_call=cfg["steps_per_call"])

  def train(seed):
    start = time.perf_counter()
    key = jax.random.key(1000 + seed)
    state = lo.init_outer_state(lopt, estimator, tx, key)
    state, history = lo.outer_train(step, state, key=key,
                                    num_steps=cfg["outer_steps"])
    return state.theta, history, time.perf_counter() - start

  return train


def tune(cfg, curves, family):
  """The learning rate of Adam and SGD with the lowest final training
  loss on training tasks."""
  keys = jax.random.split(jax.random.key(1), cfg["tune_tasks"])
  return lo.tune_learning_rates(curves, family, keys, cfg["lrs"])


def evaluate(cfg, curves, family, runs_per_seed):
  """Runs each optimiser, ``name: (kind, hyper)``, on each seed's held-out
  tasks (of ``family``, as long as ``curves`` runs)."""
  results = {}
  for seed, runs in enumerate(runs_per_seed):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(2), seed),
                            cfg["eval_tasks"])
    for name, summary in lo.compare(curves, runs, family, keys).items():
      results.setdefault(name, []).append(summary)
  return results


def aggregate(per_seed):
  out = {}
  for metric in ("final_train", "final_held_out", "mean_train"):
    values = np.array([r[metric] for r in per_seed])
    out[metric] = {"mean": float(values.mean()), "std": float(values.std()),
                   "per_seed": values.tolist()}
  return out


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, curve in zip(axes, ("curve_train", "curve_held_out"), strict=True):
    for name, runs in results.items():
      logs = np.log(np.array([r[curve] for r in runs]))
      mean, std = logs.mean(0), logs.std(0)
      steps = np.arange(len(mean))
      ax.plot(steps, np.exp(mean), label=name)
      ax.fill_between(steps, np.exp(mean - std), np.exp(mean + std),
                      alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_title(curve.removeprefix("curve_").replace("_", "-") + " loss")
  axes[0].set_ylabel("geometric-mean MSE over held-out tasks")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def markdown(cfg, agg, tuned, machine, seconds, cpu_seconds):
  residual = " (Adam residual, from the tuned Adam)" * cfg["adam_residual"]
  rows = []
  for name, a in agg.items():
    rows.append([name, *(f"{a[m]['mean']:.3g} ± {a[m]['std']:.2g}"
                         for m in ("final_train", "final_held_out",
                                   "mean_train"))])
  table = _harness.markdown_table(
      ["optimiser", "final train MSE", "final held-out MSE",
       "mean train MSE over the run"], rows)
  best = min(("adam", "sgd"), key=lambda n: agg[n]["final_held_out"]["mean"])
  lines = []
  for est in (n for n in agg if n.startswith("learned")):
    a, b = agg[est]["final_held_out"], agg[best]["final_held_out"]
    verdict = "wins" if a["mean"] < b["mean"] else "does not win"
    clear = abs(a["mean"] - b["mean"]) > a["std"] + b["std"]
    lines.append(f"- **{est} {verdict}** against {best} on the final "
                 f"held-out loss ({a['mean']:.3g} vs {b['mean']:.3g}; the "
                 f"gap is {'larger' if clear else 'not larger'} than the "
                 f"sum of the spreads over seeds).")
  return "\n".join([
      f"Sinusoid MLP {cfg['hidden']}, {cfg['horizon']} inner steps, "
      f"{cfg['seeds']} seeds x {cfg['eval_tasks']} held-out tasks (mean ± "
      f"std over seeds of geometric means over tasks). Adam lr "
      f"{tuned['adam']:g}, SGD lr {tuned['sgd']:g} (tuned on training "
      f"tasks). Learned: mlp_optimizer{residual} meta-trained for "
      f"{cfg['outer_steps']} outer steps per seed (PES: "
      f"{cfg['pes_pairs']} antithetic pairs; TBPTT: "
      f"{cfg['tbptt_particles']} particles; BMG: "
      f"{cfg['bmg_particles']} particles, targets {cfg['bmg_steps']} steps "
      f"on, target lr {cfg['bmg_target_lr']}; truncations of "
      f"{cfg['truncation']} steps). {machine['cpu']}, "
      f"{machine['cpu_count']} cores, jax {machine['jax']}; "
      f"{seconds / 60:.1f} min wall, {cpu_seconds / 60:.1f} min CPU "
      f"(load average {machine['load_average_1m']}).", "",
      table, "", *lines])


def ood_markdown(cfg, ood_agg):
  """The final held-out losses out of distribution, one column per
  shift."""
  shifts = list(ood_agg)
  names = list(ood_agg[shifts[0]])
  rows = [[name, *(f"{ood_agg[s][name]['final_held_out']['mean']:.3g} ± "
                   f"{ood_agg[s][name]['final_held_out']['std']:.2g}"
                   for s in shifts)] for name in names]
  return "\n".join([
      f"Out of distribution (final held-out MSE; learning rates and "
      f"learned optimisers as tuned and meta-trained): "
      f"{cfg['ood_horizon_mult']}x the horizon "
      f"({cfg['ood_horizon_mult'] * cfg['horizon']} steps), and MLP "
      f"{tuple(cfg['ood_hidden'])} at the training horizon.", "",
      _harness.markdown_table(
          ["optimiser", f"{cfg['ood_horizon_mult']}x horizon",
           f"MLP {tuple(cfg['ood_hidden'])}"], rows)])


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS),
                      choices=ESTIMATORS)
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--outer-steps", type=int)
  parser.add_argument("--pes-pairs", type=int,
                      help="PES's antithetic pairs (4 matches TBPTT's 160 "
                           "inner steps per outer step)")
  parser.add_argument("--bmg-target-lr", type=float,
                      help="BMG's final gradient step on the target")
  parser.add_argument("--adam-residual", action="store_true",
                      help="meta-train mlp_optimizer's residual form, "
                           "started at Adam with the tuned learning rate")
  parser.add_argument("--out", help="JSON results")
  parser.add_argument("--plot", help="PNG of the loss curves")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = dict(SMOKE if args.smoke else FULL, smoke=args.smoke,
             estimators=args.estimators, adam_residual=args.adam_residual)
  for field in ("seeds", "outer_steps", "pes_pairs", "bmg_target_lr"):
    if getattr(args, field) is not None:
      cfg[field] = getattr(args, field)
  start, cpu_start = time.perf_counter(), time.process_time()
  family, lopt = build(cfg)
  curves = lo.loss_curves(lopt, num_steps=cfg["horizon"])
  tuned, tuning = tune(cfg, curves, family)
  label = ""
  if cfg["adam_residual"]:
    family, lopt = build(cfg, adam_lr=tuned["adam"])
    curves = lo.loss_curves(lopt, num_steps=cfg["horizon"])
    label = ", Adam residual"
  trainers = {est: make_trainer(cfg, family, lopt, est)
              for est in cfg["estimators"]}
  runs_per_seed, training = [], {}
  for seed in range(cfg["seeds"]):
    runs = {name: (name, lr) for name, lr in tuned.items()}
    for est, train in trainers.items():
      theta, history, secs = train(seed)
      runs[f"learned ({est}{label})"] = ("learned", theta)
      training.setdefault(est, []).append({"seconds": secs,
                                           "history": history})
      print(f"seed {seed} {est}: meta-trained in {secs:.0f}s, last meta-loss "
            f"{history[-1]['meta_loss']:.3f}", flush=True)
    runs_per_seed.append(runs)
  results = evaluate(cfg, curves, family, runs_per_seed)
  agg = {name: aggregate(runs) for name, runs in results.items()}
  # Out of distribution, every optimiser as it was tuned or meta-trained:
  # twice the horizon, and a wider network.
  long_curves = lo.loss_curves(
      lopt, num_steps=cfg["ood_horizon_mult"] * cfg["horizon"])
  wide_family, _ = build(cfg, hidden=cfg["ood_hidden"])
  ood = {
      "longer_horizon": evaluate(cfg, long_curves, family, runs_per_seed),
      "wider_network": evaluate(cfg, curves, wide_family, runs_per_seed),
  }
  ood_agg = {shift: {name: aggregate(runs) for name, runs in res.items()}
             for shift, res in ood.items()}
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start
  machine = _harness.machine_info()
  print(markdown(cfg, agg, tuned, machine, seconds, cpu_seconds))
  print(ood_markdown(cfg, ood_agg))
  if args.plot:
    plot(results, args.plot)
  _harness.write_json(args.out, {
      "benchmark": "learned_optimizers", "config": cfg, "machine": machine,
      "tuned_lr": tuned, "tuning_final_train": tuning, "summary": agg,
      "per_seed": results, "out_of_distribution": ood_agg,
      "meta_training": training, "seconds": seconds,
      "cpu_seconds": cpu_seconds,
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
