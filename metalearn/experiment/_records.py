"""What both kinds of run keep in their run directory besides checkpoints.

A few-shot run (:func:`~metalearn.experiment.run_experiment`) and a
learned-optimiser run (:func:`~metalearn.experiment.run_learned_optimizer`)
share the metric lines (``metrics.jsonl``), atomic JSON files and the rule
for continuing from a checkpoint (:func:`resume_state`).
"""

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from metalearn.experiment import _checkpoint
from metalearn.experiment._checks import ConfigError

log = logging.getLogger("metalearn.experiment")


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically (a temporary, then rename)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)  # Atomic: readers never see half a file.


class MetricsFile:
  """``<run dir>/metrics.jsonl``: one JSON line per metric record, with
  ``step`` and ``wall_s``, the seconds since the run began (training,
  validation and checkpointing; a resumed run continues the clock of the
  lines it keeps)."""

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    kept, offset = [], 0.0
    if resume_step is not None and path.exists():
      for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["step"] <= resume_step:
          kept.append(line)
          offset = record["wall_s"]
    # Lines past the checkpoint belong to steps the resumed run redoes.
    path.write_text("".join(line + "\n" for line in kept))
    self.start = time.perf_counter() - offset

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    record = {"step": step,
              "wall_s": round(time.perf_counter() - self.start, 3),
              **metrics}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """The metric records of a run (``<run_dir>/metrics.jsonl``), in order."""
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def resume_state(manager, resume: bool, field: str, like: Callable[[], Any]):
  """The checkpointed state a run continues from, or ``None`` to start afresh.

  Args:
    manager: the run's checkpoint directory.
    resume: the run's ``field`` (``trainer.resume`` or ``outer.resume``).
    field: the config field, for messages.
    like: builds a fresh state of the run (structure, shapes and dtypes to
      restore into); called only when there is a checkpoint to restore.

  Raises:
    ConfigError: naming ``field``, if the run would start afresh over
      existing checkpoints, or if the latest checkpoint does not fit ``like``.
  """
  latest = manager.latest_step()
  if not resume:
    if latest is not None:
      raise ConfigError(
          f"{field}=false but {manager.directory} already holds "
          f"checkpoints (latest step {latest}): pass {field}=true to "
          "continue that run, or use a new run directory"
      )
    return None
  if latest is None:
    log.warning("%s=true but %s holds no checkpoint: starting from step 0",
                field, manager.directory)
    return None
  try:
    state = _checkpoint.restore_state(manager, like(), latest)
  except ValueError as e:
    raise ConfigError(
        f"{field}=true: {e} (the config differs from the checkpointed "
        "run's, or the run was saved by a metalearn whose state layout "
        "differs, e.g. before carried state became explicit)") from e
  log.info("resuming from the checkpoint at step %d in %s", latest,
           manager.directory)
  return state
