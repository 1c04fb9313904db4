"""Gradient-based adaptation warns about running batch-norm statistics.

Adapting at meta-test on the stored statistics after meta-training on
batch statistics makes MAML fail (benchmarks/README.md, Omniglot table),
so building an adaptation learner on such a model warns; ProtoNet, which
does not adapt weights, and models without running statistics do not.
"""

import warnings

import jax
import numpy as np
import pytest

from metalearn import metalearners, models, tasks
from metalearn.learned_optimizers import meta_lstm
from metalearn.metalearners import RUNNING_NORM_WARNING
from metalearn.types import ClassPool

ADAPTERS = {
    "maml": lambda m: metalearners.maml(m, 0.4),
    "anil": lambda m: metalearners.anil(m, 0.4),
    "metasgd": lambda m: metalearners.metasgd(m, 0.4),
    "meta_lstm": lambda m: meta_lstm(m, 1),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adaptation_learner_warns_on_running_norm(name):
  model = models.conv4(5, features=4, norm="running")
  with pytest.warns(UserWarning, match="running batch-norm") as record:
    ADAPTERS[name](model)
  assert str(record[0].message) == RUNNING_NORM_WARNING


@pytest.mark.parametrize("norm", ["transductive", "none"])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_no_warning_without_running_statistics(name, norm):
  model = models.conv4(5, features=4, norm=norm)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ADAPTERS[name](model)


def test_protonet_with_running_norm_does_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    metalearners.protonet(models.conv4(None, features=4, norm="running"))


# norm="support": the queries normalised with the support set's statistics,
# the same in meta-training and at test, nothing carried.

# ANIL and Meta-SGD share MAML's adaptation learner (and the conformance
# suite's independence cases); Reptile and ProtoNet have their own code.
SUPPORT_LEARNERS = {
    "maml": lambda m: metalearners.maml(m, 0.4, 2),
    "reptile": lambda m: metalearners.reptile(m, 0.1, num_inner_steps=2),
    "protonet": lambda m: metalearners.protonet(m),
}


def _episode():
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 28, 28, 1),
                                             dtype=np.uint8)
  pool = ClassPool(images, np.arange(6, dtype=np.int32))
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=2,
                                  num_queries=2)
  return sampler.sample(jax.random.key(0), pool)


@pytest.mark.parametrize("name", sorted(SUPPORT_LEARNERS))
def test_support_norm_learners_carry_nothing_and_train_as_they_test(name):
  """Nothing is carried, and the query loss of meta-training equals the
  one of meta-test adaptation and evaluation (the same normalisation in
  both; MAML-family step sizes and step counts are the same in both)."""
  embed = name == "protonet"
  model = models.conv4(None if embed else 3, features=4, norm="support",
                       num_blocks=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    learner = SUPPORT_LEARNERS[name](model)
  ep = _episode()
  key = jax.random.key(3)
  params = jax.jit(learner.init)(jax.random.key(1), ep)
  assert not isinstance(params, metalearners.WithModelState)
  assert learner.carried is None
  assert not learner.transductive
  adapt = jax.jit(learner.adapt, static_argnames="training")
  task_params = adapt(params, ep, key, training=False)
  assert isinstance(task_params, metalearners.WithModelState)
  test_loss, _ = jax.jit(learner.evaluate)(params, task_params, ep)
  _, metrics = jax.jit(learner.meta_grad)(params, ep, key)
  if name != "reptile":  # Reptile's meta-test adaptation has its own steps.
    np.testing.assert_allclose(metrics["outer/loss"], test_loss, rtol=2e-5)
  # A query's outputs do not depend on the other queries. Up to float
  # rounding: XLA:CPU may pick other kernels for a batch of 1 on some
  # CPUs; normalising with the queries' statistics would move the outputs
  # by orders of magnitude more.
  predict = jax.jit(learner.predict)
  full = predict(params, task_params, ep.query_x)
  alone = predict(params, task_params, ep.query_x[:1])
  np.testing.assert_allclose(full[:1], alone, rtol=1e-5, atol=1e-6)


def test_support_norm_meta_gradient_flows_through_the_statistics():
  """The queries' normalisation is differentiated through: the MAML
  meta-gradient differs from one that holds the support statistics
  constant."""
  model = models.conv4(3, features=4, norm="support", num_blocks=1)
  ep = _episode()
  learner = metalearners.maml(model, 0.4, 1)
  params = jax.jit(learner.init)(jax.random.key(1), ep)
  grads, _ = jax.jit(learner.meta_grad)(params, ep, jax.random.key(2))

  def held(params):
    task = learner.adapt(params, ep, jax.random.key(2))
    task = task._replace(model_state=jax.lax.stop_gradient(task.model_state))
    return learner.evaluate(params, task, ep)[0]

  constant = jax.jit(jax.grad(held))(params)
  diff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), grads, constant)))
  assert diff > 1e-6
