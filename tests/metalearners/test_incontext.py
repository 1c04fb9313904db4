"""The in-context learner: its cache against a full masked pass, set
semantics over the support set, label slots, and a task it must learn.

The tasks are vectors through a small MLP encoder, so the tests compile
little. The conformance suite (common_test.py) runs the learner on a Conv-4
with running and support statistics: jit, vmap, retracing, the carried
running statistics and the independence of queries.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training
from metalearn.types import Episode

MAX_WAYS = 5
SIZES = {"dim": 16, "depth": 2, "num_heads": 2}
WIDTH = 8


def _cluster_episode(key, num_ways=2, num_shots=2, num_queries=4):
  """An episode of vectors: each class is a random centre drawn for this
  episode, its examples the centre plus noise, so only the support set
  tells which label goes where."""
  centre_key, noise_key = jax.random.split(key)
  centres = jax.random.normal(centre_key, (num_ways, WIDTH))
  ys = jnp.arange(num_ways * num_shots, dtype=jnp.int32) % num_ways
  yq = jnp.arange(num_ways * num_queries, dtype=jnp.int32) % num_ways
  noise = 0.3 * jax.random.normal(noise_key, (len(ys) + len(yq), WIDTH))
  x = centres[jnp.concatenate([ys, yq])] + noise
  return Episode(x[:len(ys)], ys, x[len(ys):], yq)


# Jitted: sampling op by op would cost more than the tests.
_episode = jax.jit(_cluster_episode, static_argnums=(1, 2, 3))


def _learner(max_ways=MAX_WAYS, **kwargs):
  """In-context learning on vectors, through a small MLP encoder."""
  return metalearners.in_context(
      models.mlp(16, hidden=(32,)), max_ways=max_ways,
      **{**SIZES, **kwargs})


@functools.cache
def _setup():
  learner = _learner()
  params = jax.jit(learner.init)(jax.random.key(1),
                                 _episode(jax.random.key(0)))
  return learner, params


@functools.cache
def _logits_fn():
  """Jitted ``adapt`` then ``predict`` on the episode's queries, and
  ``evaluate``'s loss."""
  learner, params = _setup()

  @jax.jit
  def logits(episode):
    task_params = learner.adapt(params, episode, None, training=False)
    loss, _ = learner.evaluate(params, task_params, episode)
    return learner.predict(params, task_params, episode.query_x), loss

  return logits


def test_cache_path_equals_one_masked_pass():
  learner, params = _setup()
  episode = _episode(jax.random.key(1), 3)
  got, loss = _logits_fn()(episode)
  net = metalearners.InContextTransformer(MAX_WAYS, **SIZES)

  @jax.jit
  def reference(support_y):
    # One pass of the transformer over [support; query] with the mask.
    encoder = models.mlp(16, hidden=(32,))
    zs = encoder.apply(params.embed, episode.support_x)
    zq = encoder.apply(params.embed, episode.query_x)
    return net.apply({"params": params.transformer}, zs, support_y, zq)

  full = reference(episode.support_y)
  np.testing.assert_allclose(got[:, :3], full[:, :3], rtol=1e-5, atol=1e-5)
  # The masked pass really reads the support labels.
  other = reference((episode.support_y + 1) % 3)
  assert not np.allclose(full[:, :3], other[:, :3], atol=1e-3)
  # evaluate scores the same logits.
  want = optax.softmax_cross_entropy_with_integer_labels(
      got, episode.query_y).mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_support_order_does_not_change_the_logits():
  episode = _episode(jax.random.key(2), 3)
  order = np.array([4, 1, 5, 0, 3, 2])
  shuffled = episode._replace(support_x=episode.support_x[order],
                              support_y=episode.support_y[order])
  logits = _logits_fn()
  first, second = logits(episode)[0], logits(shuffled)[0]
  np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)
  # Not vacuous: the labels' order matters once detached from the inputs.
  relabelled = episode._replace(support_y=episode.support_y[order])
  assert not np.allclose(first, logits(relabelled)[0], atol=1e-3)


@pytest.mark.parametrize("num_ways,num_shots", [(2, 3), (MAX_WAYS, 1)],
                         ids=["2w3s", "5w1s"])
def test_absent_slots_are_minus_inf(num_ways, num_shots):
  episode = _episode(jax.random.key(3), num_ways, num_shots)
  logits, loss = _logits_fn()(episode)
  assert logits.shape == (4 * num_ways, MAX_WAYS)
  assert np.all(np.isfinite(logits[:, :num_ways])) and np.isfinite(loss)
  assert np.all(logits[:, num_ways:] == -np.inf)


def test_more_ways_than_slots_raise():
  learner = _learner(max_ways=2)
  episode = _episode(jax.random.key(0), 3)
  params = jax.jit(learner.init)(jax.random.key(1), episode)
  with pytest.raises(ValueError, match="max_ways=2"):
    learner.adapt(params, episode, None, training=False)
  # Under jit the number of ways is data: the host check fails the call.
  meta_grad = jax.jit(learner.meta_grad)
  with pytest.raises(Exception, match="max_ways=2"):
    jax.block_until_ready(meta_grad(params, episode, jax.random.key(0)))
  # Two ways in as many support examples: the same check, no error.
  two = episode._replace(support_y=episode.support_y % 2,
                         query_y=episode.query_y % 2)
  jax.block_until_ready(meta_grad(params, two, jax.random.key(0)))


@pytest.mark.parametrize(
    "kwargs", [{"max_ways": 0}, {"max_ways": 5, "dim": 10, "num_heads": 4},
               {"max_ways": 5, "depth": 0}],
    ids=["no_slots", "heads_do_not_divide", "no_layers"])
def test_bad_sizes_raise(kwargs):
  with pytest.raises(ValueError):
    metalearners.in_context(models.conv4(None), **kwargs)


def test_permuted_labels_train_the_drawn_slots():
  # The label embedding rows (slots 0..4, then "unknown") that get a
  # gradient are those of the slots the key sent the two labels to.
  episode = _episode(jax.random.key(0))
  key = jax.random.key(3)
  drawn = set(np.asarray(jax.random.permutation(key, MAX_WAYS))[:2].tolist())
  assert drawn != {0, 1}  # so the check below can tell
  learner, params = _setup()
  grads, _ = jax.jit(learner.meta_grad)(params, episode, key)
  table = grads.transformer["labels"]["embedding"]
  rows = set(np.flatnonzero(np.abs(table).sum(1) > 0).tolist())
  assert rows == drawn | {MAX_WAYS}


def test_learns_a_tiny_in_context_task():
  # 300 meta-steps of 16 two-way episodes, compiled as one scan.
  learner = _learner(max_ways=2, dim=32, depth=1)
  tx = optax.adam(3e-3)

  def step(carry, key):
    params, opt_state = carry
    keys = jax.random.split(key, (2, 16))
    episodes = jax.vmap(_cluster_episode)(keys[0])
    grads, metrics = jax.vmap(learner.meta_grad, (None, 0, 0))(
        params, episodes, keys[1])
    grads = jax.tree.map(lambda g: g.mean(0), grads)
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), metrics

  @jax.jit
  def train_and_test(key):
    init_key, train_key, test_key = jax.random.split(key, 3)
    params = learner.init(init_key, _cluster_episode(init_key))
    (params, _), metrics = jax.lax.scan(
        step, (params, tx.init(params)), jax.random.split(train_key, 300))
    # New episodes at meta-test, through adapt and predict.
    episode = _cluster_episode(test_key, num_queries=50)
    logits = learner.predict(params, learner.adapt(params, episode, None),
                             episode.query_x)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == episode.query_y)
    return metrics["outer/loss"].mean(1), accuracy

  loss, accuracy = train_and_test(jax.random.key(0))
  assert loss[:10].mean() > 0.5, loss[:10]  # chance is log 2 = 0.69
  assert loss[-20:].mean() < 0.25, loss[-20:]
  assert accuracy > 0.9, accuracy


def test_a_frozen_encoder_stays_as_loaded_and_the_rest_learns():
  learner = _learner(freeze_encoder=True)
  sampler = tasks.TaskSampler(
      lambda key, data: _cluster_episode(key), None)
  # Weight decay would move any parameter that a zero gradient left alone.
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  marks = learner.carried(state.meta_params)
  assert all(jax.tree.leaves(marks.embed))
  assert not any(jax.tree.leaves(marks.transformer))
  step = training.make_meta_step(learner, tx, sampler, meta_batch_size=2)
  before = jax.device_get(state.meta_params)  # The step donates the state.
  trained = state
  for i in range(2):
    trained, metrics = step(trained, None, jax.random.key(i))
  assert np.isfinite(float(metrics["outer/loss"]))
  jax.tree.map(np.testing.assert_array_equal, trained.meta_params.embed,
               before.embed)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       trained.meta_params.transformer, before.transformer)
  assert max(jax.tree.leaves(moved)) > 1e-3
  # Unfrozen, the same step moves the encoder.
  free = _learner()
  state = training.init_state(free, tx, sampler, jax.random.key(0))
  before = jax.device_get(state.meta_params)
  trained, _ = training.make_meta_step(free, tx, sampler, meta_batch_size=2)(
      state, None, jax.random.key(0))
  assert not np.array_equal(jax.tree.leaves(trained.meta_params.embed)[0],
                            jax.tree.leaves(before.embed)[0])


def test_a_frozen_encoder_needs_its_own_statistics():
  with pytest.raises(ValueError, match="freeze_encoder needs an encoder"):
    metalearners.in_context(models.conv4(None, norm="support"), max_ways=5,
                            freeze_encoder=True)
