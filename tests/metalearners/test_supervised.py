"""Tests for the supervised pretraining baselines (Baseline, Baseline++, RFS).

References are written independently: the cross-entropy of a global head
by hand, PyTorch-style SGD and logistic regression by float64 NumPy
gradient descent.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training
from metalearn.metalearners import WithModelState
from metalearn.types import ClassPool


def _pool(num_classes=6, per_class=5, size=16, seed=0):
  images = np.random.default_rng(seed).integers(
      0, 256, (num_classes, per_class, size, size, 1), dtype=np.uint8)
  return ClassPool(jnp.asarray(images),
                   jnp.arange(num_classes, dtype=jnp.int32))


def _episode(pool, ways=3, shots=1, queries=2, seed=1):
  sampler = tasks.episode_sampler(pool, num_ways=ways, num_shots=shots,
                                  num_queries=queries)
  return sampler.sample(jax.random.key(seed), pool)


def _log_softmax_ce(logits, labels):
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - jnp.log(jnp.exp(logits).sum(-1, keepdims=True))
  return -jnp.mean(logp[jnp.arange(labels.shape[0]), labels])


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_meta_grad_is_the_global_heads_cross_entropy_gradient(head):
  embed = models.conv4(None, features=8, num_blocks=1, norm="none")
  learner = metalearners.supervised(embed, 6, train_head=head)
  pool = _pool()
  batch = tasks.batch_sampler(pool, 10).sample(jax.random.key(0), pool)
  # Give the batch a query set too: both are labelled images of the task.
  episode = batch._replace(query_x=batch.support_x[:3] * 0.5,
                           query_y=jnp.array([5, 0, 2], jnp.int32))
  params = learner.init(jax.random.key(1), episode)
  assert params.head.weights.shape == (8 * 8 * 8, 6)  # 16px, one block.
  x = jnp.concatenate([episode.support_x, episode.query_x])
  y = jnp.concatenate([episode.support_y, episode.query_y])

  def reference(params):
    z = embed.apply(params.embed, x)
    w = params.head.weights
    if head == "cosine":
      zn = z / (jnp.sqrt(jnp.sum(z * z, -1, keepdims=True)) + 1e-5)
      wn = w / (jnp.sqrt(jnp.sum(w * w, 0, keepdims=True)) + 1e-5)
      logits = 10.0 * zn @ wn
    else:
      logits = z @ w + params.head.bias
    return _log_softmax_ce(logits, y)

  grads, metrics = jax.jit(learner.meta_grad)(params, episode,
                                              jax.random.key(2))
  chex.assert_trees_all_close(grads, jax.jit(jax.grad(reference))(params),
                              rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["outer/loss"], reference(params),
                             rtol=1e-5)
  assert set(metrics) == {"outer/loss", "outer/accuracy"}


def test_running_statistics_are_carried_from_the_batch():
  embed = models.conv4(None, features=8, num_blocks=1, norm="running")
  learner = metalearners.baseline(embed, 6)
  pool = _pool()
  batch = tasks.batch_sampler(pool, 8).sample(jax.random.key(0), pool)
  params = learner.init(jax.random.key(1), batch)
  assert isinstance(params, WithModelState)
  grads, _ = jax.jit(learner.meta_grad)(params, batch, jax.random.key(2))
  _, expected = embed.apply_with_state(params.params.embed,
                                       params.model_state,
                                       batch.support_x, True)
  chex.assert_trees_all_close(grads.model_state, expected)


def _clusters(num_slots=5, shots=2, d=16, seed=0):
  """Linearly separable features: class k around 3 e_k."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_slots), shots).astype(np.int32)
  z = 3.0 * np.eye(d)[labels] + 0.3 * rng.normal(size=(labels.size, d))
  return z.astype(np.float32), labels


def _torch_sgd_reference(z, y, slots, steps, lr=0.01, momentum=0.9,
                         dampening=0.9, wd=1e-3):
  """A linear head by full-batch SGD in float64 NumPy, written out: the
  gradient plus weight decay, a dampened momentum buffer from zero."""
  z = z.astype(np.float64)
  w, b = np.zeros((z.shape[1], slots)), np.zeros(slots)
  bw, bb = np.zeros_like(w), np.zeros_like(b)
  onehot = np.eye(slots)[y]
  for _ in range(steps):
    logits = z @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gw = z.T @ (p - onehot) / len(y) + wd * w
    gb = (p - onehot).mean(0) + wd * b
    bw = momentum * bw + (1 - dampening) * gw
    bb = momentum * bb + (1 - dampening) * gb
    w, b = w - lr * bw, b - lr * bb
  return w, b


def test_baseline_head_separates_and_matches_a_reference_fit():
  z, y = _clusters()
  fit = jax.jit(functools.partial(metalearners.finetune_head, num_slots=10,
                                  steps=100))(z, y)
  # 5 of the 10 slots are labelled; the others are masked.
  np.testing.assert_array_equal(fit.present, np.arange(10) < 5)
  logits = z @ fit.head.weights + fit.head.bias
  logits = np.where(fit.present, logits, -np.inf)
  np.testing.assert_array_equal(logits.argmax(-1), y)
  w, b = _torch_sgd_reference(z, y, 5, 100)
  np.testing.assert_allclose(fit.head.weights[:, :5], w, atol=1e-5)
  np.testing.assert_allclose(fit.head.bias[:5], b, atol=1e-5)
  np.testing.assert_array_equal(fit.head.weights[:, 5:], 0.0)


def test_cosine_head_separates_the_support_set():
  z, y = _clusters()
  z = z - 1.0  # not centred on the origin: the cosine must still separate
  fit = metalearners.finetune_head(z, y, 5, kind="cosine", scale=2.0,
                                   steps=100)
  logits = metalearners._supervised.head_logits(fit.head, z, "cosine", 2.0)
  np.testing.assert_array_equal(np.asarray(logits).argmax(-1), y)


def _logistic_reference(z, y, slots, c, steps=20000, lr=1.0):
  """Minimises mean CE + |W|^2 / (2 c n) (sklearn's objective over C n,
  intercept unpenalised) by float64 gradient descent."""
  z = z.astype(np.float64)
  n = len(y)
  w, b = np.zeros((z.shape[1], slots)), np.zeros(slots)
  onehot = np.eye(slots)[y]
  for _ in range(steps):
    logits = z @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= lr * (z.T @ (p - onehot) / n + w / (c * n))
    b -= lr * (p - onehot).mean(0)
  return w, b


def _softmax(logits):
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("c", [1.0, 10.0])
def test_rfs_logistic_regression_matches_a_reference_solution(c):
  rng = np.random.default_rng(3)
  z = rng.normal(size=(8, 6)).astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  y = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)
  fit = jax.jit(functools.partial(metalearners.logistic_regression,
                                  num_slots=8, c=c, steps=100))(z, y)
  w, b = _logistic_reference(z, y, 4, c)
  assert not np.asarray(fit.present)[4:].any()
  np.testing.assert_allclose(fit.head.weights[:, :4], w, atol=2e-4)
  queries = rng.normal(size=(20, 6))
  got = _softmax(queries @ fit.head.weights[:, :4] + fit.head.bias[:4])
  np.testing.assert_allclose(got, _softmax(queries @ w + b), atol=2e-4)


def test_adapt_is_deterministic_vmappable_and_masks_absent_slots():
  """RFS's L-BFGS fit (the one with data-dependent loops) under vmap is
  the per-task fit; absent slots get -inf logits."""
  pool = _pool()
  learner = metalearners.rfs(
      models.conv4(None, features=8, num_blocks=1, norm="running"), 6,
      finetune_steps=10)
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=2,
                                  num_queries=1)
  eps = tasks.sample_batch(sampler, jax.random.key(0), 2)
  params = learner.init(jax.random.key(1), _episode(pool))

  def run(ep, key):
    head = learner.adapt(params, ep, key, training=False)
    return head, learner.predict(params, head, ep.query_x)

  keys = jax.random.split(jax.random.key(2), 2)
  heads, logits = jax.jit(jax.vmap(run))(eps, keys)
  first = jax.jit(run)(jax.tree.map(lambda x: x[0], eps), keys[1])
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[0], (heads, logits)), first, atol=1e-5)
  # Six support slots for 3 ways: three are absent.
  assert logits.shape == (2, 3, 6)
  assert np.asarray(heads.present).sum(-1).tolist() == [3, 3]
  assert np.all(np.isneginf(np.asarray(logits)[:, :, 3:]))
  assert np.all(np.isfinite(np.asarray(logits)[:, :, :3]))


def _finetune_reference(embed, embed_params, head, present, x, y, steps,
                        lr, momentum=0.9):
  """Backbone and linear head by a hand-written loop: PyTorch's SGD with
  momentum (buffer = momentum * buffer + gradient) on the masked mean
  cross-entropy of the support set."""

  def loss(params):
    w, b, net = params
    logits = embed.apply(net, x) @ w + b
    logits = jnp.where(present[None, :], logits, -1e30)
    return _log_softmax_ce(logits, y)

  params = (head.weights, head.bias, embed_params)
  buffer = jax.tree.map(jnp.zeros_like, params)
  for _ in range(steps):
    grad = jax.grad(loss)(params)
    buffer = jax.tree.map(lambda m, g: momentum * m + g, buffer, grad)
    params = jax.tree.map(lambda p, m: p - lr * m, params, buffer)
  return params


def test_backbone_finetuning_matches_a_reference_loop():
  embed = models.conv4(None, features=8, num_blocks=1, norm="none")
  pool = _pool()
  episode = _episode(pool, ways=3, shots=2, queries=2)
  frozen = metalearners.baseline(embed, 6, finetune_steps=5)
  tuned = metalearners.baseline(embed, 6, finetune_steps=5,
                                backbone_steps=4, backbone_lr=0.5)
  params = frozen.init(jax.random.key(1), episode)
  head = frozen.adapt(params, episode, None)
  assert head.embed is None
  fit = jax.jit(tuned.adapt)(params, episode, jax.random.key(0))
  w, b, net = _finetune_reference(
      embed, params.embed, head.head, head.present, episode.support_x,
      episode.support_y, 4, 0.5)
  chex.assert_trees_all_close(fit.embed, net, atol=2e-5, rtol=2e-4)
  np.testing.assert_allclose(fit.head.weights, w, atol=2e-5, rtol=2e-4)
  np.testing.assert_allclose(fit.head.bias, b, atol=2e-5, rtol=2e-4)
  # The backbone moved, and the queries are scored with the moved one.
  assert max(float(jnp.abs(a - c).max()) for a, c in zip(
      jax.tree.leaves(net), jax.tree.leaves(params.embed),
      strict=True)) > 1e-4
  want = embed.apply(net, episode.query_x) @ w + b
  got = tuned.predict(params, fit, episode.query_x)
  present = np.asarray(fit.present)
  np.testing.assert_allclose(np.asarray(got)[:, present],
                             np.asarray(want)[:, present], atol=1e-4)


@pytest.mark.parametrize("make", [metalearners.baseline,
                                  metalearners.baseline_pp,
                                  metalearners.rfs])
def test_backbone_finetuning_fits_the_support_set_and_keeps_meta_params(
    make):
  pool = _pool()
  episode = _episode(pool, ways=3, shots=2, queries=2)
  embed = models.conv4(None, features=8, num_blocks=1, norm="running")
  frozen = make(embed, 6, finetune_steps=5)
  tuned = make(embed, 6, finetune_steps=5, backbone_steps=20,
               backbone_lr=0.05)
  params = frozen.init(jax.random.key(1), episode)
  before = jax.tree.map(np.array, params)

  def support_loss(learner):
    head = learner.adapt(params, episode, jax.random.key(0), training=False)
    logits = learner.predict(params, head, episode.support_x)
    return float(_log_softmax_ce(jnp.where(jnp.isneginf(logits), -1e30,
                                           logits), episode.support_y))

  assert support_loss(tuned) < support_loss(frozen) - 1e-3
  chex.assert_trees_all_equal(params, before)


def test_backbone_finetuning_on_augmented_views_is_a_function_of_the_key():
  pool = _pool()
  episode = _episode(pool, ways=3, shots=1, queries=2)
  learner = metalearners.baseline(
      models.conv4(None, features=8, num_blocks=1, norm="none"), 6,
      finetune_steps=5,
      backbone_steps=3, backbone_lr=0.05,
      backbone_augment={"apply_to": "both", "flip": {"prob": 0.5},
                        "affine": {"max_rotation": 20.0}})
  params = learner.init(jax.random.key(1), episode)
  adapt = jax.jit(learner.adapt)
  a, b = adapt(params, episode, jax.random.key(0)), adapt(
      params, episode, jax.random.key(0))
  c = adapt(params, episode, jax.random.key(5))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a.head.weights, c.head.weights)
  with pytest.raises(ValueError, match="needs a key"):
    learner.adapt(params, episode, None)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_loss_is_the_scaled_kl_divergence(temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 7)) * 3.0
  loss, grad = jax.value_and_grad(metalearners.distillation_loss)(
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature)
  p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
  kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)
  np.testing.assert_allclose(loss, temperature**2 * kl.mean(), rtol=1e-5)
  # d/ds: T (p_s - p_t) / n; no gradient reaches the teacher's logits.
  np.testing.assert_allclose(grad, temperature * (p_s - p_t) / 5,
                             atol=1e-6)
  assert float(jax.grad(metalearners.distillation_loss, 1)(
      s, t, temperature).sum()) == 0.0
  assert float(metalearners.distillation_loss(s, s, temperature)) == (
      pytest.approx(0.0, abs=1e-6))


def test_distilled_meta_grad_and_step_train_the_student_alone():
  """The student's gradient is that of 0.5 CE + 0.5 KD against the
  teacher's eval-mode logits; a meta-step leaves the teacher as it is."""
  embed = models.conv4(None, features=8, num_blocks=1, norm="running")
  pool = _pool()
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
                                  num_queries=1)
  learner = metalearners.rfs(embed, 6, batch_size=10, kd_weight=0.5,
                             ce_weight=0.5, kd_temperature=4.0)
  batches = learner.train_sampler(sampler)
  batch = batches.sample(jax.random.key(0), batches.data)
  params = learner.init(jax.random.key(1), batch)
  assert isinstance(params, metalearners.Distilled)
  student, teacher = params.student, params.teacher
  x, y = batch.support_x, batch.support_y
  t_net = models.bind(embed, teacher.model_state)
  t_logits = t_net.apply(teacher.params.embed, x) @ (
      teacher.params.head.weights) + teacher.params.head.bias

  def reference(p):
    z, _ = models.forward(embed, p.embed, student.model_state, x,
                          training=True)
    logits = z @ p.head.weights + p.head.bias
    p_t = jax.nn.softmax(t_logits / 4.0)
    kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(logits / 4.0)),
                 -1)
    return 0.5 * _log_softmax_ce(logits, y) + 0.5 * 16.0 * jnp.mean(kl)

  grads, metrics = jax.jit(learner.meta_grad)(params, batch, None)
  chex.assert_trees_all_close(grads.student.params,
                              jax.grad(reference)(student.params),
                              atol=1e-5, rtol=1e-4)
  assert float(metrics["outer/kd_loss"]) > 0.0
  chex.assert_trees_all_equal(grads.teacher, teacher)
  marks = learner.carried(params)
  assert all(jax.tree.leaves(marks.teacher))
  assert all(jax.tree.leaves(marks.student.model_state))
  assert not any(jax.tree.leaves(marks.student.params))

  tx = optax.adam(1e-2)
  state = training.init_state(learner, tx, batches, jax.random.key(1))
  step = jax.jit(training.make_meta_step(learner, tx, batches,
                                         meta_batch_size=1))
  new, _ = step(state, batches.data, jax.random.key(3))
  chex.assert_trees_all_equal(new.meta_params.teacher,
                              state.meta_params.teacher)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       new.meta_params.student.params,
                       state.meta_params.student.params)
  assert min(jax.tree.leaves(moved)) > 0.0
  # Tests read the student.
  episode = sampler.sample(jax.random.key(4), pool)
  fit = learner.adapt(new.meta_params, episode, None, training=False)
  plain = metalearners.rfs(embed, 6)
  chex.assert_trees_all_close(
      fit, plain.adapt(new.meta_params.student, episode, None,
                       training=False), atol=1e-6)


def test_train_sampler_checks_num_classes_and_draws_global_batches():
  pool = _pool()
  sampler = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
                                  num_queries=2)
  small = metalearners.baseline(models.conv4(None, norm="none"), 5)
  with pytest.raises(ValueError, match=r"learner.num_classes=5 .* 6 classes"):
    small.train_sampler(sampler)
  learner = metalearners.rfs(models.conv4(None, norm="none"), 6,
                             batch_size=12)
  batches = learner.train_sampler(sampler)
  batch = batches.sample(jax.random.key(0), batches.data)
  assert batch.support_y.shape == (12,)
  assert batch.query_x.shape[0] == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes"),
    ({"batch_size": 0}, "batch_size"),
    ({"train_head": "logistic"}, "train_head"),
    ({"test_head": "svm"}, "test_head"),
    ({"finetune_steps": 0}, "finetune_steps"),
    ({"c": 0.0}, "c must be"),
    ({"dampening": 1.0}, "dampening"),
    ({"backbone_steps": -1}, "backbone_steps"),
    ({"kd_weight": -1.0}, "kd_weight"),
    ({"kd_weight": 0.5, "kd_temperature": 0.0}, "kd_temperature"),
    ({"ce_weight": 0.0}, "ce_weight \\+ kd_weight"),
    ({"backbone_lr": -0.1}, "backbone_lr"),
    ({"backbone_augment": "flip"}, "backbone_augment must be"),
    ({"backbone_augment": {"flip": {"p": 0.5}}},
     r"backbone_augment.flip.p is not an argument"),
])
def test_bad_arguments_are_rejected(kwargs, match):
  args = {"num_classes": 6, **kwargs}
  with pytest.raises(ValueError, match=match):
    metalearners.supervised(models.conv4(None, norm="none"), **args)


@pytest.mark.parametrize("norm", ["transductive", "support"])
def test_unsupported_norms_are_rejected(norm):
  with pytest.raises(ValueError, match="norm='running' or norm='none'"):
    metalearners.baseline(models.conv4(None, norm=norm), 6)


def test_pretraining_on_omniglot_improves_few_shot_accuracy(omniglot):
  """40 steps of pretraining on 30 training classes beat the untrained
  backbone on 5-way 1-shot episodes of validation classes."""
  train = ClassPool(omniglot.train.images[:30], omniglot.train.class_ids[:30])
  val = ClassPool(omniglot.val.images[:40], omniglot.val.class_ids[:40])
  episodes = tasks.sample_batch(
      tasks.episode_sampler(val, num_ways=5, num_shots=1, num_queries=5),
      jax.random.key(9), 100)
  learner = metalearners.baseline(
      models.conv4(None, features=8, norm="running"), 30, batch_size=32,
      finetune_steps=20, finetune_lr=0.1, dampening=0.0)
  sampler = learner.train_sampler(
      tasks.episode_sampler(train, num_ways=5, num_shots=1, num_queries=1))
  tx = optax.adam(3e-3)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  step = training.make_meta_step(learner, tx, sampler, meta_batch_size=1)

  @jax.jit
  def accuracy(meta_params):
    def one(episode):
      head = learner.adapt(meta_params, episode, None, training=False)
      return learner.evaluate(meta_params, head, episode)[1][
          "outer/accuracy"]
    return jax.vmap(one)(episodes).mean()

  before = float(accuracy(state.meta_params))
  for t in range(40):
    state, _ = step(state, sampler.data, jax.random.key(t))
  after = float(accuracy(state.meta_params))
  assert after > before + 0.08, (before, after)
