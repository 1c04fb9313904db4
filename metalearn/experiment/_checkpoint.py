"""Orbax checkpoints of the meta-training state: atomic, kept, resumable.

A checkpoint is the whole :class:`metalearn.training.MetaTrainState`
(``step``, ``meta_params``, ``opt_state``): with the run's seed that is
everything a run needs to continue exactly as if it had never stopped,
because step ``t`` draws its episodes from ``fold_in(key, t)``. Orbax writes
each checkpoint into a temporary directory and renames it when complete, so
a run killed while saving leaves the previous checkpoint intact (the partial
one is removed when the directory is next opened).
"""

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from metalearn.training import MetaTrainState

PyTree = Any


def checkpoint_manager(
    directory: str | os.PathLike,
    *,
    save_every: int,
    max_to_keep: int = 3,
) -> ocp.CheckpointManager:
  """Opens (or creates) a checkpoint directory.

  Args:
    directory: where the numbered checkpoints go.
    save_every: :func:`save_state` saves only at multiples of this step
      (and when forced, or when JAX reports a preemption).
    max_to_keep: the newest checkpoints kept; older ones are deleted.

  Returns:
    An ``orbax.checkpoint.CheckpointManager``; ``close()`` it when done.

  Examples:
    >>> import tempfile
    >>> manager = checkpoint_manager(tempfile.mkdtemp(), save_every=10)
    >>> manager.latest_step() is None
    True
    >>> manager.close()
  """
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      # Only multiples of save_every (and forced saves); orbax's default
      # would also save the first step it sees.
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(save_every),
          policies.PreemptionCheckpointingPolicy(),
      ]),
      max_to_keep=max_to_keep,
      cleanup_tmp_directories=True,
  )
  path = pathlib.Path(directory).expanduser().resolve()
  return ocp.CheckpointManager(path, options=options)


def save_state(
    manager: ocp.CheckpointManager, state: MetaTrainState, *,
    force: bool = False,
) -> bool:
  """Saves ``state`` at its step if the step is due (or ``force``).

  The arrays are first copied to host memory: the jitted meta-step donates
  its input state, so the device buffers may be reused by the next step
  while orbax still writes in the background.

  Returns:
    Whether a checkpoint was started.
  """
  if int(state.step) in manager.all_steps():
    return False  # Already saved (a forced save after a periodic one).
  host = jax.tree.map(lambda x: np.array(x, copy=True), state)
  return manager.save(
      int(host.step), args=ocp.args.StandardSave(host), force=force
  )


def restore_state(
    manager: ocp.CheckpointManager,
    like: MetaTrainState,
    step: int | None = None,
) -> MetaTrainState | None:
  """Restores a checkpoint into the structure, shapes and dtypes of ``like``.

  Args:
    manager: the checkpoint directory.
    like: a state of the same run (typically
      :func:`metalearn.training.init_state`); only its structure, shapes,
      dtypes and placement are used.
    step: which checkpoint; default the latest.

  Returns:
    The restored state, or ``None`` if there is no checkpoint.

  Raises:
    ValueError: if the checkpoint does not fit ``like`` (another model or
      optimizer).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"checkpoint {step} in {manager.directory} does not fit this run's "
        f"learner and optimizer: {e}"
    ) from e


def load_checkpoint(
    directory: str | os.PathLike, step: int | None = None
) -> tuple[int, PyTree]:
  """Reads a checkpoint without knowing the run's structure (inspection).

  Args:
    directory: a checkpoint directory.
    step: which checkpoint; default the latest.

  Returns:
    ``(step, tree)`` where ``tree`` holds numpy arrays in nested dicts and
    lists (``{"step", "meta_params", "opt_state"}``).

  Raises:
    FileNotFoundError: if the directory holds no (such) checkpoint.
  """
  path = pathlib.Path(directory).expanduser().resolve()
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(path, options=options) as manager:
    steps = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step not in steps:
      raise FileNotFoundError(
          f"no checkpoint {'' if step is None else f'of step {step} '}in "
          f"{path} (steps there: {list(steps)})"
      )
    tree = manager.restore(step, args=ocp.args.StandardRestore())
  return step, jax.tree.map(np.asarray, tree)
