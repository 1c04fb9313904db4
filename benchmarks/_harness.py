"""Shared helpers of the benchmark scripts: timing, machine facts, output.

The scripts in this folder import it as a sibling module (``import
_harness``), which works because Python puts a script's own folder first on
``sys.path``.
"""

import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Times ``repeats`` calls of ``fn``; returns the durations in seconds.

  ``fn`` must block until its work is done (``jax.block_until_ready``).
  """
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median(values: Sequence[float]) -> float:
  return statistics.median(values)


def cpu_model() -> str:
  """The CPU's marketing name from ``/proc/cpuinfo`` (Linux), else platform."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  for line in text.splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """Facts that a reader needs to compare numbers across machines.

  The load average is recorded so that a run made while other processes
  competed for the cores can be recognised afterwards.
  """
  import jax  # Imported here so that --help stays instant.

  device = jax.devices()[0]
  return {
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_average_1m": round(os.getloadavg()[0], 2),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "python": platform.python_version(),
  }


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> str:
  """A GitHub markdown table, header row included, ready to paste."""
  lines = [
      "| " + " | ".join(headers) + " |",
      "|" + "|".join("---" for _ in headers) + "|",
  ]
  for row in rows:
    lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
  return "\n".join(lines)


def _cell(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    if value == 0 or abs(value) >= 100:
      return f"{value:.0f}"
    if abs(value) >= 10:
      return f"{value:.1f}"
    return f"{value:.3g}"
  return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  """Writes ``payload`` to ``path`` (parents created); no-op for ``None``."""
  if path is None:
    return
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  print(f"wrote {out}")


def max_rss_bytes() -> int:
  """Peak resident set size of this process, in bytes."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # Linux: KiB.


def compile_and_time(step, state, *args, warmup: int, repeats: int):
  """Compiles a jitted meta-step and times it.

  ``step(state, *args) -> (state, metrics)`` is lowered and compiled (the
  compile time is measured alone), run ``warmup`` times untimed, then
  ``repeats`` times, each call to ``block_until_ready``; the state is
  threaded through the calls.

  Returns:
    ``(compiled, compile_s, times, metrics)``: the compiled step, its
    compile seconds, the timed calls' seconds and the last call's metrics.
  """
  import jax  # The peer scripts' own environments import this file too.

  start = time.perf_counter()
  compiled = step.lower(state, *args).compile()
  compile_s = time.perf_counter() - start
  metrics = None
  for _ in range(warmup):
    state, metrics = jax.block_until_ready(compiled(state, *args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, *args))
    times.append(time.perf_counter() - start)
  return compiled, compile_s, times, metrics
