"""Reproduces benchmark rows: train, test, accuracy curves, table and plot.

For each experiment named by ``--rows`` (a file of ``configs/experiment/``)
the script

1. runs ``python -m metalearn.train experiment=<row> logger=none`` in
   ``<out>/<row>`` with checkpoints every ``--checkpoint-every`` meta-steps
   (all kept) and ``trainer.max_time_s=--max-time-s`` (the run stops at the
   first log step after that many seconds, then tests what it has; the
   table says so). A row whose ``results.json`` exists is not run again,
   unless its run was stopped by the time limit and ``--continue-stopped``
   is given: then it resumes from its last checkpoint for another
   ``--max-time-s`` (a resumed run ends as an uninterrupted one would);
2. evaluates ``--curve-points`` of its checkpoints, evenly spaced, on the
   run's fixed test episodes (:func:`metalearn.experiment.evaluate_run`),
   for the curves of test accuracy against meta-steps and wall time;
3. writes ``<out>/summary.json`` (everything, per-step metrics included),
   ``<out>/table.md`` (paper number beside ours, with the 95% interval over
   the test episodes, seed, steps, wall time and machine) and
   ``<out>/curves.png`` (``curves_mse.png`` for regression rows).

Rows that only re-test another row's model: Snell et al. train one
ProtoNet per shot count (60-way episodes) and test it on 5-way and 20-way
episodes. ``omniglot_20w1s_protonet`` trains exactly as
``omniglot_5w1s_protonet`` (same config but the test episodes), so when
both are asked for, the 20-way row tests the 5-way row's checkpoints.

``--test-task FIELD=VALUE`` tests every row (its final checkpoint and the
curve points) on episodes of another shape without retraining, e.g.
``--test-task num_queries=1`` for Nichol et al.'s one query per class; the
table names the change beside the row.

Usage (see benchmarks/README.md, section 5):
  METALEARN_DATA_DIR=../shared/data python benchmarks/reproduce.py \\
      --rows omniglot_5w1s_protonet,omniglot_20w1s_protonet \\
      --max-time-s 6000 --out results/reproduce
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import _harness

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiment"
# row -> (the row whose training run it shares, task fields of its test).
SHARED_TRAINING = {
    "omniglot_20w1s_protonet": ("omniglot_5w1s_protonet", {"num_ways": 20}),
    "omniglot_20w5s_protonet": ("omniglot_5w5s_protonet", {"num_ways": 20}),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", required=True,
                 help="comma-separated experiment names (configs/experiment)")
  p.add_argument("--out", default="results/reproduce",
                 help="directory of the runs, summary, table and plot")
  p.add_argument("--max-time-s", type=float, default=None,
                 help="training time limit per run (trainer.max_time_s)")
  p.add_argument("--checkpoint-every", type=int, default=None,
                 help="meta-steps between checkpoints (default: the "
                      "experiment's); must be a multiple of log_every")
  p.add_argument("--curve-points", type=int, default=8,
                 help="checkpoints tested for the curves (evenly spaced; "
                      "the last is always one)")
  p.add_argument("--curve-episodes", type=int, default=600,
                 help="test episodes per curve point")
  p.add_argument("--test-task", action="append", default=[],
                 metavar="FIELD=VALUE",
                 help="test every row on episodes with this task field "
                      "changed (repeatable), e.g. --test-task num_queries=1 "
                      "for a paper's test shape; training is unchanged")
  p.add_argument("--override", action="append", default=[],
                 help="extra hydra override for every run (repeatable), "
                      "e.g. --override trainer.steps_per_call=10")
  p.add_argument("--continue-stopped", action="store_true",
                 help="resume rows whose run the time limit stopped, for "
                      "another --max-time-s")
  p.add_argument("--smoke", action="store_true",
                 help="debug=smoke runs of a few steps, for CI")
  args = p.parse_args(argv)
  args.rows = tuple(r for r in args.rows.split(",") if r)
  unknown = [r for r in args.rows if not (EXPERIMENTS / f"{r}.yaml").exists()]
  if unknown:
    p.error(f"--rows: no configs/experiment/<row>.yaml for {unknown}")
  if args.max_time_s is not None and args.max_time_s <= 0:
    p.error("--max-time-s must be > 0")
  if args.curve_points < 1 or args.curve_episodes < 1:
    p.error("--curve-points and --curve-episodes must be >= 1")
  test_task = {}
  for item in args.test_task:
    field, sep, value = item.partition("=")
    if not (sep and field and value):
      p.error(f"--test-task: expected FIELD=VALUE, got {item!r}")
    try:
      test_task[field] = json.loads(value)
    except json.JSONDecodeError:
      test_task[field] = value  # A string, such as a split name.
  args.test_task = test_task
  return args


def paper_number(row: str) -> str:
  """The ``# Paper:`` line of the experiment's header."""
  text = (EXPERIMENTS / f"{row}.yaml").read_text()
  match = re.search(r"^# Paper:\s*(.+)$", text, re.MULTILINE)
  return match.group(1).strip() if match else "n/a"


def train(row: str, run_dir: pathlib.Path, args) -> None:
  results = run_dir / "results.json"
  if results.exists():
    stopped = json.loads(results.read_text()).get("stopped_by_time_limit")
    if not (stopped and args.continue_stopped):
      print(f"{row}: results.json exists, not run again", flush=True)
      return
    print(f"{row}: continuing the run the time limit stopped", flush=True)
  cmd = [sys.executable, "-m", "metalearn.train", f"experiment={row}",
         "logger=none", f"hydra.run.dir={run_dir}", "trainer.progress=false",
         "trainer.max_to_keep=1000"]
  if (run_dir / "checkpoints").exists():
    cmd.append("trainer.resume=true")
  if args.max_time_s is not None:
    cmd.append(f"trainer.max_time_s={args.max_time_s}")
  if args.checkpoint_every is not None:
    cmd.append(f"trainer.checkpoint_every={args.checkpoint_every}")
  if args.smoke:
    cmd += ["debug=smoke", "trainer.test_episodes=4"]
  cmd += args.override
  print(" ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True)


def spaced(steps: list[int], count: int) -> list[int]:
  """``count`` of ``steps``, evenly spaced, the last included."""
  if len(steps) <= count:
    return steps
  picks = [round(i * (len(steps) - 1) / (count - 1)) for i in range(count)] \
      if count > 1 else [len(steps) - 1]
  return [steps[i] for i in sorted(set(picks))]


def measure_row(row: str, args, out: pathlib.Path,
                trained: set[str]) -> dict:
  """Trains ``row``'s run (once per invocation, ``trained`` records it) and
  evaluates its checkpoints."""
  from metalearn import experiment

  source, task = SHARED_TRAINING.get(row, (row, None))
  if source not in args.rows:
    source, task = row, None
  task = {**(task or {}), **args.test_task} or None
  run_dir = out / source
  if source not in trained:
    # Rows sharing a run train it once: a second --continue-stopped call in
    # the same invocation would extend a run the time limit stopped again.
    train(source, run_dir, args)
    trained.add(source)
  results = json.loads((run_dir / "results.json").read_text())
  episodes = 4 if args.smoke else args.curve_episodes
  steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                 if p.name.isdigit())
  curve = experiment.evaluate_run(
      run_dir, steps=spaced(steps, args.curve_points), task=task,
      num_episodes=episodes, progress=True)
  if task:  # The final checkpoint on this row's test episodes.
    final = curve[-1]  # spaced() keeps the last checkpoint: the final step.
    assert final["step"] == results["steps"], (final["step"], results)
    results = {**{k: v for k, v in results.items()
                  if not k.startswith("test/")},
               **{k: v for k, v in final.items() if k.startswith("test/")}}
  config = json.loads((run_dir / "config.json").read_text())
  return {
      "row": row, "trained_in": source, "test_task_override": task,
      "test_task": args.test_task,
      "paper": paper_number(row), "results": results, "curve": curve,
      "metrics": experiment.read_metrics(run_dir),
      "config": config,
  }


def train_wall_s(row: dict) -> float:
  """Training wall time of a row's run, over all its resumed processes.

  ``results.json`` times the last process only; ``metrics.jsonl``'s
  ``wall_s`` carries on across resumes.
  """
  walls = [m["wall_s"] for m in row["metrics"] if m.get("wall_s") is not None]
  return max([row["results"]["train_seconds"], *walls])


def paper_value(paper: str, num_shots: int | None) -> float | None:
  """The paper's figure for a row's shot count, for the dashed line.

  ``"98.8% (...)"`` gives 98.8; ``"MSE a / b / c for K = 5 / 10 / 20"``
  gives the figure under ``num_shots``.
  """
  numbers = re.findall(r"(\d+(?:\.\d+)?)(?:\s*±\s*\d+(?:\.\d+)?)?",
                       paper.split("(")[0].split(" for K")[0])
  shots = re.search(r"for K = ([\d /]+)", paper)
  if shots and num_shots is not None:
    ks = [int(k) for k in shots.group(1).split("/")]
    if num_shots in ks and len(numbers) == len(ks):
      return float(numbers[ks.index(num_shots)])
    return None
  return float(numbers[0]) if numbers else None


def row_label(row: dict) -> str:
  """The row's name, with the test's shape when --test-task changed it."""
  if not row.get("test_task"):
    return row["row"]
  return row["row"] + " (test: " + ", ".join(
      f"{k}={v}" for k, v in row["test_task"].items()) + ")"


def table(rows: list[dict], machine: dict) -> str:
  cells = []
  for r in rows:
    res = r["results"]
    acc, ci = res.get("test/outer/accuracy"), res.get(
        "test/outer/accuracy_ci95")
    if acc is not None:
      ours = f"{100 * acc:.2f} ± {100 * ci:.2f}"
    else:  # Regression rows: the test loss (MSE).
      ours = (f"MSE {res['test/outer/loss']:.3f} ± "
              f"{res['test/outer/loss_ci95']:.3f}")
    steps = f"{res['steps']} of {res['num_steps']}"
    if res.get("stopped_by_time_limit"):
      steps += " (time limit)"
    cells.append([row_label(r), r["paper"], ours, res["seed"], steps,
                  f"{train_wall_s(r) / 60:.1f}",
                  res.get("test/num_episodes")])
  return "\n".join([
      _harness.markdown_table(
          ["row", "paper", "ours: test accuracy % or MSE (± 95% CI)", "seed",
           "meta-steps", "train wall (min)", "test episodes"], cells),
      "",
      f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), device "
      f"{machine['device']}, backend "
      f"{machine['backend']}, jax {machine['jax']}.",
  ])


def plot(rows: list[dict], path: pathlib.Path, metric: str,
         ylabel: str, scale: float = 1.0) -> None:
  """Test ``metric`` against meta-steps and wall time, paper dashed.

  Writes nothing when no row has the metric.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in rows if any(metric in c for c in r["curve"])]
  if not rows:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for r in rows:
    pts = [c for c in r["curve"] if metric in c]
    val = [scale * c[metric] for c in pts]
    ci = [scale * c[f"{metric}_ci95"] for c in pts]
    shots = (r["test_task_override"] or {}).get(
        "num_shots", r["config"]["task"].get("num_shots"))
    paper = paper_value(r["paper"], shots)
    for ax, xs in ((axes[0], [c["step"] for c in pts]),
                   (axes[1], [(c["wall_s"] or float("nan")) / 60
                              for c in pts])):
      line, = ax.plot(xs, val, marker="o", label=row_label(r))
      ax.fill_between(xs, [a - c for a, c in zip(val, ci, strict=True)],
                      [a + c for a, c in zip(val, ci, strict=True)],
                      alpha=0.2, color=line.get_color())
      if paper is not None:  # The paper's number, in the row's colour.
        ax.axhline(paper, ls="--", lw=1, color=line.get_color())
  axes[0].set_xlabel("meta-steps")
  axes[1].set_xlabel("wall time of training (min)")
  axes[0].set_ylabel(f"{ylabel} (95% CI); dashed: paper")
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  os.environ.setdefault("WANDB_MODE", "disabled")
  start = time.perf_counter()
  trained: set[str] = set()
  rows = [measure_row(row, args, out, trained) for row in args.rows]
  machine = _harness.machine_info()
  text = table(rows, machine)
  print("\n" + text)
  (out / "table.md").write_text(text + "\n")
  plot(rows, out / "curves.png", "test/outer/accuracy", "test accuracy %",
       scale=100)
  regression = [r for r in rows if "test/outer/accuracy" not in r["results"]]
  plot(regression, out / "curves_mse.png", "test/outer/loss", "test MSE")
  _harness.write_json(str(out / "summary.json"), {
      "benchmark": "reproduce", "machine": machine, "rows": rows,
      "args": {k: v for k, v in vars(args).items()},
      "seconds": time.perf_counter() - start,
  })
  print(f"wrote {out}/table.md, summary.json and the curves")
  return 0


if __name__ == "__main__":
  sys.exit(main())
