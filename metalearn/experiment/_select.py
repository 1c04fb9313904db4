"""Validation keys and the checkpoint a run tests (``trainer.select``).

Validation is for selection, the test is for reporting: validation episodes
come from their own key, never the test key, and the run's objective (the
value a hydra sweeper optimises) is a validation metric of the tested
parameters, never a test metric.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from metalearn.experiment import _checkpoint
from metalearn.training import MetaTrainState


def eval_seed(trainer: Mapping[str, Any], split: str) -> int:
  """The seed of a split's fixed evaluation episodes.

  Test (and train) episodes come from ``trainer.eval_seed``; validation
  episodes from ``trainer.val_seed``, or ``eval_seed + 1`` when it is null.
  The config check keeps ``val_seed`` from equalling ``eval_seed``, so
  validation never draws the test episodes (for sinusoid, whose validation
  and test tasks come from one family, the key is what keeps them apart).

  Examples:
    >>> eval_seed({"eval_seed": 0, "val_seed": None}, "val")
    1
    >>> eval_seed({"eval_seed": 0, "val_seed": 7}, "test")
    0
  """
  if split != "val":
    return trainer["eval_seed"]
  seed = trainer.get("val_seed")
  return trainer["eval_seed"] + 1 if seed is None else seed


def _better(value: float, than: float, direction: str) -> bool:
  return value > than if direction == "maximize" else value < than


class Selection:
  """The validations of a run and the state it tests.

  ``select="last"`` tests the final state. ``select="best_val"`` tests the
  validated state with the best objective value (ties keep the earlier
  step); the best so far is kept as an orbax checkpoint in ``directory``
  (the state with its value), replaced at each validation that improves on
  it. A resumed run reads it back and redoes the steps after its
  checkpoint exactly, re-validating them to the same values, so it selects
  the checkpoint an uninterrupted run selects. The final state is always a
  candidate too (validated at the end if its step was not an
  ``eval_every`` step), but it is never kept as the best: a run stopped
  early (``trainer.max_time_s``) and resumed selects as one that never
  stopped.

  Args:
    select: ``"last"`` or ``"best_val"``.
    metric: the objective, a ``val/*`` metric name.
    direction: ``"maximize"`` or ``"minimize"``.
    directory: where ``best_val`` keeps the best state.
    resumed: whether the run continues from a checkpoint; a fresh run
      clears ``directory`` (another run's best is not a candidate).
  """

  def __init__(self, select: str, metric: str, direction: str,
               directory: str | pathlib.Path, *, resumed: bool):
    self.select, self.metric, self.direction = select, metric, direction
    self._last: tuple[int, dict[str, float]] | None = None
    self.best: tuple[int, float] | None = None
    self._manager = None
    if select != "best_val":
      return
    self._manager = _checkpoint.checkpoint_manager(
        directory, save_every=1, max_to_keep=1)
    if not resumed:
      for step in self._manager.all_steps():
        self._manager.delete(step)
    step = self._manager.latest_step()
    if step is not None:
      tree = self._manager.restore(step, args=ocp.args.StandardRestore())
      self.best = (step, float(tree["value"]))

  def record(self, state: MetaTrainState, val: Mapping[str, float]) -> None:
    """Notes a validation during training (``val/*`` metrics of state)."""
    step, value = int(state.step), float(val[self.metric])
    self._last = (step, dict(val))
    if self._manager is None or not (
        self.best is None or _better(value, self.best[1], self.direction)
    ):
      return
    if step not in self._manager.all_steps():
      host = jax.tree.map(lambda x: np.array(x, copy=True), state)
      self._manager.save(
          step, args=ocp.args.StandardSave(
              {"state": host, "value": np.float64(value)}),
          force=True,
      )
    self.best = (step, value)

  def validation_of(self, step: int) -> dict[str, float] | None:
    """The ``val/*`` metrics recorded at ``step`` in this process, if any."""
    if self._last is not None and self._last[0] == step:
      return self._last[1]
    return None

  def choose(
      self, state: MetaTrainState, final_val: Mapping[str, float]
  ) -> tuple[MetaTrainState, int, float]:
    """The tested state, its step and its objective value.

    Args:
      state: the final state.
      final_val: its ``val/*`` metrics.
    """
    step, value = int(state.step), float(final_val[self.metric])
    if (
        self._manager is None
        or self.best is None
        or self.best[0] == step
        or _better(value, self.best[1], self.direction)
    ):
      return state, step, value
    self._manager.wait_until_finished()
    like = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    tree = self._manager.restore(
        self.best[0], args=ocp.args.StandardRestore(
            {"state": like, "value": np.zeros((), np.float64)}))
    return tree["state"], self.best[0], float(tree["value"])

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
