"""Episode sampling: jitted on-device ``tasks.sample_batch`` vs a host loop.

Both samplers draw ``--batch`` N-way K-shot episodes with ``--queries``
queries per class from the real Omniglot meta-training pool (Vinyals split
with rotations, 28x28, loaded once with ``metalearn.tasks.get_tasksets``)
and return float32 images in ``[0, 1]`` with int32 labels:

- device: ``jax.jit`` of ``tasks.sample_batch`` over the pool held on the
  default device, timed to ``jax.block_until_ready``;
- host: the way PyTorch-style episodic loaders (Torchmeta, learn2learn)
  build a batch, without worker processes: a Python loop over episodes,
  each drawing classes with ``np.random.Generator.choice`` and examples
  with ``permutation``, gathering from a numpy ``uint8`` array, converting
  to float32, then stacking the batch. The batch stays in host memory (no
  transfer to a device is counted).

Each repeat times ``--batches`` consecutive batches; the table reports the
median over ``--repeats`` of episodes per second, and the ratio.

Usage:
  python benchmarks/sampling.py --out results/sampling.json
"""

import argparse
import sys

import _harness
import jax
import numpy as np

from metalearn import tasks
from metalearn.types import Episode


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ways", type=int, default=5)
  p.add_argument("--shots", type=int, default=1)
  p.add_argument("--queries", type=int, default=15)
  p.add_argument("--batch", type=int, default=32, help="episodes per batch")
  p.add_argument("--batches", type=int, default=20,
                 help="batches timed per repeat")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--data-dir", default=None,
                 help="holds omniglot/ (default: $METALEARN_DATA_DIR)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true",
                 help="batch 2, 2 batches, 1 repeat, to check that it runs")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.batches, args.repeats = 2, 2, 1
  for name in ("ways", "shots", "batch", "batches", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  if args.queries < 1:
    p.error("--queries must be >= 1")
  return args


def host_batch(
    rng: np.random.Generator,
    images: np.ndarray,
    *,
    num_ways: int,
    num_shots: int,
    num_queries: int,
    batch_size: int,
) -> Episode:
  """One batch of episodes built on the host, episode by episode."""
  num_classes, per_class = images.shape[:2]
  image_shape = images.shape[2:]
  take = num_shots + num_queries
  labels = np.arange(num_ways, dtype=np.int32)
  episodes = []
  for _ in range(batch_size):
    classes = rng.choice(num_classes, num_ways, replace=False)
    examples = np.stack(
        [rng.permutation(per_class)[:take] for _ in range(num_ways)]
    )
    x = images[classes[:, None], examples].astype(np.float32) / 255.0
    episodes.append(Episode(
        support_x=x[:, :num_shots].reshape(-1, *image_shape),
        support_y=np.repeat(labels, num_shots),
        query_x=x[:, num_shots:].reshape(-1, *image_shape),
        query_y=np.repeat(labels, num_queries),
    ))
  return Episode(*(np.stack(field) for field in zip(*episodes, strict=True)))


def measure(args, sampler: tasks.TaskSampler) -> dict:
  """Episodes/s of both samplers, interleaved repeat by repeat.

  ``sampler`` draws the device's episodes; the host loop reads a copy of
  its pool.
  """
  request = dict(num_ways=args.ways, num_shots=args.shots,
                 num_queries=args.queries)
  device_pool = jax.device_put(sampler.data)
  batch = jax.jit(
      lambda key, d: tasks.sample_batch(sampler._replace(data=d), key,
                                        args.batch)
  )
  keys = list(jax.random.split(jax.random.key(args.seed),
                               args.batches * args.repeats))
  host_images = np.asarray(device_pool.images)
  rng = np.random.default_rng(args.seed)

  def run_device(ks):
    for k in ks:
      jax.block_until_ready(batch(k, device_pool))

  def run_host():
    for _ in range(args.batches):
      host_batch(rng, host_images, batch_size=args.batch, **request)

  dev = jax.block_until_ready(batch(keys[0], device_pool))  # Compiles.
  host = host_batch(rng, host_images, batch_size=args.batch, **request)
  for d, h in zip(dev, host, strict=True):
    if d.shape != h.shape or d.dtype != h.dtype:
      raise AssertionError(f"samplers disagree: {d.shape} vs {h.shape}")
  device_s, host_s = [], []
  for r in range(args.repeats):
    # Alternate the two, so that a change in machine load hits both.
    ks = keys[r * args.batches:(r + 1) * args.batches]
    device_s += _harness.time_calls(lambda ks=ks: run_device(ks), 1)
    host_s += _harness.time_calls(run_host, 1)
  episodes = args.batch * args.batches
  device_eps = episodes / _harness.median(device_s)
  host_eps = episodes / _harness.median(host_s)
  return {
      "device_episodes_per_s": device_eps,
      "host_episodes_per_s": host_eps,
      "speedup": device_eps / host_eps,
      "device_batch_ms": 1e3 * _harness.median(device_s) / args.batches,
      "host_batch_ms": 1e3 * _harness.median(host_s) / args.batches,
      "device_times_s": device_s,
      "host_times_s": host_s,
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  tasksets = tasks.get_tasksets(
      "omniglot", num_ways=args.ways, num_shots=args.shots,
      num_queries=args.queries, data_dir=args.data_dir, image_size=28,
      split_scheme="vinyals", rotations=True)
  pool = tasksets.train.data
  machine = _harness.machine_info()
  result = measure(args, tasksets.train)
  setting = (f"Omniglot {args.ways}-way {args.shots}-shot, {args.queries} "
             f"queries, batch {args.batch}")
  print(f"\n{setting}; pool {tuple(pool.images.shape)}; median of "
        f"{args.repeats} x {args.batches} batches; {machine['cpu']} "
        f"({machine['cpu_count']} cores), jax {machine['jax']}\n")
  print(_harness.markdown_table(
      ["setting", "device: jit sample_batch (episodes/s)",
       "host: numpy loop (episodes/s)", "device / host"],
      [[setting, result["device_episodes_per_s"],
        result["host_episodes_per_s"], result["speedup"]]],
  ))
  config = {k: v for k, v in vars(args).items() if k != "out"}
  config["pool_shape"] = list(pool.images.shape)
  _harness.write_json(
      args.out, {"benchmark": "sampling", "machine": machine,
                 "config": config, "results": result},
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
