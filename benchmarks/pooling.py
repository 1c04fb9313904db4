"""2x2 max-pooling on XLA:CPU: ``lax.reduce_window``, reshape and max, and
the maximum of strided slices.

Times the forward pass and the gradient (``jax.vjp``) of 2x2, stride-2
max-pooling of a ``[80, 28, 28, 64]`` float32 batch (Conv-4's first block
on a 5-way 1-shot, 15-query task) with ``flax.linen.max_pool``, which lowers
to ``lax.reduce_window``; with a reshape to ``[..., H/2, 2, W/2, 2, C]``
and a max over the window axes (``max_pool_2x2`` until 2026-12-04); with
the element-wise maximum of the window's four strided slices, differentiated
by JAX (``max_pool_2x2`` until 2026-12-05); and with
``metalearn.models.max_pool_2x2``, the same forward pass with a custom JVP
whose gradient is one element-wise pass over the input. ``block_gradient``
times the gradient of pooling after an affine map and a ReLU, as in a
Conv-4 block, where XLA fuses the three.

Usage:
  python benchmarks/pooling.py --out results/pooling.json
"""

import argparse
import sys

import _harness
import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn import models


def reshape_max(x):
  *lead, h, w, c = x.shape
  return x.reshape(*lead, h // 2, 2, w // 2, 2, c).max(axis=(-4, -2))


def slices_max(x):
  *_, h, w, _ = x.shape
  x = x[..., : h - h % 2, : w - w % 2, :]
  top = jnp.maximum(x[..., 0::2, 0::2, :], x[..., 0::2, 1::2, :])
  bottom = jnp.maximum(x[..., 1::2, 0::2, :], x[..., 1::2, 1::2, :])
  return jnp.maximum(top, bottom)


IMPLS = {
    "reduce_window": lambda x: nn.max_pool(x, (2, 2), (2, 2)),
    "reshape_max": reshape_max,
    "slices_max": slices_max,
    "custom_jvp": models.max_pool_2x2,
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=80)
  p.add_argument("--size", type=int, default=28)
  p.add_argument("--channels", type=int, default=64)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes and 1 repeat, to check that it runs")
  p.add_argument("--out", default=None, help="write a JSON of the results")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.channels, args.repeats = 4, 8, 1
  for name in ("batch", "size", "channels", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  return args


def measure(args) -> list[dict]:
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (args.batch, args.size, args.size, args.channels))
  g = jax.random.normal(kg, IMPLS["reshape_max"](x).shape)
  scale = 1.0 + 0.1 * jax.random.normal(kg, (args.channels,))

  def block(pool):
    return lambda x: pool(jax.nn.relu(x * scale + 0.1))

  programs = {
      "forward": lambda pool: jax.jit(pool),
      "gradient": lambda pool: jax.jit(lambda x, g: jax.vjp(pool, x)[1](g)),
      "block_gradient": lambda pool: jax.jit(
          lambda x, g: jax.vjp(block(pool), x)[1](g)),
  }
  rows = []
  for op, make in programs.items():
    row = {"op": op}
    for impl, pool in IMPLS.items():
      f = make(pool)
      inputs = (x,) if op == "forward" else (x, g)
      jax.block_until_ready(f(*inputs))  # Compile and warm up.
      times = _harness.time_calls(
          lambda f=f, a=inputs: jax.block_until_ready(f(*a)), args.repeats)
      row[f"{impl}_ms"] = 1e3 * _harness.median(times)
    row["speedup"] = row["reduce_window_ms"] / row["reshape_max_ms"]
    row["slices_vs_reshape"] = row["reshape_max_ms"] / row["slices_max_ms"]
    row["slices_vs_custom_jvp"] = (row["slices_max_ms"]
                                   / row["custom_jvp_ms"])
    rows.append(row)
  return rows


def main(argv=None) -> int:
  args = parse_args(argv)
  machine = _harness.machine_info()
  rows = measure(args)
  print(f"\n2x2 max-pool of [{args.batch}, {args.size}, {args.size}, "
        f"{args.channels}] float32, median of {args.repeats}; "
        f"{machine['cpu']} ({machine['cpu_count']} cores), jax "
        f"{machine['jax']}\n")
  print(_harness.markdown_table(
      ["op", "lax.reduce_window (ms)", "reshape + max (ms)",
       "slices + maximum (ms)", "custom JVP (ms)",
       "reduce_window / reshape", "reshape / slices",
       "slices / custom JVP"],
      [[r["op"], r["reduce_window_ms"], r["reshape_max_ms"],
        r["slices_max_ms"], r["custom_jvp_ms"], r["speedup"],
        r["slices_vs_reshape"], r["slices_vs_custom_jvp"]]
       for r in rows],
  ))
  config = {k: v for k, v in vars(args).items() if k != "out"}
  _harness.write_json(
      args.out, {"benchmark": "pooling", "machine": machine,
                 "config": config, "results": rows},
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
