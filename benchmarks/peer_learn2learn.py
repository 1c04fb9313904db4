"""Meta-training speed against learn2learn (PyTorch), measured in one run.

The workload is that of ``throughput.py``: Omniglot 5-way 1-shot, 15 queries
per class, meta-batch 32, Conv-4 with max-pooling and 64 filters, inner
learning rate 0.4, Adam(1e-3) as meta-optimiser. learn2learn runs as its
users run it:

- data: its own Omniglot pipeline, ``l2l.vision.benchmarks.get_tasksets(
  "omniglot", train_ways=5, train_samples=1+15, ...)`` (PNG decoding,
  LANCZOS resize to 28x28, random rotations, fused N-ways K-shots), over
  the same images as metalearn (``shared/data/omniglot/*.npz``, written
  once as torchvision's ``omniglot-py`` PNG folder into ``--cache-dir``);
- MAML family: ``l2l.algorithms.MAML(model, lr=0.4, first_order=...)``,
  ``clone()`` and ``adapt()`` per task, 1 or 5 inner steps, on
  ``l2l.vision.models.CNN4(5, hidden_size=64, channels=1, max_pool=True,
  embedding_size=64)``;
- ProtoNet: ``l2l.vision.models.CNN4Backbone`` as the embedding, class
  means as prototypes, negative squared Euclidean distances as logits.

Each meta-step loops over the tasks, calling ``backward()`` per task, then
scales the gradients by 1 / meta-batch and steps the optimiser (the loop
of learn2learn's ``examples/vision/maml_omniglot.py``). Two figures:

- end-to-end: every task drawn with ``tasksets.train.sample()`` inside the
  timed step (learn2learn's data pipeline included);
- compute-only: one meta-batch drawn beforehand and kept on the device, so
  only the model, the inner loops and the update are timed.

tasks/s = meta-batch / the median duration of ``--repeats`` timed steps
after ``--warmup`` untimed ones. Memory: each side's peak resident set
size (``ru_maxrss``) of its own worker process, imports, data and both
timed modes included. PyTorch runs with ``torch.set_num_threads(
--torch-threads)`` (default: ``--cores``, 2) and both sides are pinned to
the same ``--cores`` CPUs; measure on an idle machine, as OpenMP threads
that wait for a busy core slow PyTorch down several times. With
``--with-metalearn``, each learner's metalearn meta-step is timed by
``throughput.py``'s worker (same settings, ``task_map="auto"``) right
before or after the peer, alternating the order every round, so the ratios
come from one session; the run also measures the XLA float32 matmul peak
and XLA's FLOP count of each learner's task (``throughput.py``'s), so
both sides' tasks/s are also given as a share of that peak. The peer runs
in its own virtualenv, created once with ``--setup`` and never a
dependency of metalearn.

Usage:
  python benchmarks/peer_learn2learn.py --setup /tmp/l2l-venv
  python benchmarks/peer_learn2learn.py --venv /tmp/l2l-venv \\
      --with-metalearn --rounds 3 --out results/peer_learn2learn.json
"""

import argparse
import hashlib
import json
import os
import pathlib
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import _harness

# name -> (table label, inner steps or None for ProtoNet, first order).
LEARNERS = {
    "maml1": ("MAML k=1", 1, False),
    "maml5": ("MAML k=5", 5, False),
    "fomaml1": ("FOMAML k=1", 1, True),
    "fomaml5": ("FOMAML k=5", 5, True),
    "protonet": ("ProtoNet", None, False),
}
MODES = ("end_to_end", "compute_only")
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
L2L_VERSION = "0.2.0"
# What learn2learn imports at run time; gsutil (QuickDraw download) and
# qpth (MetaOptNet) are left out of its install_requires on purpose.
L2L_RUNTIME = ("numpy", "scipy", "requests", "tqdm", "pillow", "gym")
PYX = ("meta_dataset", "task_dataset", "transforms")
INNER_LR, META_LR = 0.4, 1e-3


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setup", metavar="VENV_DIR", default=None,
                 help="create the peer's virtualenv there and exit")
  p.add_argument("--sdist", default=None,
                 help="with --setup: a learn2learn-0.2.0.tar.gz already "
                 "downloaded (else pip downloads it)")
  p.add_argument("--venv", default="/tmp/l2l-venv",
                 help="the peer's virtualenv (made by --setup)")
  p.add_argument("--learners", default=",".join(LEARNERS),
                 help=f"comma-separated subset of {tuple(LEARNERS)}")
  p.add_argument("--batch", type=int, default=32, help="tasks per meta-step")
  p.add_argument("--ways", type=int, default=5)
  p.add_argument("--shots", type=int, default=1)
  p.add_argument("--queries", type=int, default=15)
  p.add_argument("--repeats", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps")
  p.add_argument("--rounds", type=int, default=1,
                 help="alternations of metalearn and the peer; medians")
  p.add_argument("--cores", type=int, default=2,
                 help="CPUs both sides are pinned to")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: --cores)")
  p.add_argument("--device", default="cpu", help="the peer's torch device")
  p.add_argument("--with-metalearn", action="store_true",
                 help="time metalearn (throughput.py's worker) alternately")
  p.add_argument("--data-dir", default=os.environ.get(
      "METALEARN_DATA_DIR", "/work/shared/data"),
                 help="holds omniglot/omniglot_{background,evaluation}.npz")
  p.add_argument("--cache-dir", default=os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
      "metalearn", "l2l-omniglot"),
                 help="where the omniglot-py PNG folder is built once")
  p.add_argument("--smoke", action="store_true",
                 help="batch 2, 1 repeat, 1 warmup, 1 round")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.repeats, args.warmup, args.rounds = 2, 1, 1, 1
  args.learners = tuple(args.learners.split(","))
  unknown = sorted(set(args.learners) - set(LEARNERS))
  if unknown:
    p.error(f"--learners: unknown {unknown}; choose from {tuple(LEARNERS)}")
  for name in ("batch", "ways", "shots", "queries", "repeats", "rounds",
               "cores"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  if args.torch_threads is None:
    args.torch_threads = args.cores
  if args.torch_threads < 1:
    p.error("--torch-threads must be >= 1")
  return args


# ---------------------------------------------------------------- set-up


def _sh(*cmd: str, cwd: str | None = None) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=cwd)


def setup_venv(venv: str, sdist: str | None = None) -> None:
  """Creates the peer's virtualenv: torch, torchvision, learn2learn 0.2.0.

  learn2learn's sdist ships C generated by an old Cython that does not
  build on Python 3.11 (``longintrepr.h``), so the three ``.pyx`` files of
  ``learn2learn/data`` are compiled again with a current Cython first.
  """
  venv = os.path.abspath(venv)
  pip = [os.path.join(venv, "bin", "python"), "-m", "pip"]
  if not os.path.exists(pip[0]):
    _sh(sys.executable, "-m", "venv", venv)
  _sh(*pip, "install", *TORCH_PINS)
  _sh(*pip, "install", "cython>=3", "setuptools", "wheel", *L2L_RUNTIME)
  src = os.path.join(venv, "src")
  os.makedirs(src, exist_ok=True)
  if sdist is None:
    _sh(*pip, "download", "--no-deps", "--no-binary", ":all:",
        "--no-build-isolation", f"learn2learn=={L2L_VERSION}", "-d", src)
  else:
    shutil.copy(sdist, src)
  sdist = os.path.join(src, f"learn2learn-{L2L_VERSION}.tar.gz")
  with tarfile.open(sdist) as tar:
    tar.extractall(src, filter="data")
  tree = os.path.join(src, f"learn2learn-{L2L_VERSION}")
  cython = os.path.join(venv, "bin", "cython")
  for name in PYX:
    pyx = os.path.join(tree, "learn2learn", "data", f"{name}.pyx")
    _sh(cython, "-3", "--directive", "embedsignature=True", "-f", pyx)
  _sh(*pip, "install", "--no-build-isolation", "--no-deps", tree)
  _sh(pip[0], "-c", "import torch, torchvision, learn2learn as l2l; "
      "print('torch', torch.__version__, 'torchvision', "
      "torchvision.__version__, 'learn2learn', l2l.__version__)")


# ------------------------------------------------------------ the images


def omniglot_folder(data_dir: str, cache_dir: str) -> str:
  """torchvision's ``omniglot-py`` PNG folder from the shared ``.npz``.

  Written once (1-bit PNGs, 0 = ink, as the originals) under
  ``cache_dir``; a stamp naming the source files marks it complete.

  Returns:
    The root to pass to ``get_tasksets`` (the folder holding
    ``omniglot-py``).
  """
  import numpy as np
  from PIL import Image

  root = pathlib.Path(cache_dir)
  sources = [pathlib.Path(data_dir, "omniglot", f"omniglot_{s}.npz")
             for s in ("background", "evaluation")]
  stamp_text = json.dumps([[str(s), s.stat().st_size] for s in sources])
  stamp = root / "omniglot-py" / "complete.json"
  if stamp.exists() and stamp.read_text() == stamp_text:
    return str(root)
  start = time.perf_counter()
  for split, source in zip(("background", "evaluation"), sources, strict=True):
    npz = np.load(source)
    images, drawers = npz["images"], npz["drawer"]
    labels, ids = npz["labels"], npz["class_global_id"]
    names = npz["class_names"]
    for i in range(len(images)):
      c = int(labels[i])
      folder = root / "omniglot-py" / f"images_{split}" / str(names[c])
      folder.mkdir(parents=True, exist_ok=True)
      png = folder / f"{int(ids[c]):04d}_{int(drawers[i]):02d}.png"
      Image.fromarray(images[i] > 127).save(png)
  stamp.write_text(stamp_text)
  print(f"wrote {root / 'omniglot-py'} in "
        f"{time.perf_counter() - start:.0f} s", flush=True)
  return str(root)


# ------------------------------------------------- the peer (its venv)


def _offline_torchvision_omniglot() -> None:
  """Stops torchvision's Omniglot from downloading anything.

  learn2learn's ``FullOmniglot`` passes ``download=True``, and torchvision
  then wants the upstream zips; the PNG folder is all it reads.
  """
  from torchvision.datasets import omniglot

  def present(self):
    return os.path.isdir(os.path.join(self.root, self._get_target_folder()))

  omniglot.Omniglot._check_integrity = present
  omniglot.Omniglot.download = lambda self: None


def _split(x, y, ways: int, shots: int):
  """Support (the first ``shots`` of each class) and query of one task."""
  import torch

  order = torch.argsort(y, stable=True)
  per_class = order.view(ways, -1)
  support, query = per_class[:, :shots].reshape(-1), per_class[:, shots:]
  query = query.reshape(-1)
  return x[support], y[support], x[query], y[query]


def _maml_task(maml, task, steps: int):
  import torch.nn.functional as F

  sx, sy, qx, qy = task
  learner = maml.clone()
  for _ in range(steps):
    learner.adapt(F.cross_entropy(learner(sx), sy))
  return F.cross_entropy(learner(qx), qy)


def _proto_task(model, task, ways: int, shots: int):
  import torch
  import torch.nn.functional as F

  sx, sy, qx, qy = task
  embeddings = model(torch.cat([sx, qx]))  # One batch, as l2l's example.
  support, query = embeddings[: len(sx)], embeddings[len(sx):]
  # _split sorts the support by label: rows of a class are consecutive.
  prototypes = support.view(ways, shots, -1).mean(dim=1)
  logits = -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(dim=2)
  return F.cross_entropy(logits, qy)


def _build(name: str, args):
  """``(params module, per-task loss function)`` for a learner name."""
  import learn2learn as l2l

  _, steps, first_order = LEARNERS[name]
  if steps is None:
    model = l2l.vision.models.CNN4Backbone(
        hidden_size=64, channels=1, max_pool=True).to(args.device)
    return model, lambda task: _proto_task(model, task, args.ways,
                                           args.shots)
  model = l2l.vision.models.CNN4(
      args.ways, hidden_size=64, channels=1, max_pool=True,
      embedding_size=64).to(args.device)
  maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
  return maml, lambda task: _maml_task(maml, task, steps)


def _time_mode(name: str, args, next_task) -> dict:
  """Times meta-steps whose tasks come from ``next_task(t)``."""
  import torch

  torch.manual_seed(0)
  module, task_loss = _build(name, args)
  opt = torch.optim.Adam(module.parameters(), lr=META_LR)

  def step():
    opt.zero_grad()
    total = 0.0
    for t in range(args.batch):
      loss = task_loss(next_task(t))
      loss.backward()
      total += loss.item()
    for p in module.parameters():
      p.grad.mul_(1.0 / args.batch)
    opt.step()
    return total / args.batch

  for _ in range(args.warmup):
    step()
  times, cpu_times, loss = [], [], float("nan")
  for _ in range(args.repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    if args.device.startswith("cuda"):
      torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  if loss != loss or abs(loss) == float("inf"):
    raise FloatingPointError(f"{name}: outer loss is {loss}")
  # CPU seconds of the process per step: more than the wall time when
  # threads run in parallel, less when other processes take the cores.
  return {"step_times_s": times, "step_cpu_s": cpu_times,
          "tasks_per_s": args.batch / _harness.median(times),
          "outer_loss": loss}


def run_peer_worker(args) -> dict:
  """Times one learner under learn2learn, end-to-end and compute-only."""
  import learn2learn as l2l
  import torch
  import torchvision

  torch.set_num_threads(args.torch_threads)
  random.seed(0)
  torch.manual_seed(0)
  _offline_torchvision_omniglot()
  root = omniglot_folder(args.data_dir, args.cache_dir)
  start = time.perf_counter()
  tasksets = l2l.vision.benchmarks.get_tasksets(
      "omniglot", train_ways=args.ways,
      train_samples=args.shots + args.queries, test_ways=args.ways,
      test_samples=args.shots + args.queries, root=root)
  tasksets_s = time.perf_counter() - start

  def sample():
    x, y = tasksets.train.sample()
    return _split(x.to(args.device), y.to(args.device), args.ways,
                  args.shots)

  fixed = [sample() for _ in range(args.batch)]
  row = {"learner": args.worker, "tasksets_s": tasksets_s,
         "torch": torch.__version__, "torchvision": torchvision.__version__,
         "learn2learn": l2l.__version__,
         "torch_threads": torch.get_num_threads(), "device": args.device}
  row["end_to_end"] = _time_mode(args.worker, args, lambda t: sample())
  row["compute_only"] = _time_mode(args.worker, args, lambda t: fixed[t])
  row["peak_rss_bytes"] = _harness.max_rss_bytes()
  return row


# ------------------------------------------------------- the orchestrator


def _pin_cores(n: int) -> list[int]:
  """Pins this process (and so its workers) to ``n`` of its CPUs."""
  if not hasattr(os, "sched_setaffinity"):
    return []
  cpus = sorted(os.sched_getaffinity(0))[:n]
  os.sched_setaffinity(0, cpus)
  return cpus


def spawn_peer(args, name: str) -> dict:
  """Runs this script as a ``--worker`` in the peer's venv; reads its JSON."""
  python = os.path.join(args.venv, "bin", "python")
  if not os.path.exists(python):
    raise FileNotFoundError(
        f"--venv: no {python}; create it with --setup {args.venv}")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "worker.json")
    cmd = [python, os.path.abspath(__file__), "--worker", name,
           "--out", out, "--data-dir", args.data_dir,
           "--cache-dir", args.cache_dir, "--device", args.device]
    for flag in ("batch", "ways", "shots", "queries", "repeats", "warmup",
                 "cores", "torch_threads"):
      cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"peer worker {name} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)


def _throughput_args(args):
  import throughput

  return throughput.parse_args([
      "--batch", str(args.batch), "--ways", str(args.ways),
      "--shots", str(args.shots), "--queries", str(args.queries),
      "--repeats", str(args.repeats), "--warmup", str(args.warmup),
  ] + (["--pool-classes", str(2 * args.ways)] if args.smoke else []))


def _metalearn_runner(args):
  """``name -> row`` timing metalearn through ``throughput.py``'s worker."""
  import throughput

  targs = _throughput_args(args)
  return lambda name: throughput.spawn_worker(targs, name, "auto")


def measure_work(args) -> dict:
  """The matmul peak (GFLOP/s) and each learner's GFLOP per task, measured
  by ``throughput.py``'s functions in this (pinned) process."""
  import throughput

  targs = _throughput_args(args)
  size = 256 if args.smoke else targs.matmul_size
  return {
      "matmul_peak_gflops": throughput.matmul_peak_gflops(
          size, args.repeats),
      "gflop_per_task": {n: throughput.flops_per_task(n, targs) / 1e9
                         for n in args.learners},
  }


def measure(args) -> list[dict]:
  """Per learner: every round's rows of both sides, and their medians."""
  metalearn = _metalearn_runner(args) if args.with_metalearn else None
  runs = {n: {"metalearn": [], "peer": []} for n in args.learners}
  for r in range(args.rounds):
    for name in args.learners:
      sides = ["metalearn", "peer"] if metalearn else ["peer"]
      for side in sides if r % 2 == 0 else sides[::-1]:
        print(f"round {r + 1}/{args.rounds}: {name} ({side}) ...",
              flush=True)
        row = metalearn(name) if side == "metalearn" else spawn_peer(
            args, name)
        runs[name][side].append(row)
  rows = []
  for name in args.learners:
    peer, ours = runs[name]["peer"], runs[name]["metalearn"]
    row = {"learner": name, "peer_runs": peer, "metalearn_runs": ours}
    for mode in MODES:
      row[f"l2l_{mode}_tasks_per_s"] = _harness.median(
          [p[mode]["tasks_per_s"] for p in peer])
    row["metalearn_tasks_per_s"] = (
        _harness.median([m["tasks_per_s"] for m in ours]) if ours else None)
    for side, runs_ in (("l2l", peer), ("metalearn", ours)):
      rss = [r["peak_rss_bytes"] for r in runs_ if "peak_rss_bytes" in r]
      row[f"{side}_peak_rss_bytes"] = _harness.median(rss) if rss else None
    rows.append(row)
  return rows


def _ratio(a, b):
  return None if a is None or not b else a / b


def _gb(n):
  return None if n is None else n / 1e9


def _peak_share(tasks_per_s, gflop, peak):
  if tasks_per_s is None or not gflop or not peak:
    return None
  return 100 * tasks_per_s * gflop / peak


def add_peak_shares(rows, work) -> None:
  """Adds each row's GFLOP per task and both sides' % of the matmul peak
  (metalearn's, and learn2learn's compute-only)."""
  for r in rows:
    gflop = work["gflop_per_task"][r["learner"]]
    r["gflop_per_task"] = gflop
    for side, key in (("metalearn", "metalearn_tasks_per_s"),
                      ("l2l_compute_only", "l2l_compute_only_tasks_per_s")):
      r[f"{side}_peak_percent"] = _peak_share(
          r[key], gflop, work["matmul_peak_gflops"])


def report(args, machine, rows, work=None) -> None:
  print(f"\nOmniglot {args.ways}-way {args.shots}-shot, {args.queries} "
        f"queries, meta-batch {args.batch}, Conv-4 (64, max-pool); median "
        f"of {args.repeats} steps, over {args.rounds} round(s); "
        f"{machine['cpu']}, pinned to {len(machine['cpus'])} CPU(s), "
        f"load {machine['load_average_1m']}; learn2learn "
        f"{machine.get('learn2learn')}, torch {machine.get('torch')} "
        f"({args.torch_threads} threads), jax {machine.get('jax', 'n/a')}\n")
  print(_harness.markdown_table(
      ["learner", "metalearn tasks/s", "learn2learn end-to-end tasks/s",
       "learn2learn compute-only tasks/s", "ratio (vs end-to-end)",
       "ratio (vs compute-only)", "metalearn peak RSS (GB)",
       "learn2learn peak RSS (GB)"],
      [[LEARNERS[r["learner"]][0], r["metalearn_tasks_per_s"],
        r["l2l_end_to_end_tasks_per_s"], r["l2l_compute_only_tasks_per_s"],
        _ratio(r["metalearn_tasks_per_s"], r["l2l_end_to_end_tasks_per_s"]),
        _ratio(r["metalearn_tasks_per_s"],
               r["l2l_compute_only_tasks_per_s"]),
        _gb(r["metalearn_peak_rss_bytes"]), _gb(r["l2l_peak_rss_bytes"])]
       for r in rows],
  ))
  if work:
    peak = work["matmul_peak_gflops"]
    print(f"\nShare of the XLA float32 matmul peak of this run "
          f"({peak:.0f} GFLOP/s), with XLA's FLOP count of one task:\n")
    print(_harness.markdown_table(
        ["learner", "GFLOP/task (XLA)", "metalearn % of peak",
         "learn2learn compute-only % of peak"],
        [[LEARNERS[r["learner"]][0], r["gflop_per_task"],
          r["metalearn_peak_percent"], r["l2l_compute_only_peak_percent"]]
         for r in rows],
    ))


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.setup is not None:
    setup_venv(args.setup, args.sdist)
    return 0
  if args.worker is not None:
    _harness.write_json(args.out, run_peer_worker(args))
    return 0
  cpus = _pin_cores(args.cores)
  machine = {"cpu": _harness.cpu_model(), "cpu_count": os.cpu_count(),
             "cpus": cpus, "python": platform.python_version(),
             "load_average_1m": round(os.getloadavg()[0], 2)}
  if args.with_metalearn:
    machine.update(_harness.machine_info(), cpus=cpus)
  work = measure_work(args) if args.with_metalearn else None
  rows = measure(args)
  if work:
    machine["matmul_peak_gflops"] = work["matmul_peak_gflops"]
    add_peak_shares(rows, work)
  first = rows[0]["peer_runs"][0]
  machine.update({k: first[k] for k in ("torch", "torchvision",
                                        "learn2learn")})
  report(args, machine, rows, work)
  config = {k: v for k, v in vars(args).items()
            if k not in ("out", "worker", "setup", "sdist")}
  config["sdist_sha256"] = _sdist_sha256(args.venv)
  _harness.write_json(args.out, {
      "benchmark": "peer_learn2learn", "machine": machine, "config": config,
      "results": rows,
  })
  return 0


def _sdist_sha256(venv: str) -> str | None:
  path = os.path.join(venv, "src", f"learn2learn-{L2L_VERSION}.tar.gz")
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


if __name__ == "__main__":
  sys.exit(main())
