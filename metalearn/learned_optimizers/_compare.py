"""A learned optimiser against hand-designed ones on held-out tasks."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.learned_optimizers._base import LearnedOptimizer
from metalearn.learned_optimizers._unroll import TaskFamily, training_curves

# Hand-designed optimisers by name: learning rate -> transformation.
BASELINES: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "sgd": optax.sgd,
}
# Losses of diverged runs (NaN, inf) count as this much in the summaries.
DIVERGED_LOSS = 1e6


def loss_curves(
    learned_optimizer: LearnedOptimizer, *, num_steps: int
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """A jitted ``curves(kind, hyper, family, data, keys)``.

  ``kind`` is ``"learned"`` (``hyper``: its meta-parameters theta) or a
  name of :data:`BASELINES` (``hyper``: the learning rate). Each key of
  ``keys`` trains one fresh task of ``family`` for ``num_steps`` steps
  (:func:`training_curves`); the result is the log training and log
  held-out losses, ``[len(keys), num_steps + 1]``. One compilation per
  kind and family.
  """
  makers = {**BASELINES, "learned": learned_optimizer.opt_fn}

  def curves(kind, hyper, family, data, keys):
    tx = makers[kind](hyper)
    run = jax.vmap(lambda k: training_curves(family, tx, k,
                                             num_steps=num_steps, data=data))
    train, held_out = run(keys)
    return jnp.log(train), jnp.log(held_out)

  return jax.jit(curves, static_argnums=(0, 2))


def summarize_curves(log_train, log_held_out) -> dict[str, Any]:
  """Geometric means over tasks of :func:`loss_curves`' output.

  Returns ``final_train``, ``final_held_out`` (after the last step),
  ``mean_train`` (over all steps) and the per-step curves
  ``curve_train``, ``curve_held_out``. Diverged runs count as
  :data:`DIVERGED_LOSS`.
  """
  def clean(x):
    bad = np.log(DIVERGED_LOSS)
    return np.nan_to_num(np.asarray(x), nan=bad, posinf=bad)

  log_train, log_held_out = clean(log_train), clean(log_held_out)
  return {
      "final_train": float(np.exp(log_train[:, -1].mean())),
      "final_held_out": float(np.exp(log_held_out[:, -1].mean())),
      "mean_train": float(np.exp(log_train.mean())),
      "curve_train": np.exp(log_train.mean(0)).tolist(),
      "curve_held_out": np.exp(log_held_out.mean(0)).tolist(),
  }


def tune_learning_rates(
    curves: Callable[..., Any],
    family: TaskFamily,
    keys: jax.Array,
    learning_rates: Sequence[float],
    kinds: Sequence[str] = tuple(BASELINES),
) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
  """Picks, per baseline, the rate of the grid with the lowest final
  training loss on the tasks of ``keys`` (training tasks, never the
  held-out ones).

  Returns:
    ``(tuned, table)``: the chosen rate per kind, and every rate's final
    training loss per kind.
  """
  if not learning_rates or any(lr <= 0 for lr in learning_rates):
    raise ValueError(f"learning_rates must be positive numbers, got "
                     f"{list(learning_rates)!r}")
  tuned, table = {}, {}
  for kind in kinds:
    finals = {
        lr: summarize_curves(*curves(kind, lr, family, family.data, keys))[
            "final_train"]
        for lr in learning_rates
    }
    table[kind] = finals
    tuned[kind] = min(finals, key=finals.get)
  return tuned, table


def compare(
    curves: Callable[..., Any],
    runs: dict[str, tuple[str, Any]],
    family: TaskFamily,
    keys: jax.Array,
) -> dict[str, dict[str, Any]]:
  """Runs each optimiser of ``runs`` on the same tasks and summarises it.

  Args:
    curves: :func:`loss_curves`'s function.
    runs: ``label: (kind, hyper)``, e.g. ``{"adam": ("adam", 1e-3),
      "learned": ("learned", theta)}``.
    family: the task family (its tasks and data).
    keys: one key per task; every optimiser trains the same tasks.

  Returns:
    ``label:`` :func:`summarize_curves` of its run.
  """
  return {
      label: summarize_curves(*curves(kind, hyper, family, family.data,
                                      keys))
      for label, (kind, hyper) in runs.items()
  }


def verdict(summaries: dict[str, dict[str, Any]],
            learned: str = "learned") -> str:
  """One sentence: does ``learned`` beat the best baseline on the final
  held-out loss?"""
  baselines = [n for n in summaries if n != learned]
  best = min(baselines, key=lambda n: summaries[n]["final_held_out"])
  ours, theirs = (summaries[n]["final_held_out"] for n in (learned, best))
  word = "wins" if ours < theirs else "does not win"
  return (f"the learned optimiser {word} against {best} on the final "
          f"held-out loss ({ours:.4g} vs {theirs:.4g})")
