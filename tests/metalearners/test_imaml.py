"""iMAML: the implicit meta-gradient against exact ones on small problems."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metalearn import metalearners, models
from metalearn.types import Episode

NUM_IN, NUM_OUT = 3, 2


def _linear() -> models.Model:
  """A linear map ``x @ kernel + bias``: with squared error the support
  loss is quadratic in the parameters."""

  def init(key, x):
    del x
    k1, k2 = jax.random.split(key)
    return {"head": {
        "kernel": 0.5 * jax.random.normal(k1, (NUM_IN, NUM_OUT)),
        "bias": 0.1 * jax.random.normal(k2, (NUM_OUT,)),
    }}

  def apply(params, x):
    return x @ params["head"]["kernel"] + params["head"]["bias"]

  return models.Model(init, apply)


def _episode(classification: bool) -> Episode:
  # NumPy draws: eager jax.random calls would each compile.
  rng = np.random.default_rng(0)
  if classification:
    support_y = np.array([0, 1, 0, 1, 1, 0, 0, 1, 1, 0], np.int32)
    query_y = rng.integers(0, NUM_OUT, 7).astype(np.int32)
  else:
    support_y = rng.normal(size=(10, NUM_OUT)).astype(np.float32)
    query_y = rng.normal(size=(7, NUM_OUT)).astype(np.float32)
  return jax.tree.map(jnp.asarray, Episode(
      rng.normal(size=(10, NUM_IN)).astype(np.float32), support_y,
      rng.normal(size=(7, NUM_IN)).astype(np.float32), query_y))


def _losses(model, episode):
  """Flat parameters, their unravel, and the support and query losses of
  flat parameters."""
  theta = jax.jit(model.init)(jax.random.key(5), episode.support_x)
  flat, unravel = ravel_pytree(theta)

  def loss(x, y):
    return lambda f: metalearners.task_loss(model.apply(unravel(f), x), y)[0]

  return (theta, flat, unravel, loss(episode.support_x, episode.support_y),
          loss(episode.query_x, episode.query_y))


def _implicit_grad(learner, theta, episode):
  grads, _ = jax.jit(learner.meta_grad)(theta, episode, jax.random.key(0))
  return ravel_pytree(grads)[0]


REG = 1.0
STEPS = 60  # The inner problems below converge to float32 precision.
LR = 0.3


@functools.cache
def _closed_form_grad(reg):
  """The exact meta-gradient of the quadratic problem: the proximal
  solution is ``(H + reg I)^{-1} (reg theta - c)``."""
  model, episode = _linear(), _episode(classification=False)
  theta, flat, _, support, query = _losses(model, episode)

  @jax.jit
  def exact(flat):
    hessian = jax.hessian(support)(flat)
    c = jax.grad(support)(jnp.zeros_like(flat))

    def outer(th):
      eye = jnp.eye(flat.size)
      return query(jnp.linalg.solve(hessian + reg * eye, reg * th - c))

    return jax.grad(outer)(flat)

  return model, episode, theta, exact(flat)


def test_meta_grad_is_the_closed_form_on_a_quadratic_problem():
  model, episode, theta, exact = _closed_form_grad(REG)
  learner = metalearners.imaml(model, LR, STEPS, reg=REG,
                               cg_steps=exact.size)
  np.testing.assert_allclose(_implicit_grad(learner, theta, episode), exact,
                             atol=1e-5 * float(jnp.abs(exact).max()))


@pytest.mark.parametrize(
    "kwargs",
    [dict(reg=2.0), dict(cg_steps=1), dict(cg_damping=0.5),
     dict(cg_reg_damping=1.0), dict(inner="pull_back")],
    ids=["wrong_reg", "one_cg_step", "damped", "reg_damped", "pull_back"],
)
def test_other_settings_give_other_gradients(kwargs):
  model, episode, theta, exact = _closed_form_grad(REG)
  learner = metalearners.imaml(
      model, LR, STEPS, **{"reg": REG, "cg_steps": exact.size, **kwargs})
  got = _implicit_grad(learner, theta, episode)
  assert float(jnp.abs(got - exact).max()) > 1e-2 * float(
      jnp.abs(exact).max())


def test_meta_grad_matches_dense_solve_and_unrolled_steps():
  """Softmax regression (not quadratic): the implicit gradient against
  (I + H/reg)^{-1} g with a dense Hessian at the solution, and against
  differentiating through the inner steps (anchor included)."""
  model, episode = _linear(), _episode(classification=True)
  theta, flat, unravel, support, query = _losses(model, episode)
  learner = metalearners.imaml(model, LR, STEPS, reg=REG, cg_steps=flat.size)
  got = _implicit_grad(learner, theta, episode)

  @jax.jit
  def references(theta):
    phi = ravel_pytree(learner.adapt(theta, episode, None))[0]
    # The proximal problem is solved: its gradient vanishes at phi.
    stationarity = jax.grad(support)(phi) + REG * (phi - flat)
    system = jnp.eye(flat.size) + jax.hessian(support)(phi) / REG
    dense = jnp.linalg.solve(system, jax.grad(query)(phi))
    return stationarity, dense, jax.grad(query)(phi)

  stationarity, dense, first_order = references(theta)
  assert float(jnp.abs(stationarity).max()) < 1e-5
  np.testing.assert_allclose(got, dense, atol=1e-5)

  def unrolled(th):
    params = unravel(th)
    tx = optax.chain(metalearners.proximal(params, REG), optax.sgd(LR))
    adapted = metalearners.inner_optimize(
        model, tx, params, episode.support_x, episode.support_y,
        num_steps=STEPS).params
    return query(ravel_pytree(adapted)[0])

  np.testing.assert_allclose(got, jax.jit(jax.grad(unrolled))(flat),
                             atol=1e-5)
  # Not the first-order gradient at phi: the Hessian term counts.
  assert float(jnp.abs(got - first_order).max()) > 1e-3


def test_pull_back_is_the_authors_inner_loop_and_damped_solve():
  """``inner="pull_back"`` with ``cg_damping``, ``cg_reg_damping``: plain
  gradient descent, one step on the proximal term, and the meta-gradient
  ``((1 + d) I + H / (reg + m))^{-1} g`` at that point (a dense solve)."""
  model, episode = _linear(), _episode(classification=True)
  theta, flat, unravel, support, query = _losses(model, episode)
  lr, steps, damping, reg_damping = 0.1, 5, 1.0, 10.0
  learner = metalearners.imaml(
      model, lr, steps, reg=REG, cg_steps=flat.size, cg_damping=damping,
      cg_reg_damping=reg_damping, inner="pull_back")
  got = _implicit_grad(learner, theta, episode)

  @jax.jit
  def references(theta):
    adapted = ravel_pytree(learner.adapt(theta, episode, None))[0]
    plain = metalearners.inner_optimize(
        model, optax.sgd(lr), theta, episode.support_x, episode.support_y,
        num_steps=steps).params
    pulled = flat + (1.0 - lr * REG) * (ravel_pytree(plain)[0] - flat)
    system = ((1.0 + damping) * jnp.eye(flat.size)
              + jax.hessian(support)(pulled) / (REG + reg_damping))
    return adapted, pulled, jnp.linalg.solve(system, jax.grad(query)(pulled))

  adapted, pulled, dense = references(theta)
  np.testing.assert_allclose(adapted, pulled, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got, dense, atol=1e-6)
  # The proximal inner loop ends elsewhere.
  proximal = metalearners.imaml(model, lr, steps, reg=REG)
  assert not np.allclose(
      ravel_pytree(jax.jit(proximal.adapt)(theta, episode, None))[0], adapted)


def test_conjugate_gradient_solves_and_stops_at_negative_curvature():
  a = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
  b = {"u": jnp.array([1.0, -2.0]), "w": jnp.array([0.5])}
  flat_b, unravel = ravel_pytree(b)

  def matvec(v):
    return unravel(a @ ravel_pytree(v)[0])

  x = metalearners.conjugate_gradient(matvec, b, 3)
  np.testing.assert_allclose(ravel_pytree(x)[0], jnp.linalg.solve(a, flat_b),
                             rtol=1e-5)
  # Negative curvature along the first direction: no step is taken.
  x = metalearners.conjugate_gradient(lambda v: jax.tree.map(jnp.negative, v),
                                      b, 3)
  chex.assert_trees_all_equal(x, jax.tree.map(jnp.zeros_like, b))


def test_meta_test_adaptation_without_reg_is_gradient_descent():
  model, episode = _linear(), _episode(classification=True)
  theta = _losses(model, episode)[0]
  evals = dict(eval_inner_lr=0.5, eval_num_inner_steps=4)
  learners = (
      metalearners.imaml(model, 0.1, 3, reg=2.0, eval_reg=0.0, **evals),
      metalearners.maml(model, 0.1, 3, **evals),
      # With the proximal term the adapted weights stay nearer theta.
      metalearners.imaml(model, 0.1, 3, reg=2.0, **evals),
  )
  implicit, plain, pulled = jax.jit(lambda theta: [
      ravel_pytree(learner.adapt(theta, episode, None, training=False))[0]
      for learner in learners])(theta)
  np.testing.assert_allclose(implicit, plain, rtol=1e-6)
  assert not np.allclose(pulled, plain)


def _temp_bytes(learner, theta, episode):
  compiled = jax.jit(learner.meta_grad).lower(
      theta, episode, jax.random.key(0)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_inner_steps():
  model, episode = _linear(), _episode(classification=True)
  theta = _losses(model, episode)[0]
  temp = {
      (name, steps): _temp_bytes(make(model, 0.1, steps), theta, episode)
      for name, make in (("imaml", metalearners.imaml),
                         ("maml", metalearners.maml))
      for steps in (2, 20)
  }
  assert temp["imaml", 20] <= temp["imaml", 2], temp
  # Differentiating through the steps keeps each one's residuals.
  assert temp["maml", 20] > 2 * temp["maml", 2], temp


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(reg=0.0), "reg must be > 0"),
        (dict(eval_reg=-1.0), "eval_reg must be >= 0"),
        (dict(cg_steps=0), "cg_steps must be an int >= 1"),
        (dict(cg_damping=-0.1), "cg_damping must be >= 0"),
        (dict(cg_reg_damping=-1.0), "cg_reg_damping must be >= 0"),
        (dict(inner="newton"), "inner must be one of"),
        (dict(inner_lr=0.0), "inner_lr must be > 0"),
    ],
    ids=["reg", "eval_reg", "cg_steps", "cg_damping", "cg_reg_damping",
         "inner", "inner_lr"],
)
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    metalearners.imaml(_linear(), **kwargs)
