"""Memory and speed of second-order MAML against its inner steps, without
rematerialisation and with each kind (``learner.remat``: true, nested).

The workload: Omniglot-shaped 5-way 1-shot tasks (15 queries per class,
random ``uint8`` images of Omniglot's shape, so no data is needed), Finn et
al.'s strided Conv-4, second-order MAML with ``num_inner_steps`` of 1, 5,
10, 20 and 50, meta-batch 4, the meta-step as ``metalearn-train`` compiles
it (``training.make_meta_step``, ``task_map="auto"``). For each setting:
the temporary memory XLA allocates for the compiled step (its memory
analysis; on GPU also the allocator's peak), the compile time and the
tasks/s of the running step. Memory is compared with the 1-step program
and time with the same program without remat, each within this run.

    python benchmarks/remat.py --out benchmarks/results/remat_cpu.json
    python benchmarks/remat.py --isolate --out benchmarks/results/remat_gpu.json
    # --smoke: a tiny run that only checks the script works
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import _harness
import jax
import numpy as np
import optax

from metalearn import metalearners, models, tasks, training
from metalearn.types import ClassPool

FULL = dict(steps=(1, 5, 10, 20, 50), batch=4, features=64, ways=5,
            shots=1, queries=15, repeats=3, warmup=1, pool_classes=100)
SMOKE = dict(FULL, steps=(1, 3), batch=2, features=4, queries=2, repeats=1,
             warmup=0, pool_classes=10)


def synthetic_sampler(cfg) -> tasks.TaskSampler:
  """Episodes over random ``uint8`` images of Omniglot's 28x28 shape."""
  shape = (cfg["pool_classes"], 20, 28, 28, 1)
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  pool = ClassPool(jax.device_put(images),
                   jax.device_put(np.arange(shape[0], dtype=np.int32)))
  return tasks.episode_sampler(pool, num_ways=cfg["ways"],
                               num_shots=cfg["shots"],
                               num_queries=cfg["queries"])


def _device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure(cfg, steps: int, remat: bool | str) -> dict:
  """Compiles and times one meta-step of MAML with ``steps`` inner steps."""
  sampler = synthetic_sampler(cfg)
  model = models.conv4(cfg["ways"], features=cfg["features"],
                       downsample="stride")
  learner = metalearners.maml(model, 0.4, steps, remat=remat)
  tx = optax.adam(1e-3)
  key = jax.random.key(0)
  state = training.init_state(learner, tx, sampler, key)
  step = training.make_meta_step(learner, tx, sampler,
                                 meta_batch_size=cfg["batch"])
  compiled, compile_s, times, metrics = _harness.compile_and_time(
      step, state, sampler.data, key, warmup=cfg["warmup"],
      repeats=cfg["repeats"])
  memory = compiled.memory_analysis()
  loss = float(metrics["outer/loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{steps} steps, remat={remat}: loss {loss}")
  return {
      "inner_steps": steps, "remat": remat,
      "temp_bytes": int(memory.temp_size_in_bytes),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "device_peak_bytes": _device_peak_bytes(),
      "compile_s": compile_s,
      "tasks_per_s": cfg["batch"] / _harness.median(times),
  }


def add_ratios(rows: list[dict]) -> None:
  """Memory against the 1-step program of the same kind, and time against
  the same step count without remat (all within this run)."""
  by = {(r["inner_steps"], r["remat"]): r for r in rows}
  first = min(r["inner_steps"] for r in rows)
  for r in rows:
    base = by[(first, r["remat"])]
    r["temp_vs_fewest_steps"] = r["temp_bytes"] / base["temp_bytes"]
    plain = by.get((r["inner_steps"], False))
    r["slowdown_vs_no_remat"] = (plain["tasks_per_s"] / r["tasks_per_s"]
                                 if plain else None)


def markdown(rows, machine) -> str:
  peaks = any(r.get("device_peak_bytes") for r in rows)
  header = ["inner steps", "remat", "temp memory (MiB)", "vs fewest steps"]
  header += ["device peak (MiB)"] if peaks else []
  header += ["tasks/s", "time vs no remat", "compile (s)"]
  body = []
  for r in rows:
    line = [r["inner_steps"], r["remat"], f"{r['temp_bytes'] / 2**20:.1f}",
            f"{r['temp_vs_fewest_steps']:.2f}"]
    if peaks:
      line.append(f"{(r.get('device_peak_bytes') or 0) / 2**20:.1f}")
    line += [f"{r['tasks_per_s']:.3g}",
             "" if r["slowdown_vs_no_remat"] is None
             else f"{r['slowdown_vs_no_remat']:.2f}",
             f"{r['compile_s']:.1f}"]
    body.append(line)
  table = _harness.markdown_table(header, body)
  return (f"{machine['cpu']}, {machine['cpu_count']} cores, "
          f"{jax.default_backend()}, jax {machine['jax']}\n\n{table}")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--steps", type=int, nargs="+",
                      help="inner-step counts (default 1 5 10 20 50)")
  parser.add_argument("--batch", type=int,
                      help="tasks per meta-step (default 4)")
  parser.add_argument("--isolate", action="store_true",
                      help="measure each setting in a fresh process, so "
                           "that device_peak_bytes (the allocator's "
                           "high-water mark, which never falls) is that "
                           "setting's own; use it on accelerators")
  parser.add_argument("--one", nargs=2, metavar=("STEPS", "REMAT"),
                      help=argparse.SUPPRESS)  # An --isolate child.
  parser.add_argument("--out", help="JSON results")
  return parser.parse_args(argv)


def _remat_value(text: str) -> bool | str:
  return {"False": False, "True": True}.get(text, text)


def measure_in_child(args, steps: int, remat: bool | str) -> dict:
  """:func:`measure` in a fresh process of this script (``--one``)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(steps),
           str(remat), "--out", out]
    if args.smoke:
      cmd.append("--smoke")
    if args.batch:
      cmd += ["--batch", str(args.batch)]
    subprocess.run(cmd, check=True)
    with open(out) as f:
      return json.load(f)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = dict(SMOKE if args.smoke else FULL, smoke=args.smoke)
  if args.steps:
    cfg["steps"] = tuple(args.steps)
  if args.batch:
    cfg["batch"] = args.batch
  cfg["isolated"] = args.isolate
  if args.one:
    row = measure(cfg, int(args.one[0]), _remat_value(args.one[1]))
    with open(args.out, "w") as f:
      json.dump(row, f)
    return 0
  rows = []
  for steps in cfg["steps"]:
    for remat in (False, True, "nested"):
      rows.append(measure_in_child(args, steps, remat) if args.isolate
                  else measure(cfg, steps, remat))
      print(f"{steps} steps, remat={remat}: "
            f"{rows[-1]['temp_bytes'] / 2**20:.1f} MiB, "
            f"{rows[-1]['tasks_per_s']:.3g} tasks/s", flush=True)
  add_ratios(rows)
  machine = _harness.machine_info()
  print(markdown(rows, machine))
  _harness.write_json(args.out, {
      "benchmark": "remat", "config": cfg, "machine": machine,
      "backend": jax.default_backend(), "results": rows,
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
