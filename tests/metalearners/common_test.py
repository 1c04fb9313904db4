"""Conformance tests that every meta-learner must pass.

One parametrized suite over :data:`LEARNERS_UNDER_TEST`, in the manner of
optax's ``contrib/_common_test.py``: a new learner (a learned optimiser, an
MLTI wrapper) joins by adding one :class:`LearnerCase` line. Each case is
checked for: ``init`` giving a pytree of arrays, deterministic in its key;
``meta_grad`` under ``jit`` and under ``vmap`` over tasks, with shapes
matching the meta-parameters and finite, non-zero values; the jitted
meta-step running twice without retracing (under the "scan" task map, and
for one learner of each kind of meta-gradient under "vmap" too, the two
maps agreeing on the meta-gradient); the metric names of ``evaluate``; and
``adapt`` with the meta-test settings (``training=False``).

Tasks are tiny and synthetic (random Omniglot-shaped images, sinusoids) and
the network is one Conv-4 block, so the suite spends its time compiling,
not running, and compiles small programs.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import learned_optimizers as lo
from metalearn import metalearners, models, tasks, training
from metalearn.metalearners import MetaLearner
from metalearn.types import ClassPool

NUM_WAYS = 3
META_BATCH = 2
# pytest-xdist groups (tests/conftest.py): the tests of one learner run in
# one worker, where they share its compiled programs (the caches below).
XDIST_GROUP_BY = "case"


class LearnerCase(NamedTuple):
  """A learner under test: a readable id, a factory call and a task name.

  Attributes:
    name: the pytest id.
    make: builds the learner (called once per test process).
    task: a key of :data:`TASKS` (``"omniglot"``: 3-way 1-shot episodes of
      random 28x28 images with 2 queries per class; ``"sinusoid"``: 5-shot
      sinusoid regression).
  """

  name: str
  make: Callable[[], MetaLearner]
  task: str


def _omniglot_like() -> tasks.TaskSampler:
  images = np.random.default_rng(0).integers(
      0, 256, (6, 5, 28, 28, 1), dtype=np.uint8
  )
  pool = ClassPool(jnp.asarray(images), jnp.arange(6, dtype=jnp.int32))
  return tasks.episode_sampler(
      pool, num_ways=NUM_WAYS, num_shots=1, num_queries=2
  )


TASKS: dict[str, Callable[[], tasks.TaskSampler]] = {
    "omniglot": _omniglot_like,
    "sinusoid": lambda: tasks.sinusoid_sampler(num_shots=5, num_queries=5),
}


def _conv(num_outputs=NUM_WAYS, norm="transductive"):
  """One Conv-4 block of 8 filters and the readout: the suite checks the
  learners' contract, which does not depend on the depth, and XLA compiles
  a one-block meta-step in well under half the time of a four-block one."""
  return models.conv4(num_outputs, features=8, norm=norm, num_blocks=1)


def _running(num_outputs=NUM_WAYS):
  """Conv-4 with batch-norm running statistics (model state)."""
  return _conv(num_outputs, norm="running")


LEARNERS_UNDER_TEST: tuple[LearnerCase, ...] = (
    LearnerCase("maml", lambda: metalearners.maml(_conv(), 0.4), "omniglot"),
    LearnerCase(
        "fomaml",
        lambda: metalearners.maml(_conv(), 0.4, first_order=True),
        "omniglot",
    ),
    LearnerCase("anil", lambda: metalearners.anil(_conv(), 0.4), "omniglot"),
    LearnerCase(
        "metasgd", lambda: metalearners.metasgd(_conv(), 0.4), "omniglot"
    ),
    LearnerCase(
        "reptile",
        lambda: metalearners.reptile(_conv(), 0.1, num_inner_steps=2),
        "omniglot",
    ),
    LearnerCase(
        "protonet", lambda: metalearners.protonet(_conv(None)), "omniglot"
    ),
    LearnerCase(
        "maml_sinusoid",
        lambda: metalearners.maml(models.mlp(), 0.01, num_inner_steps=2),
        "sinusoid",
    ),
    LearnerCase(
        "mlti_maml",
        lambda: metalearners.mlti(
            functools.partial(metalearners.maml, inner_lr=0.4), _conv(),
            TASKS["omniglot"](), prob=1.0,
        ),
        "omniglot",
    ),
    LearnerCase(
        "mlti_protonet_cutmix",
        lambda: metalearners.mlti(
            metalearners.protonet, _conv(None), TASKS["omniglot"](),
            mix="cutmix", prob=1.0,
        ),
        "omniglot",
    ),
    LearnerCase(
        "mlti_maml_sinusoid",
        lambda: metalearners.mlti(
            functools.partial(metalearners.maml, inner_lr=0.01), models.mlp(),
            TASKS["sinusoid"](), label_sharing=True, prob=1.0,
        ),
        "sinusoid",
    ),
    LearnerCase("meta_lstm", lambda: lo.meta_lstm(_conv(), 2), "omniglot"),
    # norm="running": the running statistics are carried meta-state.
    LearnerCase(
        "maml_running", lambda: metalearners.maml(_running(), 0.4),
        "omniglot",
    ),
    LearnerCase(
        "reptile_running",
        # Plain SGD: Adam would blow the rounding noise of the zero
        # gradients of convolution biases before batch norm up to full
        # steps, which differ between the task maps.
        lambda: metalearners.reptile(
            _running(), 0.1, num_inner_steps=2, inner_batch_size=2,
        ),
        "omniglot",
    ),
    LearnerCase(
        "protonet_running", lambda: metalearners.protonet(_running(None)),
        "omniglot",
    ),
    LearnerCase(
        "meta_lstm_running", lambda: lo.meta_lstm(_running(), 2),
        "omniglot",
    ),
    # norm="support": the support set's statistics, per task, not carried.
    LearnerCase(
        "maml_support", lambda: metalearners.maml(_conv(norm="support"), 0.4),
        "omniglot",
    ),
    LearnerCase(
        "protonet_support",
        lambda: metalearners.protonet(_conv(None, norm="support")),
        "omniglot",
    ),
    LearnerCase(
        "imaml",
        lambda: metalearners.imaml(_conv(), 0.1, 1, reg=2.0, cg_steps=2),
        "omniglot",
    ),
    # The ridge head on running statistics, as its experiments run it.
    LearnerCase(
        "r2d2_running", lambda: metalearners.r2d2(_running(None)), "omniglot"
    ),
    # A one-layer transformer over the support tokens (one label slot per
    # way: absent slots' -inf logits are tested in test_incontext.py).
    LearnerCase(
        "incontext_running",
        lambda: metalearners.in_context(
            _running(None), max_ways=NUM_WAYS, dim=16, depth=1,
            num_heads=2),
        "omniglot",
    ),
    # Supervised pretraining on the 6 classes of the pool, then a head
    # fitted per task (two SGD / L-BFGS steps at this size).
    LearnerCase(
        "baseline_running",
        lambda: metalearners.baseline(_running(None), 6, finetune_steps=2),
        "omniglot",
    ),
    # Cosine prototypes with a learned temperature (ProtoNet's variant).
    LearnerCase(
        "meta_baseline_running",
        lambda: metalearners.meta_baseline(_running(None)), "omniglot",
    ),
    # The SVM head, its dual solved in a few steps at this size.
    LearnerCase(
        "metaoptnet_running",
        lambda: metalearners.metaoptnet(_running(None), num_steps=20),
        "omniglot",
    ),
    LearnerCase(
        "rfs_running",
        lambda: metalearners.rfs(_running(None), 6, finetune_steps=2),
        "omniglot",
    ),
)

# Learners checked for the independence of a query's outputs only (one
# compiled call each): every built-in learner on a running-norm model.
INDEPENDENCE_ONLY: tuple[LearnerCase, ...] = (
    LearnerCase("anil_running", lambda: metalearners.anil(_running(), 0.4),
                "omniglot"),
    LearnerCase("metasgd_running",
                lambda: metalearners.metasgd(_running(), 0.4), "omniglot"),
    LearnerCase(
        "mlti_maml_running",
        lambda: metalearners.mlti(
            functools.partial(metalearners.maml, inner_lr=0.4), _running(),
            TASKS["omniglot"](), prob=1.0,
        ),
        "omniglot",
    ),
    LearnerCase(
        "mlti_protonet_running",
        lambda: metalearners.mlti(
            metalearners.protonet, _running(None), TASKS["omniglot"](),
            mix="cutmix", prob=1.0,
        ),
        "omniglot",
    ),
    LearnerCase(
        "lopt_running",
        lambda: lo.learned_optimizer_learner(
            _running(), lo.meta_lstm_optimizer(), 2),
        "omniglot",
    ),
    LearnerCase("protonet_no_norm",
                lambda: metalearners.protonet(_conv(None, norm="none")),
                "omniglot"),
    LearnerCase("anil_support",
                lambda: metalearners.anil(_conv(norm="support"), 0.4),
                "omniglot"),
    LearnerCase("metasgd_support",
                lambda: metalearners.metasgd(_conv(norm="support"), 0.4),
                "omniglot"),
    LearnerCase(
        "reptile_support",
        lambda: metalearners.reptile(
            _conv(norm="support"), 0.1, num_inner_steps=2,
            inner_batch_size=2),
        "omniglot",
    ),
    LearnerCase("meta_lstm_support",
                lambda: lo.meta_lstm(_conv(norm="support"), 2), "omniglot"),
    LearnerCase("imaml_support",
                lambda: metalearners.imaml(_conv(norm="support"), 0.1, 1,
                                           cg_steps=2), "omniglot"),
    LearnerCase("r2d2_support",
                lambda: metalearners.r2d2(_conv(None, norm="support")),
                "omniglot"),
    LearnerCase("incontext_support",
                lambda: metalearners.in_context(
                    _conv(None, norm="support"), max_ways=NUM_WAYS,
                    dim=16, depth=1, num_heads=2),
                "omniglot"),
    LearnerCase("incontext_frozen_encoder",
                lambda: metalearners.in_context(
                    _running(None), max_ways=NUM_WAYS, dim=16, depth=1,
                    num_heads=2, freeze_encoder=True),
                "omniglot"),
    LearnerCase("baseline_pp_running",
                lambda: metalearners.baseline_pp(_running(None), 6,
                                                 finetune_steps=2),
                "omniglot"),
    LearnerCase("baseline_no_norm",
                lambda: metalearners.baseline(_conv(None, norm="none"), 6,
                                              finetune_steps=2),
                "omniglot"),
)

_CASES = [pytest.param(c, id=c.name) for c in LEARNERS_UNDER_TEST]
# The whole meta-step under the "vmap" task map (the accelerators' default)
# is compiled, and compared with the "scan" map, for one learner of each
# kind of meta-gradient: differentiated through adaptation (MAML, with
# carried statistics too), estimated (Reptile), through an embedding
# (ProtoNet), a learned inner loop (Meta-LSTM), implicit (iMAML) and a
# task-pair sampler (MLTI). Every other learner's meta_grad runs under vmap
# in the probe, and its whole step under the scan map.
_VMAP_STEP = frozenset({
    "maml", "reptile", "protonet", "meta_lstm", "maml_running", "imaml",
    "mlti_maml",
})
_MAP_CASES = [pytest.param(c, id=c.name) for c in LEARNERS_UNDER_TEST
              if c.name in _VMAP_STEP]
_STEP_CASES = [
    pytest.param(c, task_map, id=f"{c.name}-{task_map}")
    for c in LEARNERS_UNDER_TEST for task_map in ("vmap", "scan")
    if task_map == "scan" or c.name in _VMAP_STEP
]


@functools.cache
def _task_data(task: str):
  """A task's sampler, a fixed batch of episodes and per-task keys."""
  sampler = TASKS[task]()
  episodes = jax.jit(
      lambda k: tasks.sample_batch(sampler, k, META_BATCH)
  )(jax.random.key(1))
  keys = jax.random.split(jax.random.key(2), META_BATCH)
  return sampler, episodes, keys


def _first(tree):
  return jax.tree.map(lambda x: x[0], tree)


@functools.cache
def _setup(case: LearnerCase):
  """The learner, its sampler, meta-parameters and a batch of tasks."""
  learner = case.make()
  sampler, episodes, keys = _task_data(case.task)
  params = _jit_init(learner)(jax.random.key(0), _first(episodes))
  return learner, sampler, params, episodes, keys


@functools.cache
def _jit_init(learner: MetaLearner):
  """``learner.init`` compiled once (op-by-op dispatch of a network's
  initialisers costs seconds per call)."""
  return jax.jit(learner.init)


@functools.cache
def _probe(case: LearnerCase):
  """One jitted call: the vmapped meta-gradients of the batch, and task 0
  adapted and scored with the meta-test settings.

  (``meta_grad`` of a single task under ``jit`` runs in the ``"scan"``
  meta-step below.) Returns the jitted function and its outputs on the
  fixed batch.
  """
  learner, _, params, episodes, keys = _setup(case)

  @jax.jit
  def probe(params, episodes, keys):
    batched = jax.vmap(learner.meta_grad, (None, 0, 0))(params, episodes, keys)
    episode, key = _first((episodes, keys))
    task_params = learner.adapt(params, episode, key, training=False)
    scored = learner.evaluate(params, task_params, episode)
    return batched, (task_params, scored)

  return probe, probe(params, episodes, keys)


def _recording_sgd(learning_rate: float) -> optax.GradientTransformation:
  """SGD that keeps the last (mean) meta-gradient as its state.

  The state exposes the gradient the meta-step computed, so the task maps
  can be compared; ``update`` is traced once per compilation of the step,
  so ``chex.assert_max_traces`` on it counts compilations.
  """

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -learning_rate * g, grads), grads

  return optax.GradientTransformation(init, update)


def _recorded_grad(opt_state):
  """The learned leaves' mean meta-gradient that :func:`_recording_sgd`
  kept (inside ``outer_optimizer``'s partition for learners with carried
  state, whose meta-parameters are then :class:`WithModelState`)."""
  if isinstance(opt_state, optax.transforms.PartitionState):
    opt_state = opt_state.inner_states["learned"].inner_state.params
  return jax.device_get(opt_state)


def _learned(params):
  """The learned part of meta-parameters (without a model's state)."""
  if isinstance(params, metalearners.WithModelState):
    return params.params
  return params


@functools.cache
def _two_steps(case: LearnerCase, task_map: str):
  """Two meta-steps, run twice from the same key.

  Returns the first step's mean meta-gradient, both runs' final states and
  metrics, and the number of times ``meta_grad`` was traced after each
  step of the first run.
  """
  learner, sampler, _, _, _ = _setup(case)
  traces = []

  def counted_meta_grad(*args):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
      traces.append(task_map)
    return learner.meta_grad(*args)

  tx = _recording_sgd(1e-3)
  chex.clear_trace_counter()
  # The step is compiled once: its optimizer update is traced once.
  tx = tx._replace(update=chex.assert_max_traces(tx.update, n=1))
  step = training.make_meta_step(
      learner._replace(meta_grad=counted_meta_grad),
      tx,
      sampler,
      meta_batch_size=META_BATCH,
      task_map=task_map,
  )
  key = jax.random.key(3)
  runs, grad, counts = [], None, []
  for _ in range(2):
    state = training.init_state(learner, tx, sampler, jax.random.key(0))
    state, _ = step(state, sampler.data, key)
    counts.append(len(traces))
    grad = _recorded_grad(state.opt_state) if grad is None else grad
    state, metrics = step(state, sampler.data, key)
    counts.append(len(traces))
    runs.append(jax.device_get((state, metrics)))
  return {"grad": grad, "runs": runs, "traces": counts}


def _expected_metrics(case: LearnerCase) -> set[str]:
  if case.task == "omniglot":
    return {"outer/loss", "outer/accuracy"}
  return {"outer/loss"}


def _assert_not_all_zero(tree):
  total = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(tree))
  assert total > 0.0, "the meta-gradient is zero everywhere"


@pytest.mark.parametrize("case", _CASES)
def test_init_is_a_deterministic_pytree(case):
  learner, _, params, episodes, _ = _setup(case)
  leaves = jax.tree.leaves(params)
  assert leaves, "init returned an empty pytree"
  for leaf in leaves:
    assert isinstance(leaf, jax.Array)
    assert jnp.issubdtype(leaf.dtype, jnp.floating)
  chex.assert_tree_all_finite(params)
  again = _jit_init(learner)(jax.random.key(0), _first(episodes))
  chex.assert_trees_all_equal(params, again)
  other = _jit_init(learner)(jax.random.key(7), _first(episodes))
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(leaves, jax.tree.leaves(other), strict=True)
  ), "init ignores its key"


@pytest.mark.parametrize("case", _CASES)
def test_meta_grad_under_vmap(case):
  _, _, params, _, _ = _setup(case)
  _, ((batched, metrics), _) = _probe(case)
  chex.assert_trees_all_equal_structs(batched, params)
  jax.tree.map(
      lambda b, p: chex.assert_shape(b, (META_BATCH, *p.shape)),
      batched,
      params,
  )
  chex.assert_tree_all_finite((batched, metrics))
  for task in range(META_BATCH):
    _assert_not_all_zero(jax.tree.map(lambda x, t=task: x[t], batched))
  assert set(metrics) == _expected_metrics(case)
  for value in metrics.values():
    chex.assert_shape(value, (META_BATCH,))


@pytest.mark.parametrize("case", _CASES)
def test_same_key_gives_identical_results(case):
  _, _, params, episodes, keys = _setup(case)
  probe, out = _probe(case)
  chex.assert_trees_all_equal(probe(params, episodes, keys), out)
  # Whole meta-steps (sampling included) from the same key and state.
  first, second = _two_steps(case, training.default_task_map())["runs"]
  chex.assert_trees_all_equal(first, second)


@pytest.mark.parametrize("case,task_map", _STEP_CASES)
def test_meta_step_runs_without_retracing(case, task_map):
  out = _two_steps(case, task_map)
  traced = out["traces"][0]
  assert traced > 0, "meta_grad was never traced"
  assert out["traces"] == [traced] * 4, f"meta_grad retraced ({task_map})"
  state, metrics = out["runs"][0]
  assert int(state.step) == 2
  chex.assert_tree_all_finite((state.meta_params, metrics))
  # The "scan" map runs meta_grad on one task at a time, under jit.
  _, _, params, _, _ = _setup(case)
  chex.assert_trees_all_equal_shapes_and_dtypes(out["grad"], _learned(params))
  chex.assert_tree_all_finite(out["grad"])
  _assert_not_all_zero(out["grad"])
  assert set(metrics) == _expected_metrics(case)


@pytest.mark.parametrize("case", _MAP_CASES)
def test_task_maps_agree(case):
  # Relative to the whole meta-gradient's norm: leaves whose exact value is
  # zero (a convolution's bias before batch norm) or that cancel large
  # second-order terms carry float32 rounding of the summation order,
  # which differs between the task maps and between CPUs.
  vmapped = jax.tree.leaves(_two_steps(case, "vmap")["grad"])
  scanned = jax.tree.leaves(_two_steps(case, "scan")["grad"])
  diff = sum(float(jnp.sum(jnp.square(a - b)))
             for a, b in zip(vmapped, scanned, strict=True))
  norm = sum(float(jnp.sum(jnp.square(b))) for b in scanned)
  assert diff <= (1e-2 ** 2) * norm, (diff, norm)


@pytest.mark.parametrize("case", _CASES)
def test_evaluate_metrics_and_meta_test_adapt(case):
  _, (_, (task_params, (loss, metrics))) = _probe(case)
  chex.assert_tree_all_finite((task_params, loss, metrics))
  assert set(metrics) == _expected_metrics(case)
  chex.assert_shape(loss, ())
  np.testing.assert_allclose(loss, metrics["outer/loss"], rtol=1e-6)
  if "outer/accuracy" in metrics:
    assert 0.0 <= float(metrics["outer/accuracy"]) <= 1.0


def _query0_outputs(case: LearnerCase):
  """Query 0's ``predict`` outputs, and its ``evaluate`` loss, with the
  episode's other queries as sampled and replaced by other inputs."""
  learner, _, params, episodes, keys = _setup(case)
  episode, key = _first((episodes, keys))
  others = episode.query_x[1:]
  replaced = episode._replace(query_x=episode.query_x.at[1:].set(
      jnp.flip(others, axis=(1, 2)) if others.ndim > 2 else others + 1.0))

  @jax.jit
  def outputs(episode):
    task_params = learner.adapt(params, episode, key, training=False)
    return learner.predict(params, task_params, episode.query_x)[0]

  return outputs(episode), outputs(replaced)


@pytest.mark.parametrize(
    "case", _CASES + [pytest.param(c, id=c.name) for c in INDEPENDENCE_ONLY])
def test_query_independence_is_as_declared(case):
  learner, _, _, _, _ = _setup(case)
  assert learner.predict is not None, "every built-in learner predicts"
  first, second = _query0_outputs(case)
  chex.assert_tree_all_finite(first)
  if learner.transductive:
    # Batch statistics: the other queries move query 0's outputs.
    assert not np.array_equal(first, second)
  else:
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "case", [c for c in _CASES if "running" in c.id])
def test_running_statistics_are_carried(case):
  """The meta-step moves the running statistics (the carried leaves) and
  keeps them finite; the parameters are learned."""
  learner, _, params, _, _ = _setup(case)
  assert isinstance(params, metalearners.WithModelState)
  marks = learner.carried(params)
  assert all(jax.tree.leaves(marks.model_state))
  assert not any(jax.tree.leaves(marks.params))
  state, _ = _two_steps(case, "scan")["runs"][0]
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       state.meta_params.model_state, params.model_state)
  assert all(d > 0 for d in jax.tree.leaves(moved))
  chex.assert_tree_all_finite(state.meta_params.model_state)
