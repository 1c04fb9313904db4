"""Learned optimisers as optax transformations: values, properties, and
composition with optax.chain under jit and vmap."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metalearn import learned_optimizers as lo

OPTIMIZERS = {
    "lstm": lambda: lo.lstm_optimizer(hidden_size=8),
    "mlp": lambda: lo.mlp_optimizer(hidden_sizes=(8, 8)),
    "mlp_adam": lambda: lo.mlp_optimizer(hidden_sizes=(8, 8), adam_lr=0.1),
    "meta_lstm": lambda: lo.meta_lstm_optimizer(0.1),
    "sgd": lambda: lo.learnable_sgd(0.1),
}
_NAMES = sorted(OPTIMIZERS)


def _params_and_grads(key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = {"w": jax.random.normal(k1, (4, 3)),
            "b": jax.random.normal(k2, (3,))}
  grads = {"w": jax.random.normal(k3, (4, 3)),
           "b": jax.random.normal(k4, (3,))}
  return params, grads


def test_log_sign_features_match_the_paper():
  p = 10.0
  x = jnp.array([2.0, -3e-3, 1e-6, -1e-6, 0.0])
  got = np.asarray(lo.log_sign_features(x, p))
  small = math.exp(p)
  expected = [
      [math.log(2.0) / p, 1.0],
      [math.log(3e-3) / p, -1.0],
      [-1.0, small * 1e-6],  # below e^-p = 4.5e-5: the linear branch
      [-1.0, -small * 1e-6],
      [-1.0, 0.0],
  ]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grad = jax.grad(lambda x: lo.log_sign_features(x, p).sum())(x)
  chex.assert_tree_all_finite(grad)


def test_learnable_sgd_is_sgd():
  params, grads = _params_and_grads(jax.random.key(0))
  lopt = lo.learnable_sgd(0.3)
  tx = lopt.opt_fn(lopt.init(jax.random.key(1)))
  got, _ = tx.update(grads, tx.init(params), params)
  want, _ = optax.sgd(0.3).update(grads, optax.sgd(0.3).init(params))
  chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_meta_lstm_update_is_the_lstm_cell_formula():
  lopt = lo.meta_lstm_optimizer(0.2, 4.0)
  theta = lopt.init(jax.random.key(0))
  tx = lopt.opt_fn(theta)
  phi = jnp.array([0.5, -1.0, 2.0])
  g = jnp.array([0.1, -2.0, 1e-7])
  loss = 1.7
  state = tx.init(phi)
  updates, state = jax.jit(tx.update)(g, state, phi, value=loss)

  pre_g = lo.log_sign_features(g)
  pre_l = jnp.broadcast_to(lo.log_sign_features(jnp.asarray(loss)), (3, 2))
  x = jnp.concatenate([pre_g, pre_l, phi[:, None], jnp.zeros((3, 1))], -1)
  i = jax.nn.sigmoid(x @ theta.w_input + theta.b_input)
  f = jax.nn.sigmoid(x @ theta.w_forget + theta.b_forget)
  np.testing.assert_allclose(phi + updates, f * phi - i * g, rtol=1e-6)
  np.testing.assert_allclose(state.input_gate, i, rtol=1e-6)
  np.testing.assert_allclose(state.forget_gate, f, rtol=1e-6)
  # The initial gates are the ones asked for.
  np.testing.assert_allclose(jax.nn.sigmoid(theta.b_input), 0.2, rtol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "mlp"])
def test_update_is_equivariant_to_permuting_coordinates(name):
  """One network shared by all coordinates: permuting the coordinates of a
  tensor permutes its updates (the MLP's per-tensor normalisation is
  permutation-invariant)."""
  lopt = OPTIMIZERS[name]()
  tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
  params, grads = _params_and_grads(jax.random.key(1))
  perm = jax.random.permutation(jax.random.key(2), 12)

  def permute(tree):
    return {**tree, "w": tree["w"].reshape(-1)[perm].reshape(4, 3)}

  @jax.jit
  def two_steps(params, grads):
    state = tx.init(params)
    u1, state = tx.update(grads, state, params)
    u2, _ = tx.update(jax.tree.map(lambda g: -0.5 * g, grads), state, params)
    return u1, u2

  plain = two_steps(params, grads)
  permuted = two_steps(permute(params), permute(grads))
  chex.assert_trees_all_close(
      permuted, tuple(permute(u) for u in plain), rtol=1e-5, atol=1e-7
  )


def test_mlp_optimizer_steps_along_its_direction_output():
  """With the last layer's weights zeroed, the direction and magnitude are
  the last biases: every coordinate moves by -d exp(a exp_mult) step_mult."""
  lopt = lo.mlp_optimizer(hidden_sizes=(8,), step_mult=0.01, exp_mult=0.5)
  theta = lopt.init(jax.random.key(0))
  weights = theta.weights[:-1] + (jnp.zeros_like(theta.weights[-1]),)
  biases = theta.biases[:-1] + (jnp.array([2.0, 1.0]),)
  tx = lopt.opt_fn(lo.MLPOptimizerParams(weights, biases))
  params, grads = _params_and_grads(jax.random.key(1))
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  expected = -2.0 * math.exp(0.5) * 0.01
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(u, expected, rtol=1e-5)
  # The accumulators hold the first moments of the gradient.
  beta = jnp.array([0.5, 0.9, 0.99, 0.999])[:, None]
  flat = ravel_pytree(grads)[0]
  np.testing.assert_allclose(state.mu, (1 - beta) * flat, rtol=1e-6)
  np.testing.assert_allclose(state.nu, (1 - beta) * flat**2, rtol=1e-6)


def test_mlp_optimizer_with_adam_lr_starts_as_adam():
  """Before meta-training the residual form is Adam itself, step for step;
  moving the output layer changes the steps."""
  lopt = lo.mlp_optimizer(hidden_sizes=(8,), adam_lr=0.05, exp_mult=1.0)
  theta = lopt.init(jax.random.key(0))
  params, _ = _params_and_grads(jax.random.key(1))
  loss = lambda p: jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["b"] ** 2)  # noqa: E731

  def run(tx):
    p, state = params, tx.init(params)
    for _ in range(5):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return p

  chex.assert_trees_all_close(run(lopt.opt_fn(theta)),
                              run(optax.adam(0.05)), rtol=1e-5, atol=1e-5)
  biases = theta.biases[:-1] + (jnp.array([0.0, 1.0]),)
  faster = run(lopt.opt_fn(theta._replace(biases=biases)))
  chex.assert_trees_all_close(faster, run(optax.adam(0.05 * math.e)),
                              rtol=1e-5, atol=1e-5)


@functools.cache
def _chained_run(name):
  """An inner loop driven by ``chain(clip, lopt)``, jitted and vmapped over
  the targets of a batch of quadratic problems."""
  lopt = OPTIMIZERS[name]()
  theta = lopt.init(jax.random.key(0))

  def run(theta, target):
    tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.opt_fn(theta))

    def loss_fn(params):
      return 0.5 * jnp.sum((params["w"] - target) ** 2)

    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params, value=loss)
      return (optax.apply_updates(params, updates), state), loss

    params = {"w": jnp.zeros(3)}
    _, losses = jax.lax.scan(step, (params, tx.init(params)), None, length=5)
    return losses

  targets = jax.random.normal(jax.random.key(1), (4, 3))
  batched = jax.jit(jax.vmap(run, in_axes=(None, 0)))(theta, targets)
  single = jax.jit(run)(theta, targets[2])
  return batched, single


@pytest.mark.parametrize("name", _NAMES)
def test_composes_with_chain_under_jit_and_vmap(name):
  batched, single = _chained_run(name)
  chex.assert_shape(batched, (4, 5))
  chex.assert_tree_all_finite(batched)
  np.testing.assert_allclose(batched[2], single, rtol=1e-5, atol=1e-6)
  # The optimiser moved the parameters: the losses change along the run.
  assert float(jnp.max(jnp.abs(jnp.diff(batched, axis=1)))) > 0.0


@pytest.mark.parametrize(
    "make,kwargs",
    [
        pytest.param(lo.lstm_optimizer, {"hidden_size": 0}, id="lstm-hidden"),
        pytest.param(lo.mlp_optimizer, {"decays": (1.0,)}, id="mlp-decays"),
        pytest.param(lo.mlp_optimizer, {"step_mult": 0.0}, id="mlp-step"),
        pytest.param(lo.mlp_optimizer, {"adam_lr": 0.0}, id="mlp-adam-lr"),
        pytest.param(lo.mlp_optimizer,
                     {"adam_decays": (0.9, 0.95), "adam_lr": 0.1},
                     id="mlp-adam-decays"),
        pytest.param(lo.meta_lstm_optimizer, {"init_lr": 1.5}, id="mlstm-lr"),
        pytest.param(lo.learnable_sgd, {"init_lr": -1.0}, id="sgd-lr"),
    ],
)
def test_bad_arguments_name_the_field(make, kwargs):
  field = next(iter(kwargs))
  with pytest.raises(ValueError, match=field):
    make(**kwargs)
