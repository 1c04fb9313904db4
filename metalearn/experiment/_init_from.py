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

A self-distilling learner (:class:`~metalearn.metalearners.Distilled`
meta-parameters: a ``student`` and a fixed ``teacher``) gets the
checkpoint's network in its ``teacher`` only, whole (every leaf, the
global head included, or a ``ConfigError``); its student starts fresh, a
born-again generation. A checkpoint that is itself distilled provides its
student.
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
    "backbone", "student",
})
# The fixed network of a self-distilling learner (``Distilled.teacher``).
TEACHER = "teacher"


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
      whose network name starts with one of them are the network's
      (every leaf of a teacher is, its learner's global head included).

  Returns:
    ``(meta_params, copied, kept)``: the meta-parameters with the matching
    leaves replaced (same dtypes as before), and the network names, as
    ``a/b/c``, of the network leaves copied and of those kept at their
    initialisation (no leaf of that name in the checkpoint, or a ``head``
    of another number of outputs).

  Raises:
    ValueError: if two checkpoint leaves have the same network name (the
      match would be ambiguous), if a leaf outside the classification
      head (the module ``head``) has another shape there, or if a
      teacher's leaf has no counterpart.
  """
  by_name: dict[tuple[str, ...], Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]:
    if TEACHER in _names(path):
      continue  # A distilled run's network is its student.
    name = network_name(path)
    if name in by_name:
      raise ValueError(
          f"the checkpoint has two leaves named {'/'.join(name)} inside its "
          "network; cannot tell which to load")
    by_name[name] = leaf
  copied, kept, mismatched = [], [], []
  teacher = has_teacher(meta_params)

  def one(path, leaf):
    if teacher:  # Only the teacher's leaves, named inside it.
      names = _names(path)
      if TEACHER not in names:
        return leaf
      path = path[names.index(TEACHER) + 1:]
    name = network_name(path)
    if not teacher and (not name or name[0] not in modules):
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
  if teacher and kept and copied:
    raise ValueError(
        f"the teacher must be loaded whole, but {len(kept)} of its leaves "
        f"have no counterpart of the same shape in the checkpoint: "
        f"{', '.join(kept[:3])} (another number of classes?)")
  return out, copied, kept


def has_teacher(meta_params: PyTree) -> bool:
  """Whether the meta-parameters hold a ``teacher`` (self-distillation)."""
  return any(TEACHER in _names(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(meta_params)[0])


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
  directory; ``<run>/checkpoints/best`` for the best validated state of a
  ``trainer.select=best_val`` run) loaded into them.

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
  if isinstance(tree, Mapping) and "state" in tree and "value" in tree:
    tree = tree["state"]  # The best validated state (checkpoints/best).
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
           "%s%s", len(copied), step, directory,
           " into the teacher" if has_teacher(meta_params) else "")
  if kept:
    log.warning(
        "trainer.init_from: %d network leaves have no counterpart of the "
        "same shape in the checkpoint and keep their initialisation: %s",
        len(kept), ", ".join(kept))
  return out
