"""Comparing optimisers on held-out tasks: every optimiser trains the same
tasks, summaries are geometric means, tuning picks the best rate."""

import jax
import numpy as np
import pytest

from metalearn import learned_optimizers as lo
from metalearn import models, tasks

STEPS = 5


@pytest.fixture(scope="module")
def setup():
  sinusoid = tasks.get_tasksets("sinusoid", num_ways=None, num_shots=6,
                                num_queries=4)
  family = lo.model_task_family(models.mlp(hidden=(8,)), sinusoid.train,
                                batch_size=3)
  lopt = lo.learnable_sgd(0.05)
  curves = lo.loss_curves(lopt, num_steps=STEPS)
  keys = jax.random.split(jax.random.key(0), 4)
  return family, lopt, curves, keys


def test_compare_runs_every_optimiser_on_the_same_tasks(setup):
  family, lopt, curves, keys = setup
  theta = lopt.init(jax.random.key(1))  # SGD at 0.05, learnable
  summaries = lo.compare(
      curves, {"sgd": ("sgd", 0.05), "learned": ("learned", theta),
               "adam": ("adam", 0.01)}, family, keys)
  assert set(summaries) == {"sgd", "learned", "adam"}
  # The learned SGD is SGD at the same rate: same tasks, same curves.
  np.testing.assert_allclose(summaries["learned"]["curve_train"],
                             summaries["sgd"]["curve_train"], rtol=1e-5)
  log_train, _ = curves("adam", 0.01, family, family.data, keys)
  assert len(summaries["adam"]["curve_train"]) == STEPS + 1
  np.testing.assert_allclose(
      summaries["adam"]["final_train"],
      np.exp(np.asarray(log_train)[:, -1].mean()), rtol=1e-6)


def test_tuning_picks_the_rate_with_the_lowest_final_training_loss(setup):
  family, _, curves, keys = setup
  tuned, table = lo.tune_learning_rates(curves, family, keys, [1e-4, 0.05])
  for kind, finals in table.items():
    assert tuned[kind] == min(finals, key=finals.get)
  with pytest.raises(ValueError, match="positive"):
    lo.tune_learning_rates(curves, family, keys, [0.0])


def test_verdict_names_the_best_baseline():
  summaries = {"adam": {"final_held_out": 2.0},
               "sgd": {"final_held_out": 3.0},
               "learned": {"final_held_out": 1.0}}
  assert lo.verdict(summaries).startswith(
      "the learned optimiser wins against adam")
