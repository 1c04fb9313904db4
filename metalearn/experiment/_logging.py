"""One small logging adapter: the console, plus Weights & Biases if asked.

wandb is imported only when a ``wandb`` logger is made. Its mode is the
logger config's ``mode`` if set, else ``$WANDB_MODE`` if set, else
``online`` when the user is logged in (``WANDB_API_KEY`` or a netrc entry
written by ``wandb login``) and ``offline`` otherwise, so a run never waits
on the network unless the user asked for it. Tests set
``WANDB_MODE=disabled``.
"""

import logging
import math
import netrc
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

log = logging.getLogger("metalearn.experiment")

WANDB_HOST = "api.wandb.ai"


class Logger(NamedTuple):
  """Where metrics go.

  Attributes:
    log: ``log(metrics, step)`` records scalar metrics at a meta-step.
    summary: ``summary(results)`` records the final results of the run.
    finish: ``finish(exit_code)`` closes the run (0: success).
    curves: ``curves(name, {label: values}, png)`` records curves over
      another axis than the meta-step (e.g. loss per inner step), one line
      per label, and a PNG of them.
  """

  log: Callable[[Mapping[str, float], int], None]
  summary: Callable[[Mapping[str, Any]], None]
  finish: Callable[[int], None]
  curves: Callable[[str, Mapping[str, Any], Any], None] = (
      lambda name, lines, png: log.info("%s: %s", name, png))


def _format(metrics: Mapping[str, Any]) -> str:
  parts = []
  for name, value in metrics.items():
    if isinstance(value, float) and math.isfinite(value):
      parts.append(f"{name}={value:.4g}")
    else:
      parts.append(f"{name}={value}")
  return " ".join(parts)


def console_logger() -> Logger:
  """Logs through :mod:`logging` (``metalearn.experiment``, level INFO);
  under hydra that is the console and ``<run dir>/<job>.log``."""

  def log_fn(metrics, step):
    log.info("step %d: %s", step, _format(metrics))

  def summary(results):
    log.info("results: %s", _format(results))

  def finish(exit_code):
    del exit_code

  return Logger(log_fn, summary, finish)


def _logged_in(netrc_path: str | os.PathLike | None = None) -> bool:
  """Whether wandb has an API key: the environment, or ``wandb login``'s
  netrc entry. Only checks that one exists; never reads or sends it."""
  if os.environ.get("WANDB_API_KEY"):
    return True
  path = netrc_path or os.environ.get("NETRC") or (
      pathlib.Path.home() / ".netrc"
  )
  try:
    return netrc.netrc(path).authenticators(WANDB_HOST) is not None
  except (OSError, netrc.NetrcParseError):
    return False


def wandb_mode(
    requested: str | None = None,
    *,
    netrc_path: str | os.PathLike | None = None,
) -> str:
  """The wandb mode of a run: ``requested``, else ``$WANDB_MODE``, else
  ``online`` when logged in and ``offline`` when not.

  Examples:
    >>> wandb_mode("disabled")
    'disabled'
  """
  if requested:
    return requested
  if os.environ.get("WANDB_MODE"):
    return os.environ["WANDB_MODE"]
  return "online" if _logged_in(netrc_path) else "offline"


def wandb_logger(
    cfg: Mapping[str, Any],
    *,
    run_dir: str | os.PathLike,
    name: str,
    config: Mapping[str, Any],
    resume: bool = False,
) -> Logger:
  """Logs to a wandb run (and the console).

  The run id is kept in ``<run_dir>/wandb_run_id``, so a resumed run
  continues the same wandb run.

  Args:
    cfg: the logger config: ``project``, ``entity``, ``group``, ``tags``,
      ``mode``.
    run_dir: the run directory (wandb writes under ``<run_dir>/wandb``).
    name: the run's display name.
    config: the resolved run config, recorded with the run.
    resume: continue the wandb run recorded in ``run_dir``.

  Returns:
    The logger.
  """
  import wandb  # Heavy; only runs that log to wandb import it.

  run_dir = pathlib.Path(run_dir)
  id_file = run_dir / "wandb_run_id"
  run_id = None
  if resume and id_file.exists():
    run_id = id_file.read_text().strip()
  run = wandb.init(
      project=cfg.get("project"),
      entity=cfg.get("entity"),
      group=cfg.get("group"),
      tags=list(cfg.get("tags") or ()),
      name=name,
      dir=str(run_dir),
      config=dict(config),
      mode=wandb_mode(cfg.get("mode")),
      id=run_id,
      resume="allow" if run_id else None,
      # Several runs may be open at once: a population logs one per member.
      reinit="create_new",
  )
  if run.id:
    id_file.write_text(run.id)
  console = console_logger()

  def log_fn(metrics, step):
    console.log(metrics, step)
    run.log(dict(metrics), step=step)

  def summary(results):
    console.summary(results)
    run.summary.update(dict(results))

  def finish(exit_code):
    run.finish(exit_code=exit_code)

  def curves(name, lines, png):
    labels = list(lines)
    run.log({
        name: wandb.plot.line_series(
            xs=list(range(len(lines[labels[0]]))),
            ys=[list(lines[k]) for k in labels], keys=labels, title=name,
            xname="inner step"),
        f"{name}_png": wandb.Image(str(png)),
    })

  return Logger(log_fn, summary, finish, curves)


def make_logger(
    cfg: Mapping[str, Any],
    *,
    run_dir: str | os.PathLike,
    name: str,
    config: Mapping[str, Any],
    resume: bool = False,
) -> Logger:
  """The logger a ``logger`` config asks for: ``kind`` ``wandb`` or
  ``none`` (console only)."""
  if cfg["kind"] == "wandb":
    return wandb_logger(
        cfg, run_dir=run_dir, name=name, config=config, resume=resume
    )
  return console_logger()
