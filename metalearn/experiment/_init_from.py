"""Starting a run from another run's network (``trainer.init_from``).

A pretrained backbone (a supervised pretraining run, a ProtoNet) is loaded
into any learner whose network shares its layers: the leaves of the new
run's network are matched to the checkpoint's by their names inside the
network (``block0/Conv_0/kernel``, ``block0/BatchNorm_0/mean``), whatever
the learners wrap them in (``WithModelState``, ``R2D2Params.embed``, a
learner's own fields), and by shape. What does not match (a classifier
head of another size, a learner's own meta-parameters such as Meta-SGD's
rates or R2-D2's lambda) keeps its fresh initialisation, and the run says
which.
"""

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from metalearn.experiment import _checkpoint
from metalearn.experiment._checks import ConfigError

PyTree = Any
log = logging.getLogger("metalearn.experiment")

# The classification layer of the library's models: the one layer whose
# shape may differ (another number of classes) and is then left fresh.
HEAD = "head"
# The containers learners put a network (and its state) in; a leaf's name
# inside the network is its path with these leading entries removed.
WRAPPERS = frozenset({
    "meta_params", "params", "model_state", "embed", "model", "encoder",
    "backbone",
})


def _names(path) -> tuple[str, ...]:
  """A key path as strings (dict keys, attribute names, list indices)."""
  out = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        out.append(str(getattr(entry, attribute)))
        break
    else:
      out.append(str(entry))
  return tuple(out)


def network_name(path) -> tuple[str, ...]:
  """A leaf's name inside its network: its path without leading wrappers
  (:data:`WRAPPERS`, and positions in tuples or lists).

  Examples:
    >>> import jax
    >>> tree = {"params": {"embed": {"block0": {"kernel": 0}}}}
    >>> [network_name(p) for p, _ in
    ...  jax.tree_util.tree_flatten_with_path(tree)[0]]
    [('block0', 'kernel')]
  """
  names = _names(path)
  start = 0
  while start < len(names) and (
      names[start] in WRAPPERS or hasattr(path[start], "idx")):
    start += 1  # a wrapper, or a position in a tuple of meta-parameters
  return names[start:]


def transplant(
    meta_params: PyTree,
    source: PyTree,
    modules: frozenset[str] | set[str],
) -> tuple[PyTree, list[str], list[str]]:
  """Copies a checkpoint's network leaves into fresh meta-parameters.

  Args:
    meta_params: the new run's initial meta-parameters.
    source: the checkpoint's meta-parameters (any nesting of dicts, lists
      and named tuples, as :func:`load_checkpoint` returns them).
    modules: the top-level module names of the new run's network (the keys
      of its parameters, ``block0``...``block3``, ``head``): only leaves
      whose network name starts with one of them are the network's.

  Returns:
    ``(meta_params, copied, kept)``: the meta-parameters with the matching
    leaves replaced (same dtypes as before), and the network names, as
    ``a/b/c``, of the network leaves copied and of those kept at their
    initialisation (no leaf of that name in the checkpoint, or a ``head``
    of another number of outputs).

  Raises:
    ValueError: if two checkpoint leaves have the same network name (the
      match would be ambiguous), or if a leaf outside the classification
      head (the module ``head``) has another shape there.
  """
  by_name: dict[tuple[str, ...], Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]:
    name = network_name(path)
    if name in by_name:
      raise ValueError(
          f"the checkpoint has two leaves named {'/'.join(name)} inside its "
          "network; cannot tell which to load")
    by_name[name] = leaf
  copied, kept, mismatched = [], [], []

  def one(path, leaf):
    name = network_name(path)
    if not name or name[0] not in modules:
      return leaf  # A learner's own meta-parameter, not the network's.
    found = by_name.get(name)
    label = "/".join(name)
    if found is not None and np.shape(found) != np.shape(leaf):
      if name[0] != HEAD:
        mismatched.append(
            f"{label} {np.shape(found)} there, {np.shape(leaf)} here")
      found = None
    if found is None:
      kept.append(label)
      return leaf
    copied.append(label)
    return jax.numpy.asarray(found, dtype=leaf.dtype)

  out = jax.tree_util.tree_map_with_path(one, meta_params)
  if mismatched:
    raise ValueError(
        f"{len(mismatched)} network leaves have other shapes in the checkpoint "
        f"(another width or input?): {'; '.join(mismatched[:3])}")
  return out, copied, kept


def checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  """A run directory's ``checkpoints/``, or ``path`` itself."""
  path = pathlib.Path(path).expanduser()
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_network(
    meta_params: PyTree, path: str | os.PathLike,
    modules: frozenset[str] | set[str],
) -> PyTree:
  """``trainer.init_from``: the run's meta-parameters with the network of
  the latest checkpoint under ``path`` (a run directory or a checkpoint
  directory) loaded into them.

  Raises:
    ConfigError: naming ``trainer.init_from``, if there is no checkpoint
      there, or if none of its leaves fits this run's network.
  """
  directory = checkpoint_dir(path)
  if not directory.is_dir():
    raise ConfigError(f"trainer.init_from={path}: no such directory "
                      f"({directory.resolve()})")
  try:
    step, tree = _checkpoint.load_checkpoint(directory)
  except FileNotFoundError as e:
    raise ConfigError(f"trainer.init_from={path}: {e}") from e
  source = tree["meta_params"] if isinstance(tree, Mapping) else tree
  try:
    out, copied, kept = transplant(meta_params, source, modules)
  except ValueError as e:
    raise ConfigError(f"trainer.init_from={path}: {e}") from e
  if not copied:
    raise ConfigError(
        f"trainer.init_from={path}: no leaf of checkpoint {step} fits this "
        f"run's network (its layers: {', '.join(sorted(modules))}); was it "
        "trained with the same model and model.features?")
  log.info("trainer.init_from: loaded %d network leaves of checkpoint %d in "
           "%s", len(copied), step, directory)
  if kept:
    log.warning(
        "trainer.init_from: %d network leaves have no counterpart of the "
        "same shape in the checkpoint and keep their initialisation: %s",
        len(kept), ", ".join(kept))
  return out
