"""Meta-gradient estimators: gradients flow through the unroll, truncated
backprop is exact over a whole horizon, PES is unbiased where truncated ES
is not, and particles persist and reset correctly."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import learned_optimizers as lo
from metalearn import models, tasks

# ---------------------------------------------------------------------------
# A problem whose meta-gradient is known in closed form.
#
# The inner "optimiser" adds a learned constant step: x_{t+1} = x_t - theta,
# from x_0 = 0, on the loss 0.5 |x - b|^2. The meta-objective of a task is
# the sum over its K truncations of the mean loss after each step, and
# x_t = -sum_{s<t} theta_s is linear in the per-step thetas, so the loss is
# quadratic in them. Gaussian smoothing of a quadratic only adds a constant,
# so the gradient of PES's smoothed objective (each truncation perturbed
# independently) is the plain gradient:
#     d/dtheta sum_k mean_{t in k} 0.5 |t theta + b|^2
#         = sum_k mean_{t in k} t (t theta + b).
# ---------------------------------------------------------------------------

TARGET = jnp.array([1.0, -2.0, 0.5])
THETA = jnp.array([0.3, -0.1, 0.2])
TRUNCATION, HORIZON = 2, 6


def _constant_step() -> lo.LearnedOptimizer:
  def opt_fn(theta):
    def update(updates, state, params=None, **extra):
      del params, extra
      return jax.tree.map(lambda _: -theta, updates), state

    return optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), update
    )

  return lo.LearnedOptimizer(lambda key: THETA, opt_fn)


def _quadratic_family() -> lo.TaskFamily:
  return lo.TaskFamily(
      sample=lambda key, data: TARGET,
      init=lambda key, task: jnp.zeros(3),
      loss=lambda x, task, key: 0.5 * jnp.sum((x - task) ** 2),
      eval_loss=lambda x, task: 0.5 * jnp.sum((x - task) ** 2),
      data=None,
  )


def _quadratic_unroll(truncation=TRUNCATION):
  return lo.truncated_unroll(
      _quadratic_family(), _constant_step(),
      truncation_length=truncation, horizon=HORIZON,
  )


def _true_gradient(theta):
  t = jnp.arange(1, HORIZON + 1, dtype=jnp.float32)[:, None]
  per_step = t * (t * theta + TARGET)  # d/dtheta 0.5 |-t theta - b|^2
  return per_step.sum(0) / TRUNCATION


@functools.cache
def _es_samples(persistent: bool, num_pairs: int, num_repeats: int):
  """Independent whole-task ES estimates (sum over the truncations of one
  task), each averaging ``num_pairs`` antithetic pairs: ``[repeats, 3]``."""
  make = lo.pes if persistent else lo.truncated_es
  estimator = make(_quadratic_unroll(), num_pairs=num_pairs, sigma=0.1,
                   stagger=False)

  def whole_task(key):
    state = estimator.init(THETA, jax.random.fold_in(key, 1000), None)
    total = jnp.zeros(3)
    for k in range(HORIZON // TRUNCATION):
      grads, state, _ = estimator.grad(
          THETA, state, jax.random.fold_in(key, k), None
      )
      total = total + grads
    return total

  keys = jax.random.split(jax.random.key(0), num_repeats)
  return np.asarray(jax.jit(jax.vmap(whole_task))(keys))


def test_truncated_backprop_over_the_whole_horizon_is_exact():
  estimator = lo.truncated_backprop(
      _quadratic_unroll(truncation=HORIZON), num_particles=2, stagger=False
  )
  state = estimator.init(THETA, jax.random.key(0), None)
  grads, _, _ = jax.jit(estimator.grad)(THETA, state, jax.random.key(1),
                                        None)
  # The truncation's meta-loss is a mean over HORIZON steps, not a sum over
  # truncations of means: rescale the closed form accordingly.
  expected = _true_gradient(THETA) * TRUNCATION / HORIZON
  np.testing.assert_allclose(grads, expected, rtol=1e-5)


@pytest.mark.parametrize("num_pairs", [64, 1024])
def test_pes_is_unbiased_on_a_quadratic(num_pairs):
  samples = _es_samples(True, num_pairs, 32)
  mean = samples.mean(0)
  # The standard error of the mean of the repeats shrinks as
  # 1 / sqrt(num_pairs * repeats); allow five of them per coordinate.
  stderr = samples.std(0, ddof=1) / np.sqrt(len(samples))
  true = np.asarray(_true_gradient(THETA))
  np.testing.assert_array_less(np.abs(mean - true), 5 * stderr + 1e-6)
  assert np.all(stderr < 0.05 * np.abs(true).max()), stderr


def test_standard_error_shrinks_with_the_number_of_pairs():
  small = _es_samples(True, 64, 32).std(0, ddof=1)
  large = _es_samples(True, 1024, 32).std(0, ddof=1)
  # sqrt(1024 / 64) = 4: allow sampling noise in the estimated spreads.
  np.testing.assert_array_less(large, small / 2.5)


def test_truncated_es_is_biased_on_the_same_problem():
  """Without the accumulated perturbations, the estimator misses how
  earlier truncations' theta shaped later losses: a check that the PES
  test above can fail."""
  samples = _es_samples(False, 1024, 32)
  stderr = samples.std(0, ddof=1) / np.sqrt(len(samples))
  error = np.abs(samples.mean(0) - np.asarray(_true_gradient(THETA)))
  assert np.any(error > 20 * stderr), (error, stderr)


def test_pes_forgets_perturbations_when_a_task_resets():
  """At the horizon, a pair's task restarts, and so does its memory: the
  truncation after the reset gives exactly what a fresh pair gives."""
  estimator = lo.pes(_quadratic_unroll(), num_pairs=3, sigma=0.1,
                     stagger=False)
  grad = jax.jit(estimator.grad)
  state = estimator.init(THETA, jax.random.key(0), None)
  sums = []
  for k in range(HORIZON // TRUNCATION):
    _, state, _ = grad(THETA, state, jax.random.key(k), None)
    sums.append(state.accumulated)
  np.testing.assert_array_equal(state.positive.step, [HORIZON] * 3)
  # Within a task, xi keeps growing (a sum of independent perturbations).
  assert not np.allclose(sums[0], sums[-1])
  after_key = jax.random.key(HORIZON // TRUNCATION)
  got = grad(THETA, state, after_key, None)
  fresh = estimator.init(THETA, jax.random.key(99), None)
  want = grad(THETA, fresh, after_key, None)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got[1].positive.step, [TRUNCATION] * 3)


# ---------------------------------------------------------------------------
# Bootstrapped meta-gradients in closed form.
#
# Inner loss f(x) = 0.5 a |x|^2 (a drawn per task), optimiser x <- x -
# theta grad f = (1 - theta a) x. From the carried x_0, K steps give
# x_K = r^K x_0 with r = 1 - theta a; the target, L more steps and a
# gradient step of alpha, is (1 - alpha a) r^L x_K, held constant; so
#     d/dtheta 0.5 |target - x_K|^2 = (target - x_K) . K a r^(K-1) x_0.
# ---------------------------------------------------------------------------


def _learned_step_sgd() -> lo.LearnedOptimizer:
  def opt_fn(theta):
    return optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(),
        lambda g, s, params=None, **extra: (
            jax.tree.map(lambda u: -theta * u, g), s))

  return lo.LearnedOptimizer(lambda key: jnp.asarray(0.3), opt_fn)


def _curvature_family() -> lo.TaskFamily:
  def loss(x, a, key):
    del key
    return 0.5 * a * jnp.sum(x**2)

  return lo.TaskFamily(
      sample=lambda key, data: jax.random.uniform(key, (), minval=0.5,
                                                  maxval=2.0),
      init=lambda key, a: jax.random.normal(key, (3,)),
      loss=loss,
      eval_loss=lambda x, a: loss(x, a, None),
      data=None,
  )


def _bmg(truncation, steps, target_lr, num_particles=4):
  unroll = lo.truncated_unroll(_curvature_family(), _learned_step_sgd(),
                               truncation_length=truncation,
                               horizon=4 * truncation)
  return lo.bootstrapped(unroll, num_particles=num_particles,
                         bootstrap_steps=steps, target_lr=target_lr,
                         stagger=False)


def _bmg_closed_form(theta, a, x0, k, steps, alpha, stop_gradient=True):
  """The mean over particles (``a [P]``, ``x0 [P, 3]``) of the BMG
  gradient; without ``stop_gradient``, the full derivative of the
  matching loss, target included (what BMG must not compute)."""
  a = a[:, None]
  held = jax.lax.stop_gradient if stop_gradient else (lambda v: v)

  def matching(theta):
    x_k = (1 - theta * a) ** k * x0
    target = (1 - alpha * a) * (1 - held(theta) * a) ** steps * held(x_k)
    return jnp.mean(0.5 * jnp.sum((target - x_k) ** 2, axis=1))

  return jax.grad(matching)(theta)


@pytest.mark.parametrize("k,steps,alpha", [(1, 1, 0.1), (2, 3, 0.0),
                                           (3, 0, 0.5), (1, 2, None)],
                         ids=["K1-L1", "K2-L3-no-step", "K3-L0", "K1-L2"])
def test_bootstrapped_gradient_matches_the_closed_form(k, steps, alpha):
  estimator = _bmg(k, steps, alpha)
  theta = jnp.asarray(0.3)
  state = estimator.init(theta, jax.random.key(0), None)
  grad = jax.jit(estimator.grad)
  a, x0 = state.task, state.params
  grads, state, metrics = grad(theta, state, jax.random.key(1), None)
  alpha = alpha or 0.0
  want = _bmg_closed_form(theta, a, x0, k, steps, alpha)
  # The explicit formula of the header, as a check on the one above.
  r = 1 - theta * a[:, None]
  x_k = r**k * x0
  target = (1 - alpha * a[:, None]) * r**steps * x_k
  explicit = jnp.mean(jnp.sum((target - x_k) * k * a[:, None]
                              * r ** (k - 1) * x0, axis=1))
  np.testing.assert_allclose(want, explicit, rtol=1e-5)
  np.testing.assert_allclose(grads, want, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["matching"],
      jnp.mean(0.5 * jnp.sum((target - x_k) ** 2, axis=1)), rtol=1e-5)
  # The particles carry on from x_K, not from the target.
  np.testing.assert_allclose(state.params, x_k, rtol=1e-6)
  np.testing.assert_array_equal(state.step, [k] * 4)
  # ... and the next truncation starts from there.
  grads, _, _ = grad(theta, state, jax.random.key(2), None)
  np.testing.assert_allclose(
      grads, _bmg_closed_form(theta, a, x_k, k, steps, alpha), rtol=1e-5)


def test_bootstrapped_target_is_held_constant():
  """Differentiating through the target too gives a different gradient
  (here even of the opposite sign): the test above would catch it."""
  theta = jnp.asarray(0.3)
  estimator = _bmg(1, 1, 0.1)
  state = estimator.init(theta, jax.random.key(0), None)
  grads, _, _ = estimator.grad(theta, state, jax.random.key(1), None)
  full = _bmg_closed_form(theta, state.task, state.params, 1, 1, 0.1,
                          stop_gradient=False)
  assert abs(float(grads - full)) > 0.5 * abs(float(grads)), (grads, full)


# ---------------------------------------------------------------------------
# Real learned optimisers on a small task family.
# ---------------------------------------------------------------------------

LOPTS = {
    "lstm": lambda: lo.lstm_optimizer(hidden_size=4),
    "mlp": lambda: lo.mlp_optimizer(hidden_sizes=(4, 4)),
    "meta_lstm": lambda: lo.meta_lstm_optimizer(0.01),
}


def _sinusoid_family():
  return lo.model_task_family(
      models.mlp(hidden=(4,)),
      tasks.sinusoid_sampler(num_shots=6, num_queries=4),
      batch_size=3,
  )


@pytest.mark.parametrize("name", sorted(LOPTS))
def test_meta_gradient_flows_through_the_unroll(name):
  lopt = LOPTS[name]()
  unroll = lo.truncated_unroll(_sinusoid_family(), lopt,
                               truncation_length=3, horizon=6)
  estimator = lo.truncated_backprop(unroll, num_particles=2)
  theta = lopt.init(jax.random.key(0))

  @jax.jit
  def two_truncations(theta, key):
    state = estimator.init(theta, key, None)
    _, state, _ = estimator.grad(theta, state, jax.random.fold_in(key, 1),
                                 None)
    return estimator.grad(theta, state, jax.random.fold_in(key, 2), None)

  grads, state, metrics = two_truncations(theta, jax.random.key(1))
  chex.assert_trees_all_equal_structs(grads, theta)
  chex.assert_tree_all_finite((grads, metrics))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0.0, f"zero meta-gradient at {path}"
  # The particles carried their inner runs across the truncations.
  assert np.all(np.asarray(state.step) > 0)


def test_outer_step_is_deterministic_and_resumable():
  lopt = lo.learnable_sgd(0.01)
  unroll = lo.truncated_unroll(_sinusoid_family(), lopt,
                               truncation_length=2, horizon=4)
  estimator = lo.pes(unroll, num_pairs=2)
  tx = optax.adam(1e-2)
  step = lo.make_outer_step(estimator, tx)
  two = lo.make_outer_step(estimator, tx, steps_per_call=2)
  key = jax.random.key(1)

  def fresh():
    return lo.init_outer_state(lopt, estimator, tx, jax.random.key(0))

  one_by_one, _ = step(step(fresh(), None, key)[0], None, key)
  at_once, _ = two(fresh(), None, key)
  chex.assert_trees_all_close(one_by_one, at_once, rtol=1e-6)
  assert int(at_once.step) == 2
  # outer_train stops at the total, and a resumed run ends where an
  # uninterrupted one does.
  full, history = lo.outer_train(step, fresh(), key=key, num_steps=3)
  assert [h["step"] for h in history] == [1, 2, 3]
  half, _ = lo.outer_train(step, fresh(), key=key, num_steps=1)
  resumed, rest = lo.outer_train(step, half, key=key, num_steps=3)
  assert [h["step"] for h in rest] == [2, 3]
  chex.assert_trees_all_close(full, resumed, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        pytest.param({"truncation_length": 0, "horizon": 4},
                     "truncation_length", id="truncation"),
        pytest.param({"truncation_length": 3, "horizon": 4},
                     "horizon", id="not-a-multiple"),
        pytest.param({"truncation_length": 2, "horizon": 4,
                      "objective": "test"}, "objective", id="objective"),
    ],
)
def test_bad_unroll_arguments_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    lo.truncated_unroll(_sinusoid_family(), lo.learnable_sgd(), **kwargs)


def test_bad_estimator_arguments_name_the_field():
  unroll = _quadratic_unroll()
  with pytest.raises(ValueError, match="num_pairs"):
    lo.pes(unroll, num_pairs=0)
  with pytest.raises(ValueError, match="sigma"):
    lo.pes(unroll, num_pairs=1, sigma=0.0)
  with pytest.raises(ValueError, match="num_particles"):
    lo.truncated_backprop(unroll, num_particles=0)
  with pytest.raises(ValueError, match="bootstrap_steps"):
    lo.bootstrapped(unroll, num_particles=1, bootstrap_steps=-1)
  with pytest.raises(ValueError, match="target_lr"):
    lo.bootstrapped(unroll, num_particles=1, target_lr=-0.1)
  with pytest.raises(ValueError, match="bootstrap_steps=0 and no target_lr"):
    lo.bootstrapped(unroll, num_particles=1, bootstrap_steps=0,
                    target_lr=None)
  with pytest.raises(ValueError, match="matching"):
    lo.bootstrapped(unroll, num_particles=1, matching="kl")
  with pytest.raises(ValueError, match="advance"):
    lo.bootstrapped(unroll._replace(advance=None), num_particles=1)


@pytest.mark.parametrize("name", lo.ESTIMATORS)
def test_make_estimator_is_the_named_estimator(name):
  unroll = _quadratic_unroll()
  made = lo.make_estimator(name, unroll, pes_pairs=2, sigma=0.1,
                           tbptt_particles=2, bmg_particles=2, bmg_steps=3,
                           bmg_target_lr=0.1)
  direct = {
      "pes": lambda: lo.pes(unroll, num_pairs=2, sigma=0.1),
      "tbptt": lambda: lo.truncated_backprop(unroll, num_particles=2),
      "bmg": lambda: lo.bootstrapped(unroll, num_particles=2,
                                     bootstrap_steps=3, target_lr=0.1),
  }[name]()
  key = jax.random.key(0)
  got = made.grad(THETA, made.init(THETA, key, None), key, None)
  want = direct.grad(THETA, direct.init(THETA, key, None), key, None)
  chex.assert_trees_all_close(got, want)


def test_make_estimator_rejects_an_unknown_name():
  with pytest.raises(ValueError, match="one of bmg, pes, tbptt, got 'es'"):
    lo.make_estimator("es", _quadratic_unroll())
