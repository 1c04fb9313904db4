"""The one inner loop, ``inner_optimize``, in each of its uses.

References are closed forms on linear least squares in NumPy float64 (the
loop runs in float64 too), or the learners that use the loop.
"""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest

from metalearn import learned_optimizers as lo
from metalearn import metalearners, models, tasks
from metalearn.metalearners import inner_optimize
from metalearn.types import Episode

DIM = 3


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _linear_model() -> models.Model:
  def init(key, x):
    return {"head": {"kernel": jax.random.normal(key, (x.shape[-1], 1),
                                                 x.dtype)}}

  def apply(params, x):
    return x @ params["head"]["kernel"]

  return models.Model(init, apply)


def _regression(seed, n=5, m=7):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(DIM, 1))

  def data(k):
    x = rng.normal(size=(k, DIM))
    return x, x @ w + 0.1 * rng.normal(size=(k, 1))

  return Episode(*data(n), *data(m))


def _grad(w, x, y):  # of mean((x w - y)^2)
  return 2.0 / len(x) * x.T @ (x @ w - y)


def _params(w):
  return {"head": {"kernel": jnp.asarray(w)}}


def _kernel(params):
  return np.asarray(params["head"]["kernel"])


def _sinusoid():
  return tasks.sinusoid_sampler(num_shots=5, num_queries=5).sample(
      jax.random.key(0), None)


def test_sgd_equals_hand_written_steps(x64):
  ep, lr = _regression(0), 0.1
  w0 = np.random.default_rng(1).normal(size=(DIM, 1))
  out = jax.jit(lambda p: inner_optimize(
      _linear_model(), optax.sgd(lr), p, ep.support_x, ep.support_y,
      num_steps=3))(_params(w0))
  assert isinstance(out, metalearners.InnerResult)
  w = w0
  for _ in range(3):
    w = w - lr * _grad(w, ep.support_x, ep.support_y)
  np.testing.assert_allclose(_kernel(out.params), w, rtol=1e-12)
  assert out.model_state is None
  # The public wrapper of notebooks 01 and 03 runs the same loop.
  np.testing.assert_allclose(_kernel(metalearners.inner_sgd(
      _linear_model(), _params(w0), ep.support_x, ep.support_y,
      inner_lr=lr, num_steps=3)), w, rtol=1e-12)


def _body_watcher():
  """An MLP whose hidden layers pass through an identity with a custom VJP
  that records each time its backward pass is traced."""
  traced = []

  @jax.custom_vjp
  def watch(w):
    return w

  def fwd(w):
    return w, None

  def bwd(_, g):
    traced.append(1)
    return (g,)

  watch.defvjp(fwd, bwd)
  base = models.mlp(hidden=(8,))

  def apply(params, x):
    body = {k: jax.tree.map(watch, v) if k != "head" else v
            for k, v in params.items()}
    return base.apply(body, x)

  return models.Model(base.init, apply), traced


@pytest.mark.parametrize("mask", [
    "head",
    {"dense0": False, "head": True},
    lambda p: {k: k == "head" for k in p},
], ids=["name", "prefix", "callable"])
def test_mask_freezes_the_body_and_is_anil(mask):
  ep = _sinusoid()
  model, traced = _body_watcher()
  params = model.init(jax.random.key(1), ep.support_x)
  out = jax.jit(lambda p: inner_optimize(
      model, optax.sgd(0.1), p, ep.support_x, ep.support_y, num_steps=2,
      mask=mask))(params)
  # No gradient was computed for the frozen body: its backward pass was
  # never traced, and its leaves come back bit-identical.
  assert not traced
  chex.assert_trees_all_equal(out.params["dense0"], params["dense0"])
  assert not np.allclose(out.params["head"]["kernel"],
                         params["head"]["kernel"])
  # The optimiser saw only the head.
  assert len(jax.tree.leaves(out.opt_state)) == 0  # plain SGD: no state
  anil = metalearners.anil(model, 0.1, 2)
  chex.assert_trees_all_equal(anil.adapt(params, ep, None), out.params)
  # Without a mask the body's backward pass is traced.
  jax.jit(lambda p: inner_optimize(
      model, optax.sgd(0.1), p, ep.support_x, ep.support_y,
      num_steps=1))(params)
  assert traced


def test_inner_sgd_rates_for_the_trainable_sub_tree():
  # inner_sgd's per-parameter rates shaped like params[trainable].
  ep = _sinusoid()
  model = models.mlp(hidden=(8,))
  params = model.init(jax.random.key(1), ep.support_x)
  rates = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params["head"])
  with_rates = metalearners.inner_sgd(model, params, ep.support_x,
                                      ep.support_y, inner_lr=rates,
                                      num_steps=2, trainable="head")
  scalar = metalearners.inner_sgd(model, params, ep.support_x, ep.support_y,
                                  inner_lr=jnp.float32(0.1), num_steps=2,
                                  trainable="head")
  chex.assert_trees_all_close(with_rates, scalar, rtol=1e-6)
  chex.assert_trees_all_equal(with_rates["dense0"], params["dense0"])


def test_mask_state_covers_the_masked_leaves_only():
  ep = _sinusoid()
  params = models.mlp(hidden=(8,)).init(jax.random.key(1), ep.support_x)
  out = inner_optimize(models.mlp(hidden=(8,)), optax.adam(1e-2), params,
                       ep.support_x, ep.support_y, num_steps=1, mask="head")
  mu = out.opt_state[0].mu
  assert len(jax.tree.leaves(mu)) == len(jax.tree.leaves(params["head"]))


def test_mask_naming_no_sub_tree_is_an_error():
  ep = _sinusoid()
  params = models.mlp().init(jax.random.key(1), ep.support_x)
  with pytest.raises(ValueError, match="names no top-level sub-tree"):
    inner_optimize(models.mlp(), optax.sgd(0.1), params, ep.support_x,
                   ep.support_y, num_steps=1, mask="classifier")


def test_scale_by_rates_is_metasgd_and_its_rate_gradient_is_right(x64):
  ep, w = _regression(3), np.random.default_rng(4).normal(size=(DIM, 1))
  rates = np.random.default_rng(5).uniform(0.05, 0.2, size=(DIM, 1))
  model = _linear_model()

  def query_loss(rates, num_steps=1):
    adapted = inner_optimize(
        model, metalearners.scale_by_rates(_params(rates)), _params(w),
        ep.support_x, ep.support_y, num_steps=num_steps).params
    return jnp.mean((ep.query_x @ _kernel_j(adapted) - ep.query_y) ** 2)

  g_s = _grad(w, ep.support_x, ep.support_y)
  adapted = inner_optimize(
      model, metalearners.scale_by_rates(_params(rates)), _params(w),
      ep.support_x, ep.support_y, num_steps=1).params
  np.testing.assert_allclose(_kernel(adapted), w - rates * g_s, rtol=1e-12)
  # d L_q(w - a * g_s) / d a = -g_s * grad L_q(w'), elementwise.
  g_q = _grad(w - rates * g_s, ep.query_x, ep.query_y)
  np.testing.assert_allclose(jax.grad(query_loss)(jnp.asarray(rates)),
                             -g_s * g_q, rtol=1e-10)
  # Through several steps, against finite differences.
  jax.test_util.check_grads(lambda r: query_loss(r, 3),
                            (jnp.asarray(rates),), order=1, modes=["rev"])
  # Meta-SGD's meta-gradient of the rates is this one.
  metasgd = metalearners.metasgd(model, 0.1, 1)
  meta = metalearners.MetaSGDParams(_params(w), _params(rates))
  grads, _ = metasgd.meta_grad(meta, jax.tree.map(jnp.asarray, ep), None)
  np.testing.assert_allclose(_kernel(grads.inner_lr), -g_s * g_q,
                             rtol=1e-10)


def _kernel_j(params):
  return params["head"]["kernel"]


def _counting() -> optax.GradientTransformation:
  """Counts, per parameter entry, the steps with a non-zero gradient."""

  def init(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.int32), params)

  def update(updates, state, params=None):
    del params
    return updates, jax.tree.map(lambda c, g: c + (g != 0), state, updates)

  return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("num_steps,visits", [
    (3, [1] * 12),  # one pass of 3 batches of 4 over 12 examples
    (6, [2] * 12),  # two passes
    (5, [1] * 4 + [2] * 8),  # a pass and two batches of the next
])
def test_adam_mini_batches_visit_each_example_once_per_pass(num_steps,
                                                            visits):
  # One-hot inputs: example i's gradient is non-zero exactly on row i.
  n, b = 12, 4
  tx = optax.chain(_counting(), optax.adam(1e-2, b1=0.0))
  params = _params(jnp.zeros((n, 1)))
  out = inner_optimize(_linear_model(), tx, params, jnp.eye(n),
                       -jnp.ones((n, 1)), num_steps=num_steps, batch_size=b,
                       key=jax.random.key(3))
  counts, adam = out.opt_state
  assert sorted(np.asarray(counts["head"]["kernel"])[:, 0]) == visits
  assert int(adam[0].count) == num_steps


def test_remat_must_be_a_known_kind():
  model = _linear_model()
  x = jnp.ones((2, DIM))
  with pytest.raises(ValueError, match="remat must be one of"):
    inner_optimize(model, optax.sgd(0.1), model.init(jax.random.key(0), x),
                   x, jnp.ones((2, 1)), num_steps=1, remat="sqrt")


def test_mini_batches_need_a_key():
  with pytest.raises(ValueError, match="need a key"):
    inner_optimize(_linear_model(), optax.sgd(0.1), _params(jnp.zeros((4, 1))),
                   jnp.eye(4), jnp.ones((4, 1)), num_steps=1, batch_size=2)


def test_starting_opt_state_continues_the_run(x64):
  ep = _regression(6)
  tx, model = optax.adam(0.05), _linear_model()
  w = _params(np.zeros((DIM, 1)))
  run = lambda p, k, s=None: inner_optimize(  # noqa: E731
      model, tx, p, ep.support_x, ep.support_y, num_steps=k, opt_state=s)
  first = run(w, 2)
  resumed = run(first.params, 3, first.opt_state)
  whole = run(w, 5)
  chex.assert_trees_all_close(resumed.params, whole.params, rtol=1e-12)
  chex.assert_trees_all_close(resumed.opt_state, whole.opt_state,
                              rtol=1e-12)


def _recording_lopt(num_steps) -> optax.GradientTransformationExtraArgs:
  """SGD that records the loss ``value`` of each step in its state."""

  def init(params):
    del params
    return jnp.zeros(()), jnp.zeros(num_steps)

  def update(updates, state, params=None, *, value=None, **extra):
    del params, extra
    t, values = state
    new = jax.tree.map(lambda g: -0.1 * g, updates)
    return new, (t + 1, values.at[t.astype(jnp.int32)].set(value))

  return optax.GradientTransformationExtraArgs(init, update)


def test_a_learned_optimiser_receives_the_loss_value(x64):
  ep, w = _regression(7), np.ones((DIM, 1))
  out = inner_optimize(_linear_model(), _recording_lopt(3), _params(w),
                       ep.support_x, ep.support_y, num_steps=3)
  expected = []
  for _ in range(3):
    expected.append(np.mean((ep.support_x @ w - ep.support_y) ** 2))
    w = w - 0.1 * _grad(w, ep.support_x, ep.support_y)
  np.testing.assert_allclose(out.opt_state[1], expected, rtol=1e-12)
  # The public wrapper of notebook 04 runs the same loop.
  lopt = lo.meta_lstm_optimizer()
  tx = lopt.opt_fn(lopt.init(jax.random.key(0)))
  x, y = jnp.asarray(ep.support_x), jnp.asarray(ep.support_y)
  chex.assert_trees_all_equal(
      lo.inner_loop(_linear_model(), tx, _params(w), x, y, num_steps=2),
      inner_optimize(_linear_model(), tx, _params(w), x, y,
                     num_steps=2).params)


@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_first_order_drops_the_second_order_term(x64, first_order):
  ep, lr, k = _regression(8), 0.1, 2
  w = np.random.default_rng(9).normal(size=(DIM, 1))

  def query_loss(kernel):
    adapted = inner_optimize(
        _linear_model(), optax.sgd(lr), {"head": {"kernel": kernel}},
        ep.support_x, ep.support_y, num_steps=k,
        first_order=first_order).params
    return jnp.mean((ep.query_x @ _kernel_j(adapted) - ep.query_y) ** 2)

  adapted = w
  for _ in range(k):
    adapted = adapted - lr * _grad(adapted, ep.support_x, ep.support_y)
  g_q = _grad(adapted, ep.query_x, ep.query_y)
  hessian = 2.0 / len(ep.support_x) * ep.support_x.T @ ep.support_x
  jac = np.linalg.matrix_power(np.eye(DIM) - lr * hessian, k)
  expected = g_q if first_order else jac.T @ g_q
  np.testing.assert_allclose(jax.grad(query_loss)(jnp.asarray(w)), expected,
                             rtol=1e-10)


def _counting_model() -> models.Model:
  """A linear model whose state counts its training forward passes."""
  base = _linear_model()

  def apply_with_state(params, state, x, training):
    return base.apply(params, x), state + (1 if training else 0)

  return base._replace(init_state=lambda key, x: jnp.zeros((), jnp.int32),
                       apply_with_state=apply_with_state)


@pytest.mark.parametrize("training", [True, False])
def test_model_state_is_threaded(training):
  model = _counting_model()
  out = inner_optimize(model, optax.sgd(0.1), _params(jnp.zeros((DIM, 1))),
                       jnp.ones((4, DIM)), jnp.ones((4, 1)), num_steps=3,
                       model_state=jnp.int32(5), training=training)
  assert int(out.model_state) == (8 if training else 5)


def test_batch_norm_state_moves_like_the_learners():
  # A conv-4 with running statistics: maml's meta-training inner loop is
  # this one with the model state threaded; meta-test leaves it alone.
  images = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
  labels = jnp.arange(6) % 3
  model = models.conv4(3, features=4, norm="running")
  params = model.init(jax.random.key(1), images)
  state = model.init_state(jax.random.key(1), images)
  moved = inner_optimize(model, optax.sgd(0.1), params, images, labels,
                         num_steps=2, model_state=state)
  kept = inner_optimize(model, optax.sgd(0.1), params, images, labels,
                        num_steps=2, model_state=state, training=False)
  chex.assert_trees_all_equal(kept.model_state, state)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(moved.model_state), jax.tree.leaves(state),
      strict=True))
  learner = metalearners.maml(model, 0.1, 2)
  meta = learner.init(jax.random.key(1), Episode(images, labels, images,
                                                 labels))
  adapted = learner.adapt(meta, Episode(images, labels, images, labels),
                          None)
  chex.assert_trees_all_equal(adapted, moved.params)


def _conv_episode(key, norm="running"):
  # One Conv-4 block: remat wraps whole inner steps, whatever their depth,
  # and a one-block step compiles in well under half the time.
  model = models.conv4(3, features=4, norm=norm, num_blocks=1)
  xs = jax.random.normal(key, (9, 28, 28, 1))
  return model, Episode(xs[:3], jnp.arange(3), xs[3:], jnp.arange(6) % 3)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_remat_changes_memory_not_results(batch_size):
  model, ep = _conv_episode(jax.random.key(0))
  params = model.init(jax.random.key(1), ep.support_x)
  state = model.init_state(jax.random.key(1), ep.support_x)

  def outer(params, remat):
    # 5 steps: "nested" runs one chunk of 3, then the remaining 2.
    # Momentum, so the carry holds optimiser state; not Adam, whose
    # rescaling turns float32 rounding in near-zero gradients into whole
    # steps (and XLA:CPU's summation order varies from run to run).
    result = inner_optimize(model, optax.sgd(0.1, momentum=0.9), params,
                            ep.support_x, ep.support_y, num_steps=5,
                            model_state=state, mask="head", remat=remat,
                            batch_size=batch_size, key=jax.random.key(5))
    out, _ = models.forward(model, result.params, result.model_state,
                            ep.query_x, training=True)
    return metalearners.task_loss(out, ep.query_y)[0]

  plain = jax.jit(jax.value_and_grad(outer), static_argnums=1)

  def jaxpr(remat):
    return str(jax.make_jaxpr(jax.grad(outer), static_argnums=1)(
        params, remat))

  want = plain(params, False)
  assert "checkpoint" not in jaxpr(False) and "remat" not in jaxpr(False)
  # Mini-batched steps: the nested kind alone (each kind is a compile).
  for remat in (True, "nested") if batch_size is None else ("nested",):
    # Recomputed steps may fuse differently: equal up to float32 rounding.
    # atol: the conv biases feed batch norm, so their gradients are zero but
    # for rounding (a few 1e-6, either sign).
    chex.assert_trees_all_close(plain(params, remat), want, rtol=1e-4,
                                atol=1e-5)
    # The rematerialised step is a checkpoint in the program; without it,
    # there is none.
    assert "checkpoint" in jaxpr(remat) or "remat" in jaxpr(remat)


# Every learner passes remat on to inner_optimize (the checkpoint counts
# below); the meta-gradients are compared (two compiles of a second-order
# step each) for MAML and a learned optimiser, whose inner loops differ,
# and inner_optimize's own results with and without remat above.
@pytest.mark.parametrize("make,compare", [
    (lambda m, remat: metalearners.maml(m, 0.4, 3, remat=remat), True),
    (lambda m, remat: metalearners.anil(m, 0.4, 3, remat=remat), False),
    (lambda m, remat: metalearners.metasgd(m, 0.4, 3, remat=remat), False),
    (lambda m, remat: lo.learned_optimizer_learner(
        m, lo.learnable_sgd(0.1), 3, remat=remat), True),
    # Second order through Meta-LSTM's log-magnitude features multiplies
    # float rounding by up to e^10 (their slope below e^-10): first order,
    # as the paper runs it.
    (lambda m, remat: lo.meta_lstm(m, 3, remat=remat), False),
], ids=["maml", "anil", "metasgd", "lopt", "meta_lstm"])
def test_learners_with_remat_have_the_same_meta_gradient(make, compare):
  model, ep = _conv_episode(jax.random.key(2), norm="transductive")
  plain, remat = make(model, False), make(model, "nested")
  params = jax.jit(plain.init)(jax.random.key(3), ep)
  key = jax.random.key(4)
  if compare:
    got = jax.jit(remat.meta_grad)(params, ep, key)
    want = jax.jit(plain.meta_grad)(params, ep, key)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  # The learner passes the kind on: nested chunks are more checkpoints
  # than one per step, which are more than none.
  counts = [
      str(jax.make_jaxpr(learner.meta_grad)(params, ep, key)).count("remat")
      for learner in (plain, make(model, True), remat)]
  assert counts[0] == 0 < counts[1] < counts[2], counts
