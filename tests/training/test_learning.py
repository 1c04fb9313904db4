"""Learning checks: short meta-training runs that must reach known accuracy.

Each run is sized to finish in about a minute on 2 CPU cores and to clear
its threshold by a margin (the measured numbers are in the comments; the
keys are fixed, so a run is deterministic on a given platform).
"""

import math

import jax
import optax
import pytest

from metalearn import metalearners, models, tasks, training

pytestmark = pytest.mark.slow

EVAL_KEY = jax.random.key(1234)


def _meta_train(
    learner, tx, sampler, *, num_steps, meta_batch_size, steps_per_call=1
):
  state, _ = training.meta_train(
      learner,
      tx,
      sampler,
      key=jax.random.key(0),
      num_steps=num_steps,
      meta_batch_size=meta_batch_size,
      steps_per_call=steps_per_call,
      log_every=num_steps,
      progress=False,
  )
  return state.meta_params


def _five_way_one_shot(dataset, train_queries):
  """5-way 1-shot samplers of ``dataset``'s training split (with
  ``train_queries`` per class) and test split (5 queries per class)."""
  train = tasks.episode_sampler(
      dataset.train, num_ways=5, num_shots=1, num_queries=train_queries
  )
  test = tasks.episode_sampler(
      dataset.test, num_ways=5, num_shots=1, num_queries=5
  )
  return train, test


def test_protonet_omniglot_5way_1shot(omniglot):
  """ProtoNet beats 90% on the Vinyals test split after 150 meta-steps.

  As in Snell et al., training episodes have more ways (20) than test
  episodes (5). Measured: 93.2% +- 0.9% (200 episodes), 30 s wall / 34 s
  CPU on the shared 2-core machine; 92.6% with another training seed.
  """
  train = tasks.episode_sampler(
      omniglot.train, num_ways=20, num_shots=1, num_queries=5
  )
  test = tasks.episode_sampler(
      omniglot.test, num_ways=5, num_shots=1, num_queries=5
  )
  learner = metalearners.protonet(models.conv4(None, features=32))
  meta_params = _meta_train(
      learner, optax.adam(3e-3), train, num_steps=150, meta_batch_size=2
  )
  result = training.evaluate(
      learner, meta_params, test, EVAL_KEY, num_episodes=200
  )
  assert result["outer/accuracy"] > 0.90, result


def test_maml_omniglot_5way_1shot(omniglot_finn):
  """Second-order MAML beats 90% on Finn et al.'s Omniglot test split.

  Finn et al.'s setting (stride-2 Conv-4, inner step 0.4, one inner step
  in training), with 24 filters and a short schedule: 800 meta-steps of 12
  tasks, Adam 5e-3, and 5 inner steps at meta-test time. Training is
  second order (it fits the budget). Measured: 92.3% +- 0.8% (400
  episodes), 73 s wall / 72 s CPU on the shared 2-core machine; in
  exploration with other seeds, 92% at 750 steps and 92.5% at 1000. On
  the Vinyals split (with rotations) the same schedule gets only ~90%.
  """
  train, test = _five_way_one_shot(omniglot_finn, train_queries=5)
  learner = metalearners.maml(
      models.conv4(5, features=24, downsample="stride"),
      inner_lr=0.4,
      num_inner_steps=1,
      eval_num_inner_steps=5,
  )
  meta_params = _meta_train(
      learner, optax.adam(5e-3), train, num_steps=800, meta_batch_size=12
  )
  result = training.evaluate(
      learner, meta_params, test, EVAL_KEY, num_episodes=400
  )
  assert result["outer/accuracy"] > 0.90, result


def test_imaml_omniglot_5way_1shot(omniglot_finn):
  """iMAML in its experiment files' form (the authors' code: pull-back
  inner loop, damped solve) lifts 5-way 1-shot accuracy from 36% to above
  60% on Finn et al.'s test split.

  A short schedule: 24 filters, 8 inner steps (16 in the experiment
  files), 200 meta-steps of 8 tasks, Adam 5e-3 with epsilon 1e-3.
  Measured: 64.8% +- 1.8% (200 episodes; 36.0% after one meta-step), 50 s
  wall on the shared 2-core machine; 68.7% after 400 meta-steps. The
  paper's form (proximal inner loop, undamped solve) reached 59.6% on the
  same schedule.
  """
  train, test = _five_way_one_shot(omniglot_finn, train_queries=1)
  learner = metalearners.imaml(
      models.conv4(5, features=24, downsample="stride"),
      inner_lr=0.1,
      num_inner_steps=8,
      reg=2.0,
      cg_steps=5,
      inner="pull_back",
      cg_damping=1.0,
      cg_reg_damping=10.0,
      eval_reg=0.0,
  )
  meta_params = _meta_train(
      learner, optax.adam(5e-3, eps=1e-3), train, num_steps=200,
      meta_batch_size=8,
  )
  result = training.evaluate(
      learner, meta_params, test, EVAL_KEY, num_episodes=200
  )
  assert result["outer/accuracy"] > 0.60, result


def test_maml_sinusoid_beats_pretrained_baseline():
  """After 10 inner steps on 10 shots, MAML's MSE is far below that of a
  regressor pretrained on all tasks and fine-tuned the same way.

  The baseline is meta-trained with zero inner steps, which is plain
  regression across tasks, and gets its best fine-tuning step size (with
  Finn et al.'s 0.01 its fine-tuning diverges on some tasks). Measured:
  MAML 0.34 +- 0.10, baseline 2.01 +- 0.53 (step 0.001), in 10 s.
  """
  sampler = tasks.sinusoid_sampler(num_shots=10, num_queries=10)

  def mse(meta_params, inner_lr):
    learner = metalearners.maml(
        models.mlp(), inner_lr, 0, eval_num_inner_steps=10
    )
    result = training.evaluate(
        learner, meta_params, sampler, EVAL_KEY, num_episodes=100
    )
    loss = result["outer/loss"]
    if not math.isfinite(loss):  # Some task's fine-tuning diverged.
      return math.inf, 0.0
    return loss, result["outer/loss_ci95"]

  def train(num_inner_steps):
    learner = metalearners.maml(models.mlp(), 0.01, num_inner_steps)
    return _meta_train(
        learner, optax.adam(1e-3), sampler, num_steps=5000,
        meta_batch_size=25, steps_per_call=100,
    )

  maml_mse, maml_ci = mse(train(1), 0.01)
  pretrained = train(0)
  base_mse, base_ci = min(mse(pretrained, lr) for lr in (0.01, 0.003, 0.001))
  assert maml_mse < 0.5 * base_mse, (maml_mse, base_mse)
  assert maml_mse + maml_ci < base_mse - base_ci, (maml_mse, base_mse)
