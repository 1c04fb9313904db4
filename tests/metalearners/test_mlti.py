"""Tests of task interpolation (MLTI), Model.layers and restrict_classes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import data, metalearners, models, tasks, training
from metalearn.metalearners import (
    EpisodePair,
    MetaLearner,
    MixedInputs,
    MixedLabels,
)
from metalearn.types import ClassPool, Episode

NUM_WAYS, SHOTS, QUERIES, DIM = 3, 2, 2, 6


def _chain(layers, params, h, start=0, stop=None):
  for stage in layers[start:stop]:
    h = stage(params, h)
  return h


def _vector_episode(key, shuffle=True) -> Episode:
  """A 3-way task of Gaussian vectors, labels in a random order."""
  def part(k, per_class):
    y = jnp.repeat(jnp.arange(NUM_WAYS, dtype=jnp.int32), per_class)
    if shuffle:
      y = jax.random.permutation(jax.random.fold_in(k, 1), y)
    x = jax.random.normal(k, (y.shape[0], DIM)) + y[:, None]
    return x, y

  k1, k2 = jax.random.split(key)
  return Episode(*part(k1, SHOTS), *part(k2, QUERIES))


def _vector_sampler() -> tasks.TaskSampler:
  return tasks.TaskSampler(lambda k, d: _vector_episode(k), None)


def _image_sampler(num_classes=6, size=8):
  images = np.random.default_rng(0).integers(
      0, 256, (num_classes, 5, size, size, 1), dtype=np.uint8
  )
  pool = ClassPool(jnp.asarray(images), jnp.arange(num_classes))
  return tasks.episode_sampler(
      pool, num_ways=NUM_WAYS, num_shots=SHOTS, num_queries=QUERIES
  )


# Model.layers ------------------------------------------------------------


@pytest.mark.parametrize(
    "model,shape",
    [
        (models.conv4(3, features=4, downsample="stride"), (5, 16, 16, 1)),
        (models.conv4(None, features=4), (5, 16, 16, 1)),
        (models.mlp(2, hidden=(5, 7)), (5, 3)),
        (models.resnet12(3, widths=(2, 2, 2, 2)), (2, 16, 16, 3)),
    ],
    ids=["conv4_stride", "conv4_embedding", "mlp", "resnet12"],
)
def test_layers_compose_to_apply(model, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  params = jax.jit(model.init)(jax.random.key(1), x)
  whole, chained = jax.jit(
      lambda p, x: (model.apply(p, x), _chain(model.layers, p, x))
  )(params, x)
  chex.assert_trees_all_equal(whole, chained)


def test_model_without_layers_is_rejected():
  bare = models.Model(models.mlp().init, models.mlp().apply)
  assert bare.layers is None
  with pytest.raises(ValueError, match="model.layers"):
    metalearners.feature_mixing(bare)
  with pytest.raises(ValueError, match="model.layers"):
    metalearners.mlti(metalearners.maml, bare, _vector_sampler())
  with pytest.raises(ValueError, match="mix_layers"):
    metalearners.feature_mixing(models.mlp(), mix_layers=(3,))


# Feature mixing and labels ----------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_mixed_features_are_the_convex_combination(layer):
  model = models.mlp(3, hidden=(8, 8))
  mixing = metalearners.feature_mixing(model)
  x, other = jax.random.normal(jax.random.key(0), (2, 4, 5))
  params = model.init(jax.random.key(1), x)
  lam = 0.3

  @jax.jit
  def both(params):
    out = mixing.apply(params, MixedInputs(x, other, lam, layer))
    h = lam * _chain(model.layers, params, x, 0, layer) + (
        1 - lam
    ) * _chain(model.layers, params, other, 0, layer)
    return out, _chain(model.layers, params, h, layer)

  out, expected = both(params)
  chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
  # On plain arrays the mixing model is the model.
  chex.assert_trees_all_equal(mixing.apply(params, x), model.apply(params, x))


def test_pairing_matches_classes_by_one_permutation():
  # x encodes (class, shot): the partner row paired with a task row must
  # be the same shot of the class the permutation assigns.
  a, b = _vector_episode(jax.random.key(0)), _vector_episode(
      jax.random.key(1)
  )
  ident = lambda y: (y * 10 + _shot_index(y)).astype(jnp.float32)  # noqa
  b = b._replace(support_x=ident(b.support_y)[:, None],
                 query_x=ident(b.query_y)[:, None])
  a = a._replace(support_x=ident(a.support_y)[:, None],
                 query_x=ident(a.query_y)[:, None])
  for seed in range(5):
    mixed = metalearners.interpolate_tasks(
        a, b, 0.4, key=jax.random.key(seed), layer=1
    )
    assert isinstance(mixed.support_x, MixedInputs)
    chex.assert_trees_all_equal(mixed.support_y, a.support_y)
    chex.assert_trees_all_equal(mixed.query_y, a.query_y)
    chex.assert_trees_all_equal(mixed.support_x.x, a.support_x)
    chex.assert_trees_all_equal(mixed.query_x.x, a.query_x)
    perms = []
    for x in (mixed.support_x, mixed.query_x):
      task_cls, task_shot = np.divmod(np.asarray(x.x[:, 0]), 10)
      other_cls, other_shot = np.divmod(np.asarray(x.other[:, 0]), 10)
      np.testing.assert_array_equal(task_shot, other_shot)
      perm = {}
      for c, o in zip(task_cls, other_cls, strict=True):
        assert perm.setdefault(c, o) == o, "a class paired with two classes"
      assert sorted(perm.values()) == list(range(NUM_WAYS))
      perms.append(perm)
      assert float(x.lam) == pytest.approx(0.4) and int(x.layer) == 1
    assert perms[0] == perms[1], "support and query paired differently"


def _shot_index(y):
  """The rank of each row among the rows of its class."""
  same = y[:, None] == y[None, :]
  return jnp.sum(jnp.tril(same, -1), axis=1)


def test_label_sharing_mixes_labels_and_targets():
  a, b = _vector_episode(jax.random.key(0)), _vector_episode(
      jax.random.key(1)
  )
  mixed = metalearners.interpolate_tasks(
      a, b, 0.25, key=jax.random.key(2), label_sharing=True
  )
  labels = mixed.support_y
  assert isinstance(labels, MixedLabels)
  chex.assert_trees_all_equal(labels.labels, a.support_y)
  assert float(labels.lam) == 0.25
  # The other labels are the labels of the partner rows mixed in.
  rows = [int(np.flatnonzero((b.support_x == o).all(1))[0])
          for o in np.asarray(mixed.support_x.other)]
  np.testing.assert_array_equal(labels.other, b.support_y[np.array(rows)])
  # Float targets: the convex combination of the paired targets.
  s = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  ra, rb = s.sample(jax.random.key(3), None), s.sample(jax.random.key(4),
                                                        None)
  reg = metalearners.interpolate_tasks(
      ra, rb, 0.25, key=jax.random.key(5), label_sharing=True
  )
  rows = [int(np.flatnonzero(rb.query_x[:, 0] == o)[0])
          for o in np.asarray(reg.query_x.other[:, 0])]
  np.testing.assert_allclose(
      reg.query_y, 0.25 * ra.query_y + 0.75 * rb.query_y[np.array(rows)],
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match="label_sharing"):
    metalearners.interpolate_tasks(ra, rb, 0.5, key=jax.random.key(0))


def test_task_loss_of_mixed_labels_is_soft_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (7, 4))
  y = jnp.array([0, 1, 2, 3, 0, 1, 2])
  other = jnp.array([1, 1, 0, 2, 3, 3, 2])
  lam = 0.3
  loss, metrics = metalearners.task_loss(logits, MixedLabels(y, other, lam))
  soft = lam * jax.nn.one_hot(y, 4) + (1 - lam) * jax.nn.one_hot(other, 4)
  expected = optax.softmax_cross_entropy(logits, soft).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  pred = jnp.argmax(logits, -1)
  np.testing.assert_allclose(
      metrics["outer/accuracy"],
      lam * jnp.mean(pred == y) + (1 - lam) * jnp.mean(pred == other),
      rtol=1e-6,
  )


def test_cutmix_pastes_one_box():
  x = jnp.zeros((3, 12, 10, 2))
  other = jnp.ones((3, 12, 10, 2))
  key = jax.random.key(4)
  same, lam_eff = metalearners.cutmix(key, x, other, 1.0)
  chex.assert_trees_all_equal(same, x)
  assert float(lam_eff) == 1.0
  mixed, lam_eff = metalearners.cutmix(key, x, other, 0.5)
  box = np.asarray(mixed[0, :, :, 0])
  assert set(np.unique(np.asarray(mixed))) <= {0.0, 1.0}
  np.testing.assert_array_equal(mixed, np.broadcast_to(box[None, :, :, None],
                                                       mixed.shape))
  assert float(lam_eff) == pytest.approx(1 - box.mean())
  rows, cols = np.nonzero(box)
  assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1), "not a box"
  again, _ = metalearners.cutmix(key, x[:1], other[:1], 0.5)
  chex.assert_trees_all_equal(again[0], mixed[0])
  areas = [
      1 - float(metalearners.cutmix(jax.random.key(i), x, other, 0.5)[1])
      for i in range(40)
  ]
  # Unclipped boxes have side floor(S / sqrt 2): 8 x 7 of 12 x 10 pixels.
  assert max(areas) == pytest.approx(56 / 120)
  assert 0.2 < np.mean(areas) <= 56 / 120


# The wrapper -------------------------------------------------------------


def _maml(model):
  return metalearners.maml(model, inner_lr=0.4)


def _flat_mlp(num_outputs=4):
  """A small image embedding without convolutions (cheap to compile)."""
  mlp = models.mlp(num_outputs, hidden=(8,))
  flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
  return models.Model(
      lambda k, x: mlp.init(k, flat(x)), lambda p, x: mlp.apply(p, flat(x))
  )


CASES = {
    "maml": (_maml, lambda: models.mlp(NUM_WAYS, hidden=(8,)),
             _vector_sampler, {}),
    "reptile": (functools.partial(metalearners.reptile, inner_lr=0.1),
                lambda: models.mlp(NUM_WAYS, hidden=(8,)),
                _vector_sampler, {}),
    "reptile_carried": (
        functools.partial(metalearners.reptile, num_inner_steps=2,
                          inner_optimizer=optax.adam(0.01, b1=0.0),
                          carry_inner_state=True),
        lambda: models.mlp(NUM_WAYS, hidden=(8,)), _vector_sampler, {}),
    "protonet_features": (metalearners.protonet,
                          lambda: models.mlp(4, hidden=(8,)),
                          _vector_sampler, {}),
    "protonet_cutmix": (metalearners.protonet, _flat_mlp, _image_sampler,
                        {"mix": "cutmix"}),
    "maml_sinusoid": (_maml, lambda: models.mlp(1, hidden=(8,)),
                      lambda: tasks.sinusoid_sampler(num_shots=5,
                                                     num_queries=5),
                      {"label_sharing": True}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lambda_one_reproduces_the_wrapped_learner(name):
  learner_fn, make_model, make_sampler, kwargs = CASES[name]
  model, sampler = make_model(), make_sampler()
  base = learner_fn(model)
  always = metalearners.mlti(learner_fn, model, sampler, prob=1.0,
                             self_mix_prob=0.0, fixed_lambda=1.0, **kwargs)
  itself = metalearners.mlti(learner_fn, model, sampler, prob=1.0,
                             self_mix_prob=1.0, fixed_lambda=1.0, **kwargs)
  never = metalearners.mlti(learner_fn, model, sampler, prob=0.0, **kwargs)
  mixed = metalearners.mlti(learner_fn, model, sampler, prob=1.0,
                            self_mix_prob=0.0, **kwargs)
  episode = sampler.sample(jax.random.key(0), sampler.data)
  params = always.init(jax.random.key(1), episode)
  chex.assert_trees_all_equal(params, base.init(jax.random.key(1), episode))
  # Carried state (Reptile's inner optimiser state) passes through.
  assert (always.carried is None) == (base.carried is None)
  if base.carried is not None:
    assert jax.tree.leaves(always.carried(params)) == jax.tree.leaves(
        base.carried(params))
    assert any(jax.tree.leaves(base.carried(params)))
  key = jax.random.key(2)

  @jax.jit
  def grads(params):
    return [
        learner.meta_grad(params, episode, key)
        for learner in (base, always, itself, never, mixed)
    ]

  reference, *wrapped = grads(params)
  for out in wrapped[:3]:
    chex.assert_trees_all_close(out, reference, rtol=1e-6, atol=1e-7)
  chex.assert_tree_all_finite(wrapped[3])
  difference = jax.tree.map(lambda a, b: jnp.abs(a - b).max(),
                            wrapped[3][0], reference[0])
  assert max(jax.tree.leaves(difference)) > 1e-4, "mixing changed nothing"


@pytest.mark.parametrize("label_sharing", [False, True],
                         ids=["new_classes", "mixed_labels"])
def test_reptile_with_inner_mini_batches(label_sharing):
  """Mini-batches take rows of the mixed inputs and labels, not their lam."""
  sampler = _vector_sampler()
  model = models.mlp(NUM_WAYS, hidden=(8,))
  learner_fn = functools.partial(metalearners.reptile, inner_lr=0.1,
                                 num_inner_steps=4, inner_batch_size=2)
  learner = metalearners.mlti(learner_fn, model, sampler, prob=1.0,
                              label_sharing=label_sharing)
  episode = sampler.sample(jax.random.key(0), None)
  params = learner.init(jax.random.key(1), episode)
  grads, metrics = jax.jit(learner.meta_grad)(params, episode,
                                              jax.random.key(2))
  chex.assert_trees_all_equal_structs(grads, params)
  chex.assert_tree_all_finite((grads, metrics))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def _probe(model):
  """A learner whose 'meta-gradient' reports the interpolation it got."""
  del model

  def meta_grad(params, episode, key):
    del key
    x = episode.support_x
    if not isinstance(x, MixedInputs):  # CutMix: the mixed images.
      return params, {"support_x": x, "query_x": episode.query_x}
    return params, {"lam": x.lam, "layer": x.layer, "x": x.x,
                    "other": x.other, "query_x": episode.query_x.x,
                    "query_other": episode.query_x.other,
                    "support_y": episode.support_y,
                    "query_y": episode.query_y}

  return MetaLearner(lambda k, e: jnp.zeros(()), None, None, meta_grad)


def test_lambda_is_beta_distributed_and_tasks_mixed_with_prob():
  sampler = _marked_sampler()
  learner = metalearners.mlti(_probe, models.mlp(1, hidden=(4, 4)), sampler,
                              prob=0.6, self_mix_prob=0.0, alpha=2.0,
                              beta=5.0, mix_layers=(1, 2))
  episode = sampler.sample(jax.random.key(0), None)
  keys = jax.random.split(jax.random.key(1), 4000)
  _, out = jax.jit(jax.vmap(learner.meta_grad, (None, None, 0)))(
      jnp.zeros(()), episode, keys
  )
  lam, layer = np.asarray(out["lam"]), np.asarray(out["layer"])
  mixed = lam < 1.0
  assert mixed.mean() == pytest.approx(0.6, abs=0.03)
  assert lam[mixed].mean() == pytest.approx(2 / 7, abs=0.01)  # Beta mean.
  assert set(np.unique(layer)) == {1, 2}
  assert (layer == 1).mean() == pytest.approx(0.5, abs=0.03)
  # self_mix_prob=0: the partner is always another task.
  assert not _is_self(out).any()


def _marked_sampler() -> tasks.TaskSampler:
  """Tasks whose inputs encode (task, class, shot): 100 t + 10 c + s.

  Exact in float32: t < 10**5.
  """

  def part(y, mark):
    return (mark + 10 * y + _shot_index(y)).astype(jnp.float32)[:, None]

  def sample(key, data):
    del data
    episode = _vector_episode(key)
    mark = 100.0 * jax.random.randint(jax.random.fold_in(key, 7), (), 1,
                                      10**5)
    return episode._replace(support_x=part(episode.support_y, mark),
                            query_x=part(episode.query_y, mark))

  return tasks.TaskSampler(sample, None)


def _is_self(out):
  """Per task: whether its partner rows come from the task itself."""
  task = np.asarray(out["x"][..., 0]) // 100
  other = np.asarray(out["other"][..., 0]) // 100
  return (task == other).all(-1)


def test_defaults_mix_every_task_half_with_itself():
  sampler = _marked_sampler()
  learner = metalearners.mlti(_probe, models.mlp(1, hidden=(4, 4)), sampler)
  keys = jax.random.split(jax.random.key(1), 2000)
  # Each task of the "batch" is its own episode, as the trainer maps them.
  episodes = jax.vmap(sampler.sample, (0, None))(keys, None)
  _, out = jax.jit(jax.vmap(learner.meta_grad, (None, 0, 0)))(
      jnp.zeros(()), episodes, jax.random.split(jax.random.key(2), 2000)
  )
  lam = np.asarray(out["lam"])
  assert (lam < 1.0).all() and (lam > 0.0).all(), "a task left unmixed"
  assert lam.mean() == pytest.approx(0.5, abs=0.02)  # Beta(2, 2).
  itself = _is_self(out)
  assert itself.mean() == pytest.approx(0.5, abs=0.04)
  other = np.asarray(out["other"][..., 0]) // 100
  task = np.asarray(out["x"][..., 0]) // 100
  assert (other[~itself] != task[~itself]).all()


def test_self_mixing_partner_is_the_task_with_classes_shuffled():
  sampler = _marked_sampler()
  model = models.mlp(1, hidden=(4, 4))
  learner = metalearners.mlti(_probe, model, sampler, self_mix_prob=1.0)
  episode = sampler.sample(jax.random.key(0), None)
  keys = jax.random.split(jax.random.key(1), 20)
  _, out = jax.jit(jax.vmap(learner.meta_grad, (None, None, 0)))(
      jnp.zeros(()), episode, keys
  )
  assert _is_self(out).all()
  perms = set()
  for i in range(len(keys)):
    # The task's own rows and labels, unchanged.
    np.testing.assert_array_equal(out["x"][i], episode.support_x)
    np.testing.assert_array_equal(out["support_y"][i], episode.support_y)
    np.testing.assert_array_equal(out["query_y"][i], episode.query_y)
    mapping = []
    for x, other in ((out["x"][i], out["other"][i]),
                     (out["query_x"][i], out["query_other"][i])):
      task_cls, task_shot = np.divmod(np.asarray(x[:, 0]) % 100, 10)
      other_cls, other_shot = np.divmod(np.asarray(other[:, 0]) % 100, 10)
      np.testing.assert_array_equal(task_shot, other_shot)
      perm = {}
      for c, o in zip(task_cls, other_cls, strict=True):
        assert perm.setdefault(c, o) == o, "a class paired with two classes"
      assert sorted(perm.values()) == list(range(NUM_WAYS))
      mapping.append(tuple(perm[c] for c in range(NUM_WAYS)))
    assert mapping[0] == mapping[1], "support and query paired differently"
    perms.add(mapping[0])
  assert len(perms) > 2, "the classes are not shuffled"
  # No other task is needed: sampler=None works without pairs.
  alone = metalearners.mlti(_probe, model, None, self_mix_prob=1.0)
  _, again = alone.meta_grad(jnp.zeros(()), episode, keys[0])
  assert _is_self(jax.tree.map(lambda a: a[None], again)).all()


def _valued_image_sampler(size=6) -> tasks.TaskSampler:
  """Tasks of constant images, each row its own value, each task its own."""

  def sample(key, data):
    del data
    episode = _vector_episode(key, shuffle=False)
    base = jax.random.uniform(key, (), minval=1.0, maxval=2.0)

    def images(n, offset):
      value = base + 10.0 * (offset + jnp.arange(n, dtype=jnp.float32))
      return jnp.broadcast_to(value[:, None, None, None], (n, size, size, 1))

    return episode._replace(
        support_x=images(episode.support_y.shape[0], 0),
        query_x=images(episode.query_y.shape[0], 100),
    )

  return tasks.TaskSampler(sample, None)


@pytest.mark.parametrize("shared_box", [False, True],
                         ids=["separate", "shared"])
def test_cutmix_boxes_for_support_and_query(shared_box):
  sampler = _valued_image_sampler()
  learner = metalearners.mlti(_probe, _flat_mlp(), sampler, mix="cutmix",
                              self_mix_prob=0.0, shared_box=shared_box)
  episode = sampler.sample(jax.random.key(0), None)
  keys = jax.random.split(jax.random.key(1), 10)
  _, out = jax.jit(jax.vmap(learner.meta_grad, (None, None, 0)))(
      jnp.zeros(()), episode, keys
  )
  support = np.asarray(out["support_x"] != episode.support_x)[..., 0]
  query = np.asarray(out["query_x"] != episode.query_x)[..., 0]
  # One box for all the images of a set.
  assert (support == support[:, :1]).all() and (query == query[:, :1]).all()
  support, query = support[:, 0], query[:, 0]
  assert support.any() and query.any(), "no box pasted"
  same = [(s == q).all() for s, q in zip(support, query, strict=True)]
  if shared_box:
    assert all(same)
  else:
    assert not all(same), "support and query share their boxes"


def test_partner_from_an_episode_pair():
  sampler = _vector_sampler()
  model = models.mlp(NUM_WAYS, hidden=(8,))
  learner = metalearners.mlti(_maml, model, None, prob=1.0)
  episode = sampler.sample(jax.random.key(0), None)
  params = learner.init(jax.random.key(1), episode)
  with pytest.raises(ValueError, match="paired_sampler"):
    learner.meta_grad(params, episode, jax.random.key(2))
  pairs = metalearners.paired_sampler(sampler)
  pair = pairs.sample(jax.random.key(3), None)
  chex.assert_trees_all_equal(pair.episode,
                              sampler.sample(jax.random.key(3), None))
  assert isinstance(pair, EpisodePair)
  chex.assert_trees_all_equal(learner.init(jax.random.key(1), pair), params)
  # With a pair the partner is the one given: the same as a learner whose
  # sampler always draws that partner.
  constant = tasks.TaskSampler(lambda k, d: pair.partner, None)
  drawn = metalearners.mlti(_maml, model, constant, prob=1.0)
  given, drawn = jax.jit(
      lambda p, k: (learner.meta_grad(p, pair, k),
                    drawn.meta_grad(p, pair.episode, k))
  )(params, jax.random.key(2))
  chex.assert_trees_all_equal(given, drawn)


def test_trains_on_a_paired_sampler_and_evaluates_plain_episodes():
  sampler = _vector_sampler()
  learner = metalearners.mlti(metalearners.maml,
                              models.mlp(NUM_WAYS, hidden=(8,)), None)
  pairs = metalearners.paired_sampler(sampler)
  state, history = training.meta_train(
      learner, optax.adam(1e-2), pairs, key=jax.random.key(0), num_steps=4,
      meta_batch_size=2, log_every=2, progress=False,
  )
  assert int(state.step) == 4 and len(history) == 2
  result = training.evaluate(learner, state.meta_params, sampler,
                             jax.random.key(1), num_episodes=4, batch_size=2)
  assert 0.0 <= result["outer/accuracy"] <= 1.0



def test_first_variant_leaves_tasks_unmixed():
  """prob=0.5, self_mix_prob=0, shared_box=True: the first variant."""
  sampler = _image_sampler()
  model = _flat_mlp()
  base = metalearners.protonet(model)
  first = metalearners.mlti(metalearners.protonet, model, sampler,
                            mix="cutmix", prob=0.5, self_mix_prob=0.0,
                            shared_box=True)
  episode = sampler.sample(jax.random.key(0), sampler.data)
  params = first.init(jax.random.key(1), episode)
  keys = jax.random.split(jax.random.key(2), 16)
  grads, reference = jax.jit(
      lambda p: (jax.vmap(first.meta_grad, (None, None, 0))(p, episode,
                                                            keys)[0],
                 base.meta_grad(p, episode, keys[0])[0])
  )(params)
  chex.assert_tree_all_finite(grads)
  # An unmixed task's gradient is the wrapped learner's.
  unmixed = np.array([
      all(np.allclose(g[i], r, rtol=1e-5, atol=1e-6)
          for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference),
                          strict=True))
      for i in range(len(keys))
  ])
  assert 0 < unmixed.sum() < len(keys)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mix": "mixup"}, "mix"),
        ({"prob": 1.5}, "prob"),
        ({"alpha": 0.0}, "alpha"),
        ({"fixed_lambda": -0.1}, "fixed_lambda"),
        ({"mix": "cutmix", "mix_layers": (0,)}, "mix_layers"),
        ({"self_mix_prob": -0.5}, "self_mix_prob"),
        ({"shared_box": True}, "shared_box"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    metalearners.mlti(_maml, models.mlp(3), _vector_sampler(), **kwargs)


# Few-task pools ----------------------------------------------------------


def _rotated_pool(num_chars=10):
  ids = 4 * (100 + np.arange(num_chars))[:, None] + np.arange(4)
  images = np.zeros((4 * num_chars, 2, 4, 4, 1), np.uint8)
  images[..., 0, 0, 0] = np.arange(4 * num_chars)[:, None]
  return ClassPool(images, ids.reshape(-1).astype(np.int32))


def test_restrict_classes_keeps_whole_groups():
  pool = _rotated_pool()
  few = data.restrict_classes(pool, 3, seed=1, group_size=4)
  assert few.num_classes == 12
  chars, rotations = np.divmod(few.class_ids, 4)
  assert len(set(chars)) == 3
  np.testing.assert_array_equal(rotations, np.tile(np.arange(4), 3))
  # Images travel with their ids.
  rows = [list(pool.class_ids).index(i) for i in few.class_ids]
  np.testing.assert_array_equal(few.images, pool.images[rows])
  again = data.restrict_classes(pool, 3, seed=1, group_size=4)
  np.testing.assert_array_equal(again.class_ids, few.class_ids)
  seeds = {tuple(data.restrict_classes(pool, 3, seed=s).class_ids)
           for s in range(5)}
  assert len(seeds) > 1, "the seed is ignored"
  chosen = data.restrict_classes(pool, classes=[2, 0], group_size=4)
  np.testing.assert_array_equal(chosen.class_ids // 4, [102] * 4 + [100] * 4)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_classes": 11, "group_size": 4}, "num_classes"),
        ({"num_classes": 2, "group_size": 3}, "group_size"),
        ({"classes": [0, 0]}, "classes"),
        ({"classes": [40]}, "classes"),
        ({}, "num_classes"),
    ],
)
def test_restrict_classes_rejects_bad_requests(kwargs, field):
  with pytest.raises(ValueError, match=field):
    data.restrict_classes(_rotated_pool(), **kwargs)


def test_restrict_classes_rejects_misaligned_groups():
  pool = _rotated_pool()
  shifted = pool._replace(class_ids=pool.class_ids + 1)
  with pytest.raises(ValueError, match="aligned groups"):
    data.restrict_classes(shifted, 2, group_size=4)


def test_fifty_omniglot_characters(omniglot):
  few = data.restrict_classes(omniglot.train, 50, seed=0, group_size=4)
  assert few.num_classes == 200
  assert len(np.unique(np.asarray(few.class_ids) // 4)) == 50
  assert set(np.asarray(few.class_ids)) <= set(
      np.asarray(omniglot.train.class_ids))
  sampler = tasks.episode_sampler(few, num_ways=5, num_shots=1,
                                  num_queries=5)
  episode = sampler.sample(jax.random.key(0), few)
  assert episode.support_x.shape == (5, 28, 28, 1)


@pytest.mark.slow
def test_mlti_protonet_learns_few_task_omniglot(omniglot):
  """ProtoNet+MLTI (CutMix) on 20 characters beats chance on test ones."""
  few = data.restrict_classes(omniglot.train, 20, seed=0, group_size=4)
  train = tasks.episode_sampler(few, num_ways=5, num_shots=1, num_queries=5)
  test = tasks.episode_sampler(omniglot.test, num_ways=5, num_shots=1,
                               num_queries=5)
  learner = metalearners.mlti(metalearners.protonet,
                              models.conv4(None, features=16), train,
                              mix="cutmix")
  state, _ = training.meta_train(
      learner, optax.adam(1e-3), train, key=jax.random.key(0),
      num_steps=150, meta_batch_size=4, log_every=50, progress=False,
  )
  result = training.evaluate(learner, state.meta_params, test,
                             jax.random.key(1), num_episodes=100)
  assert result["outer/accuracy"] > 0.5  # Chance is 0.2.


def test_merge_pools_concatenates_classes_with_their_images():
  pool = _rotated_pool(6)
  a = data.restrict_classes(pool, classes=[0, 1, 2], group_size=4)
  b = data.restrict_classes(pool, classes=[4, 5], group_size=4)
  merged = data.merge_pools(a, b)
  np.testing.assert_array_equal(
      merged.class_ids, np.concatenate([a.class_ids, b.class_ids]))
  np.testing.assert_array_equal(
      merged.images, np.concatenate([a.images, b.images]))
  assert data.merge_pools(a) is a
  with pytest.raises(ValueError, match="more than one pool"):
    data.merge_pools(a, a)
  other = ClassPool(np.zeros((4, 3, 4, 4, 1), np.uint8),
                    np.arange(900, 904, dtype=np.int32))
  with pytest.raises(ValueError, match="examples per class"):
    data.merge_pools(a, other)
  with pytest.raises(ValueError, match="at least one"):
    data.merge_pools()
