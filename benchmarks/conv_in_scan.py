"""Convolution gradients inside ``lax.scan`` on XLA:CPU: lax vs models.conv2d.

Runs a 3x3 convolution (default 64 -> 64 channels on ``80 x 14 x 14``
inputs, the second block of Conv-4 on a 5-way 1-shot, 15-query Omniglot
task) for several tasks, each with its own input, weights and output
cotangent, and reports GFLOP/s of each part (forward, input gradient,
weight gradient, and all three together) in two contexts:

- ``scan``: the tasks run one after another in a ``lax.scan``, as in a
  meta-step with ``task_map="scan"``;
- ``unrolled``: the same tasks as independent operations in one jitted
  function (no loop).

with two implementations: ``jax.lax.conv_general_dilated`` and
``metalearn.models.conv2d``. Gradients come from ``jax.vjp``, so each
implementation computes them its own way.

Usage:
  python benchmarks/conv_in_scan.py --out results/conv_in_scan.json
"""

import argparse
import functools
import sys

import _harness
import jax
import jax.numpy as jnp

from metalearn import models

IMPLS = {
    "lax": jax.lax.conv_general_dilated,
    "conv2d": models.conv2d,
}
PARTS = ("fwd", "dx", "dw", "all")
CONVS_PER_PART = {"fwd": 1, "dx": 1, "dw": 1, "all": 3}
CONTEXTS = ("scan", "unrolled")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", type=int, default=8, help="tasks per call")
  p.add_argument("--batch", type=int, default=80, help="images per task")
  p.add_argument("--size", type=int, default=14, help="feature map side")
  p.add_argument("--channels", type=int, default=64, help="in = out channels")
  p.add_argument("--repeats", type=int, default=5, help="timed calls")
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated subset of {PARTS}")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes and 1 repeat, to check that it runs")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  args = p.parse_args(argv)
  if args.smoke:
    args.tasks, args.batch, args.channels, args.repeats = 2, 4, 8, 1
  args.parts = tuple(args.parts.split(","))
  unknown = set(args.parts) - set(PARTS)
  if unknown:
    p.error(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
  for name in ("tasks", "batch", "size", "channels", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  return args


def conv_flops(batch: int, size: int, cin: int, cout: int, k: int = 3):
  """Multiply-adds x 2 of one SAME, stride-1 convolution (padding counted)."""
  return 2 * batch * size * size * k * k * cin * cout


def one_task(conv, part: str):
  """``(x, w, g) -> outputs`` of one part of a convolution for one task."""
  fwd = functools.partial(
      conv, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )

  def run(x, w, g):
    if part == "fwd":
      return (fwd(x, w),)
    if part == "dx":
      return jax.vjp(lambda x_: fwd(x_, w), x)[1](g)
    if part == "dw":
      return jax.vjp(lambda w_: fwd(x, w_), w)[1](g)
    y, vjp = jax.vjp(fwd, x, w)
    return (y, *vjp(g))

  return run


def over_tasks(fn, context: str):
  """Maps ``fn`` over the leading task axis by ``lax.scan`` or unrolled."""
  if context == "scan":
    def mapped(xs, ws, gs):
      return jax.lax.scan(lambda c, a: (c, fn(*a)), 0, (xs, ws, gs))[1]
  else:
    def mapped(xs, ws, gs):
      outs = [fn(xs[i], ws[i], gs[i]) for i in range(xs.shape[0])]
      return jax.tree.map(lambda *o: jnp.stack(o), *outs)
  return jax.jit(mapped)


def measure(args) -> list[dict]:
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  shape = (args.tasks, args.batch, args.size, args.size, args.channels)
  xs = jax.random.normal(kx, shape)
  ws = 0.05 * jax.random.normal(kw, (args.tasks, 3, 3, args.channels,
                                     args.channels))
  gs = jax.random.normal(kg, shape)
  per_conv = conv_flops(args.batch, args.size, args.channels, args.channels)
  rows = []
  for part in args.parts:
    for context in CONTEXTS:
      row = {"part": part, "context": context}
      for impl, conv in IMPLS.items():
        f = over_tasks(one_task(conv, part), context)
        jax.block_until_ready(f(xs, ws, gs))  # Compile and warm up.
        times = _harness.time_calls(
            lambda f=f: jax.block_until_ready(f(xs, ws, gs)), args.repeats
        )
        flops = args.tasks * CONVS_PER_PART[part] * per_conv
        row[f"{impl}_s"] = _harness.median(times)
        row[f"{impl}_gflops"] = flops / _harness.median(times) / 1e9
      row["speedup"] = row["conv2d_gflops"] / row["lax_gflops"]
      rows.append(row)
  return rows


def main(argv=None) -> int:
  args = parse_args(argv)
  machine = _harness.machine_info()
  rows = measure(args)
  print(f"\n{args.tasks} tasks of {args.batch}x{args.size}x{args.size}x"
        f"{args.channels}, 3x3 conv, median of {args.repeats}, "
        f"{machine['cpu']} ({machine['cpu_count']} cores), jax "
        f"{machine['jax']}\n")
  print(_harness.markdown_table(
      ["part", "context", "lax.conv_general_dilated GFLOP/s",
       "models.conv2d GFLOP/s", "conv2d / lax"],
      [[r["part"], r["context"], r["lax_gflops"], r["conv2d_gflops"],
        r["speedup"]] for r in rows],
  ))
  config = {k: v for k, v in vars(args).items() if k != "out"}
  _harness.write_json(
      args.out, {"benchmark": "conv_in_scan", "machine": machine,
                 "config": config, "results": rows},
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
