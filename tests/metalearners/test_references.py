"""Meta-learners checked against numbers computed independently by hand.

The references are closed forms on linear least squares, where the inner
loop and its Jacobian are explicit, computed in NumPy float64; the learners
run in float64 too (``jax.enable_x64``). Only linear and MLP models are used
here: convolutional models are checked in ``tests/models``.
"""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training
from metalearn.metalearners import MetaSGDParams, ReptileParams
from metalearn.types import Episode

DIM = 3


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _linear_model() -> models.Model:
  """``y = x @ w``, with ``w`` under ``"head"`` like the library's models."""

  def init(key, x):
    w = jax.random.normal(key, (x.shape[-1], 1), x.dtype)
    return {"head": {"kernel": w}}

  def apply(params, x):
    return x @ params["head"]["kernel"]

  return models.Model(init, apply)


def _regression_episode(seed, num_shots=5, num_queries=7) -> Episode:
  rng = np.random.default_rng(seed)
  true_w = rng.normal(size=(DIM, 1))

  def data(n):
    x = rng.normal(size=(n, DIM))
    return x, x @ true_w + 0.1 * rng.normal(size=(n, 1))

  return Episode(*data(num_shots), *data(num_queries))


def _as_jax(episode: Episode) -> Episode:
  return jax.tree.map(jnp.asarray, episode)


# Least squares in NumPy: L(w) = mean((x w - y)^2) over the n points.
def _grad(w, x, y):
  return 2.0 / len(x) * x.T @ (x @ w - y)


def _hessian(x):
  return 2.0 / len(x) * x.T @ x


def _sgd(w, x, y, lr, num_steps):
  for _ in range(num_steps):
    w = w - lr * _grad(w, x, y)
  return w


def _kernel(params):
  return np.asarray(params["head"]["kernel"])


@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_maml_meta_gradient_matches_closed_form(x64, first_order, num_steps):
  lr = 0.1
  ep = _regression_episode(0)
  learner = metalearners.maml(
      _linear_model(), lr, num_steps, first_order=first_order
  )
  params = learner.init(jax.random.key(0), _as_jax(ep))
  grads, metrics = jax.jit(learner.meta_grad)(
      params, _as_jax(ep), jax.random.key(1)
  )
  w = _kernel(params)
  adapted = _sgd(w, ep.support_x, ep.support_y, lr, num_steps)
  query_grad = _grad(adapted, ep.query_x, ep.query_y)
  if first_order:
    # The Hessian term is dropped: the gradient at the adapted weights.
    expected = query_grad
  else:
    # d w_k / d w_0 = (I - lr H_s)^k for a quadratic support loss.
    jac = np.linalg.matrix_power(
        np.eye(DIM) - lr * _hessian(ep.support_x), num_steps
    )
    expected = jac.T @ query_grad
  np.testing.assert_allclose(_kernel(grads), expected, rtol=1e-10)
  query_loss = np.mean((ep.query_x @ adapted - ep.query_y) ** 2)
  np.testing.assert_allclose(metrics["outer/loss"], query_loss, rtol=1e-10)


def test_second_and_first_order_differ_by_the_hessian_term(x64):
  """Guards the closed-form test against a vacuous pass."""
  ep = _as_jax(_regression_episode(1))
  so = metalearners.maml(_linear_model(), 0.1, 1)
  fo = metalearners.maml(_linear_model(), 0.1, 1, first_order=True)
  params = so.init(jax.random.key(0), ep)
  g_so, _ = so.meta_grad(params, ep, None)
  g_fo, _ = fo.meta_grad(params, ep, None)
  assert np.max(np.abs(_kernel(g_so) - _kernel(g_fo))) > 1e-3


def test_maml_meta_test_adaptation_uses_eval_settings(x64):
  ep = _regression_episode(2)
  learner = metalearners.maml(
      _linear_model(), 0.1, 1, eval_inner_lr=0.05, eval_num_inner_steps=4
  )
  params = learner.init(jax.random.key(0), _as_jax(ep))
  w = _kernel(params)
  train = learner.adapt(params, _as_jax(ep), None)
  test = learner.adapt(params, _as_jax(ep), None, training=False)
  np.testing.assert_allclose(
      _kernel(train), _sgd(w, ep.support_x, ep.support_y, 0.1, 1), rtol=1e-12
  )
  np.testing.assert_allclose(
      _kernel(test), _sgd(w, ep.support_x, ep.support_y, 0.05, 4), rtol=1e-12
  )


def _linear_embedding(dim=4) -> models.Model:
  def init(key, x):
    size = int(np.prod(x.shape[1:]))
    return {"head": {"kernel": jax.random.normal(key, (size, dim), x.dtype)}}

  def apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["head"]["kernel"]

  return models.Model(init, apply)


def _classification_episode(seed, num_ways=3, num_shots=2, num_queries=3):
  """Labels deliberately not grouped by class."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_ways, 2, 3))

  def data(per_class):
    y = rng.permutation(np.repeat(np.arange(num_ways), per_class))
    x = centres[y] + 0.7 * rng.normal(size=(len(y), 2, 3))
    return x, y.astype(np.int32)

  return Episode(*data(num_shots), *data(num_queries))


def test_protonet_matches_hand_computed_prototypes(x64):
  num_ways = 3
  ep = _classification_episode(0, num_ways=num_ways)
  learner = metalearners.protonet(_linear_embedding())
  params = learner.init(jax.random.key(0), _as_jax(ep))
  task_params = learner.adapt(params, _as_jax(ep), None)
  loss, metrics = learner.evaluate(params, task_params, _as_jax(ep))

  kernel = _kernel(params)
  support = ep.support_x.reshape(len(ep.support_x), -1) @ kernel
  query = ep.query_x.reshape(len(ep.query_x), -1) @ kernel
  protos = np.stack(
      [support[ep.support_y == k].mean(0) for k in range(num_ways)]
  )
  logits = -np.array(
      [[np.sum((q - c) ** 2) for c in protos] for q in query]
  )
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected_loss = -np.mean(log_probs[np.arange(len(query)), ep.query_y])
  expected_acc = np.mean(logits.argmax(1) == ep.query_y)

  # Slots beyond the episode's classes are marked absent and ignored.
  got_protos, present = task_params
  chex.assert_shape(got_protos, (len(ep.support_y), 4))
  np.testing.assert_array_equal(
      present, np.arange(len(ep.support_y)) < num_ways
  )
  np.testing.assert_allclose(got_protos[:num_ways], protos, rtol=1e-12)
  got_logits = -metalearners.squared_distances(
      jnp.asarray(query), got_protos
  )
  np.testing.assert_allclose(got_logits[:, :num_ways], logits, rtol=1e-10)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)
  np.testing.assert_allclose(metrics["outer/accuracy"], expected_acc)


def test_protonet_masking_keeps_gradients_exact(x64):
  """The -inf logits of absent slots must not leak NaNs into gradients."""
  ep = _as_jax(_classification_episode(1))
  learner = metalearners.protonet(_linear_embedding())
  params = learner.init(jax.random.key(0), ep)

  @jax.jit
  def loss(kernel):
    p = {"head": {"kernel": kernel}}
    return learner.evaluate(p, learner.adapt(p, ep, None), ep)[0]

  kernel = params["head"]["kernel"]
  chex.assert_tree_all_finite(jax.grad(loss)(kernel))
  jax.test_util.check_grads(loss, (kernel,), order=2, modes=["rev"])


@pytest.mark.parametrize("task_map", ["vmap", "scan"])
def test_reptile_meta_grad_is_mean_displacement(x64, task_map):
  lr, num_steps, epsilon = 0.05, 4, 0.5
  eps = [_regression_episode(seed) for seed in range(3)]
  batch = _as_jax(jax.tree.map(lambda *xs: np.stack(xs), *eps))
  learner = metalearners.reptile(_linear_model(), lr, num_steps)
  params = learner.init(jax.random.key(0), _as_jax(eps[0]))
  keys = jax.random.split(jax.random.key(1), len(eps))
  grads, metrics = jax.jit(
      lambda p, b, k: training.map_tasks(
          lambda e, kk: learner.meta_grad(p, e, kk), b, k, task_map
      )
  )(params, batch, keys)

  w = _kernel(params)
  adapted = [_sgd(w, e.support_x, e.support_y, lr, num_steps) for e in eps]
  np.testing.assert_allclose(
      _kernel(grads), np.mean([w - a for a in adapted], 0), rtol=1e-10
  )
  query_losses = [
      np.mean((e.query_x @ a - e.query_y) ** 2)
      for e, a in zip(eps, adapted, strict=True)
  ]
  np.testing.assert_allclose(
      metrics["outer/loss"], np.mean(query_losses), rtol=1e-10
  )
  # Applied by SGD, the update moves towards the mean adapted weights.
  tx = optax.sgd(epsilon)
  updates, _ = tx.update(grads, tx.init(params))
  new = _kernel(optax.apply_updates(params, updates))
  np.testing.assert_allclose(
      new, w + epsilon * (np.mean(adapted, 0) - w), rtol=1e-10
  )


@pytest.mark.parametrize("num_steps,visits", [
    (3, [1] * 12),  # one pass of 3 batches of 4 over 12 examples
    (6, [2] * 12),  # two passes
    (5, [1] * 4 + [2] * 8),  # a pass and two batches of the next
])
def test_reptile_mini_batches_visit_each_example_once_per_pass(
    x64, num_steps, visits):
  # One-hot inputs: a step moves only the weights of its batch's examples,
  # each by the same map f(w) = w - lr * 2 / b * (w + 1) (targets -1), so
  # the weights count the visits.
  n, b, lr = 12, 4, 0.1
  ep = Episode(jnp.eye(n), -jnp.ones((n, 1)), jnp.eye(n), -jnp.ones((n, 1)))
  learner = metalearners.reptile(_linear_model(), lr, num_steps,
                                 inner_batch_size=b)
  w0 = {"head": {"kernel": jnp.zeros((n, 1))}}
  w = np.sort(_kernel(learner.adapt(w0, ep, jax.random.key(3)))[:, 0])

  def f(w, k):
    for _ in range(k):
      w = w - lr * 2 / b * (w + 1)
    return w

  np.testing.assert_allclose(w, np.sort([f(0.0, k) for k in visits]),
                             rtol=1e-12)
  # The order comes from the key: same key, same result; another, another.
  ep = _as_jax(_regression_episode(0, num_shots=12))
  params = learner.init(jax.random.key(0), ep)
  a, b_, c = (_kernel(learner.adapt(params, ep, jax.random.key(k)))
              for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b_)
  assert not np.allclose(a, c)


def test_reptile_inner_adam_matches_numpy(x64):
  lr, b2, eps, num_steps = 0.01, 0.999, 1e-8, 4
  ep = _regression_episode(2)
  learner = metalearners.reptile(
      _linear_model(), 0.5, num_steps,
      inner_optimizer=optax.adam(lr, b1=0.0, b2=b2, eps=eps))
  params = learner.init(jax.random.key(0), _as_jax(ep))
  grads, _ = learner.meta_grad(params, _as_jax(ep), jax.random.key(1))
  w = _kernel(params)
  ref, v = w.copy(), np.zeros_like(w)
  for t in range(1, num_steps + 1):  # Adam with b1 = 0: m is the gradient.
    g = _grad(ref, ep.support_x, ep.support_y)
    v = b2 * v + (1 - b2) * g**2
    ref = ref - lr * g / (np.sqrt(v / (1 - b2**t)) + eps)
  np.testing.assert_allclose(_kernel(grads), w - ref, rtol=1e-10)
  # The same optimiser adapts at test time, for eval_num_inner_steps.
  test = metalearners.reptile(
      _linear_model(), 0.5, 2, eval_num_inner_steps=num_steps,
      inner_optimizer=optax.adam(lr, b1=0.0, b2=b2, eps=eps))
  np.testing.assert_allclose(
      _kernel(test.adapt(params, _as_jax(ep), None, training=False)), ref,
      rtol=1e-10)


def _adam_b1_0(w, v, t, x, y, lr, b2, eps, num_steps):
  """Adam with b1 = 0 from the state (v, t), in NumPy."""
  for _ in range(num_steps):
    t += 1
    g = _grad(w, x, y)
    v = b2 * v + (1 - b2) * g**2
    w = w - lr * g / (np.sqrt(v / (1 - b2**t)) + eps)
  return w, v, t


@pytest.mark.parametrize("clip", [None, 0.02], ids=["sgd", "clipped"])
@pytest.mark.parametrize("task_map", ["vmap", "scan"])
def test_reptile_carried_adam_state_matches_numpy(x64, task_map, clip):
  # Every task of a meta-batch starts from the carried state; the meta-step
  # moves the weights by epsilon towards the mean adapted weights and sets
  # the state to the mean final state, as in NumPy below. A clipping
  # meta-optimizer clips the weights' meta-gradient by its own norm: the
  # carried state neither counts in that norm nor is clipped.
  lr, b2, eps, num_steps, epsilon = 0.01, 0.9, 1e-8, 3, 0.5
  learner = metalearners.reptile(
      _linear_model(), 0.5, num_steps, eval_num_inner_steps=2,
      inner_optimizer=optax.adam(lr, b1=0.0, b2=b2, eps=eps),
      carry_inner_state=True)
  batches = [[_regression_episode(10 * s + i) for i in range(3)]
             for s in range(2)]
  params = learner.init(jax.random.key(0), _as_jax(batches[0][0]))
  assert isinstance(params, ReptileParams)
  meta_tx = optax.sgd(epsilon)
  if clip is not None:
    meta_tx = optax.chain(optax.clip_by_global_norm(clip), meta_tx)
  tx = training.outer_optimizer(learner, meta_tx)
  opt_state = tx.init(params)
  clipped = 0

  @jax.jit
  def meta_step(params, opt_state, batch, keys):
    grads, _ = training.map_tasks(
        lambda e, k: learner.meta_grad(params, e, k), batch, keys, task_map)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  w, v, t = _kernel(params.model), np.zeros((DIM, 1)), 0
  for eps_s in batches:
    batch = _as_jax(jax.tree.map(lambda *xs: np.stack(xs), *eps_s))
    params, opt_state = meta_step(params, opt_state, batch,
                                  jax.random.split(jax.random.key(1), 3))
    finals = [_adam_b1_0(w, v, t, e.support_x, e.support_y, lr, b2, eps,
                         num_steps) for e in eps_s]
    g = w - np.mean([f[0] for f in finals], 0)
    if clip is not None and np.linalg.norm(g) > clip:
      g, clipped = g * clip / np.linalg.norm(g), clipped + 1
    w = w - epsilon * g
    v, t = np.mean([f[1] for f in finals], 0), t + num_steps
    adam = params.inner_state[0]
    np.testing.assert_allclose(_kernel(params.model), w, rtol=1e-10)
    np.testing.assert_allclose(adam.nu["head"]["kernel"], v, rtol=1e-10)
    assert adam.count.dtype == jnp.int32 and int(adam.count) == t
  assert clipped == (0 if clip is None else len(batches))  # the clip bit
  # Meta-test adaptation starts from the carried state too.
  ep = _regression_episode(99)
  np.testing.assert_allclose(
      _kernel(learner.adapt(params, _as_jax(ep), None, training=False)),
      _adam_b1_0(w, v, t, ep.support_x, ep.support_y, lr, b2, eps, 2)[0],
      rtol=1e-10)


def test_reptile_carried_state_through_the_trainer():
  # make_meta_step and init_state apply training.outer_optimizer: the state
  # advances by the inner steps each meta-step, whatever the meta-optimizer.
  num_steps = 3
  learner = metalearners.reptile(
      models.mlp(), num_inner_steps=num_steps, inner_batch_size=5,
      inner_optimizer=optax.adam(1e-3, b1=0.0), carry_inner_state=True)
  sampler = tasks.sinusoid_sampler(num_shots=10, num_queries=5)
  tx = optax.adam(0.1)  # an outer optimizer that would mangle the state
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  step = training.make_meta_step(learner, tx, sampler, meta_batch_size=4,
                                 steps_per_call=2)
  nu0 = jax.tree.map(np.asarray, state.meta_params.inner_state[0].nu)
  for i in range(1, 3):
    state, metrics = step(state, sampler.data, jax.random.key(1))
    assert int(state.meta_params.inner_state[0].count) == 2 * i * num_steps
    assert np.isfinite(float(metrics["outer/loss"]))
  nu = state.meta_params.inner_state[0].nu
  assert all(float(jnp.min(a)) >= 0 for a in jax.tree.leaves(nu))
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(nu), jax.tree.leaves(nu0), strict=True))


@pytest.mark.parametrize("kwargs,message", [
    ({"carry_inner_state": True}, "carry_inner_state needs an inner_opt"),
    ({"inner_batch_size": 0}, "inner_batch_size must be an int >= 1"),
    ({"eval_inner_batch_size": 2.5}, "eval_inner_batch_size must be an int"),
    ({"inner_optimizer": optax.sgd(0.1), "eval_inner_lr": 0.2},
     "eval_inner_lr applies to the inner SGD"),
])
def test_reptile_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    metalearners.reptile(_linear_model(), 0.1, 2, **kwargs)


def test_reptile_mini_batches_need_a_key():
  learner = metalearners.reptile(_linear_model(), 0.1, 2, inner_batch_size=2)
  ep = _as_jax(_regression_episode(0))
  params = learner.init(jax.random.key(0), ep)
  with pytest.raises(ValueError, match="need a key"):
    learner.adapt(params, ep, None)
  # A batch as large as the support set is the whole set: no key needed.
  whole = metalearners.reptile(_linear_model(), 0.1, 2, inner_batch_size=5)
  np.testing.assert_array_equal(
      _kernel(whole.adapt(params, ep, None)),
      _kernel(metalearners.reptile(_linear_model(), 0.1, 2).adapt(
          params, ep, None)))


@pytest.mark.parametrize("num_steps", [1, 2])
def test_metasgd_with_uniform_rates_is_maml(x64, num_steps):
  lr = 0.1
  ep = _regression_episode(3)
  maml = metalearners.maml(_linear_model(), lr, num_steps)
  msgd = metalearners.metasgd(_linear_model(), lr, num_steps)
  meta = msgd.init(jax.random.key(0), _as_jax(ep))
  assert isinstance(meta, MetaSGDParams)
  for rate in jax.tree.leaves(meta.inner_lr):
    np.testing.assert_array_equal(rate, lr)
  g_msgd, m_msgd = msgd.meta_grad(meta, _as_jax(ep), None)
  g_maml, m_maml = maml.meta_grad(meta.model, _as_jax(ep), None)
  chex.assert_trees_all_close(g_msgd.model, g_maml, rtol=1e-12)
  chex.assert_trees_all_close(m_msgd, m_maml, rtol=1e-12)
  if num_steps == 1:
    # d L_q(w - a * g_s) / d a = -g_s * grad L_q(w'), elementwise.
    w = _kernel(meta.model)
    g_s = _grad(w, ep.support_x, ep.support_y)
    g_q = _grad(w - lr * g_s, ep.query_x, ep.query_y)
    np.testing.assert_allclose(
        _kernel(g_msgd.inner_lr), -g_s * g_q, rtol=1e-10
    )


def test_metasgd_is_maml_on_an_mlp():
  """The same identity, through a nonlinear network in float32."""
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  ep = sampler.sample(jax.random.key(0), None)
  maml = metalearners.maml(models.mlp(hidden=(8, 8)), 0.05, 2)
  msgd = metalearners.metasgd(models.mlp(hidden=(8, 8)), 0.05, 2)
  meta = msgd.init(jax.random.key(1), ep)
  g_msgd, _ = msgd.meta_grad(meta, ep, None)
  g_maml, _ = maml.meta_grad(meta.model, ep, None)
  chex.assert_trees_all_close(g_msgd.model, g_maml, rtol=1e-5, atol=1e-6)


def test_metasgd_draws_its_rates_from_a_range():
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  ep = sampler.sample(jax.random.key(0), None)
  model = models.mlp(hidden=(8, 8))
  drawn = metalearners.metasgd(model, 0.05, 1, inner_lr_range=(0.005, 0.1))
  meta = drawn.init(jax.random.key(1), ep)
  rates = np.concatenate([np.ravel(a)
                          for a in jax.tree.leaves(meta.inner_lr)])
  assert 0.005 <= rates.min() and rates.max() <= 0.1
  assert rates.std() > 0.01  # Spread over the range, not one value.
  again = drawn.init(jax.random.key(1), ep)
  chex.assert_trees_all_equal(meta, again)
  # The model's initialisation is that of constant rates.
  constant = metalearners.metasgd(model, 0.05, 1).init(jax.random.key(1), ep)
  chex.assert_trees_all_equal(meta.model, constant.model)
  # Adaptation uses the drawn rates: one step is theta - alpha * grad.
  grads = jax.grad(lambda p: metalearners.task_loss(
      model.apply(p, ep.support_x), ep.support_y)[0])(meta.model)
  adapted = drawn.adapt(meta, ep, None)
  chex.assert_trees_all_close(
      adapted, jax.tree.map(lambda p, a, g: p - a * g, meta.model,
                            meta.inner_lr, grads), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="inner_lr_range"):
    metalearners.metasgd(model, 0.05, 1, inner_lr_range=(0.1, 0.005))


@pytest.mark.parametrize("training_mode", [True, False])
def test_anil_adapts_only_the_head(training_mode):
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  ep = sampler.sample(jax.random.key(0), None)
  learner = metalearners.anil(models.mlp(hidden=(8, 8)), 0.1, 2)
  params = learner.init(jax.random.key(1), ep)
  adapted = learner.adapt(params, ep, None, training=training_mode)
  assert set(params) == set(adapted) == {"dense0", "dense1", "head"}
  for name in ("dense0", "dense1"):
    chex.assert_trees_all_equal(adapted[name], params[name])
  for before, after in zip(
      jax.tree.leaves(params["head"]), jax.tree.leaves(adapted["head"]),
      strict=True,
  ):
    assert not np.allclose(before, after), "the head did not adapt"


def test_anil_meta_learns_the_body():
  """The body gets a meta-gradient through the adapted head's loss."""
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  ep = sampler.sample(jax.random.key(0), None)
  learner = metalearners.anil(models.mlp(hidden=(8, 8)), 0.1, 1)
  params = learner.init(jax.random.key(1), ep)
  grads, _ = learner.meta_grad(params, ep, None)
  for name in ("dense0", "dense1", "head"):
    assert float(jnp.abs(grads[name]["kernel"]).sum()) > 0.0, name
