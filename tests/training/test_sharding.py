"""Data parallelism over tasks: sharded steps and evaluation match one device.

The multi-device checks run ``sharding_worker.py`` once, in a subprocess
with 8 simulated CPU devices (``--xla_force_host_platform_device_count``
is read when JAX starts, so this process and the rest of the suite keep
their devices), and assert on the JSON it prints. The checks that need no
second device run here, on a one-device mesh.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import metalearners, models, tasks, training
from metalearn.training import _sharding

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
NUM_DEVICES = 8


@pytest.fixture(scope="module")
def report():
  """The worker's measurements on 8 simulated CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, str(WORKER)],
      env=env, capture_output=True, text=True, timeout=900, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _close(a, b, rtol=1e-5, atol=1e-6):
  return abs(a - b) <= atol + rtol * abs(b)


@pytest.mark.slow
class TestEightDevices:
  """A sharded run equals the single-device run, and lives where intended."""

  def test_runs_on_eight_devices(self, report):
    assert report["device_count"] == NUM_DEVICES

  def test_protonet_meta_train_matches_single_device(self, report):
    r = report["meta_train"]
    assert r["param_change"] > 1e-3  # The two steps moved the parameters.
    assert r["param_diff"] <= 1e-5 * max(1.0, r["param_change"])
    for a, b in zip(r["loss_sharded"], r["loss"], strict=True):
      assert _close(a, b)
    assert r["state"] == {"replicated": True, "on_mesh_devices": True}

  def test_maml_step_matches_single_device(self, report):
    r = report["step"]
    assert r["param_change"] > 1e-3
    assert r["param_diff"] <= 1e-5 * max(1.0, r["param_change"])
    assert r["metric_diff"] <= 1e-5

  def test_reptile_carried_state_matches_single_device(self, report):
    # The carried Adam state is averaged over the tasks on all devices, as
    # the gradients are; the clipping meta-optimizer leaves it alone.
    r = report["carried"]
    assert r["model_change"] > 1e-4 and r["nu_change"] > 0
    assert r["model_diff"] <= 1e-5 * max(1.0, r["model_change"])
    assert r["nu_diff"] <= 1e-5 * r["nu_change"]
    assert r["count"] == [4, 4]  # 2 inner steps x 2 meta-steps, exact
    assert r["state"] == {"replicated": True, "on_mesh_devices": True}

  def test_step_outputs_replicated_on_the_mesh(self, report):
    r = report["step"]
    assert r["state"] == {"replicated": True, "on_mesh_devices": True}
    assert r["metrics"] == {"replicated": True, "on_mesh_devices": True}

  def test_step_is_data_parallel(self, report):
    # XLA inserted the reduction of the per-device means, and no device
    # gathers the other devices' tasks (as a vmap over devices would).
    assert report["step"]["hlo_all_reduce"]
    assert not report["step"]["hlo_all_gather"]

  def test_evaluation_matches_single_device(self, report):
    single, sharded = report["eval"]["single"], report["eval"]["sharded"]
    assert sharded.keys() == single.keys()
    assert sharded["num_episodes"] == 12
    for name, value in single.items():
      assert _close(sharded[name], value), name

  def test_evaluation_outputs_replicated(self, report):
    r = report["eval"]
    assert r["per_episode"] == {"replicated": True, "on_mesh_devices": True}
    assert r["per_episode_shape"] == [NUM_DEVICES]

  def test_shard_tasks_splits_the_task_axis(self, report):
    r = report["shard_tasks"]
    assert r["shape"] == [NUM_DEVICES, 2]
    assert r["spec"] == ["tasks"]
    assert r["num_shards"] == NUM_DEVICES
    assert r["shard_shapes"] == [[1, 2]]
    assert r["first_shard"] == [0.0, 1.0]
    assert r["sub_mesh_size"] == 4

  def test_loop_bounds_queued_calls_on_cpu_devices(self, report):
    assert report["shard_tasks"]["throttle"]

  @pytest.mark.parametrize("where,name,size,suggested", [
      ("meta_batch", "meta_batch_size", 6, 8),
      ("meta_train", "meta_batch_size", 12, 16),
      ("eval_batch", "batch_size", 6, 8),
  ])
  def test_non_divisible_batch_is_a_clear_error(
      self, report, where, name, size, suggested
  ):
    message = report["errors"][where]
    assert message is not None, f"{where}: no ValueError"
    assert f"{name}={size}" in message
    assert f"{NUM_DEVICES} devices" in message
    assert f"{name}={suggested}" in message

  def test_too_many_devices_is_a_clear_error(self, report):
    message = report["errors"]["too_many_devices"]
    assert f"devices={NUM_DEVICES + 1}" in message
    assert "xla_force_host_platform_device_count" in message


def _sinusoid_setup():
  sampler = tasks.sinusoid_sampler(num_shots=5, num_queries=5)
  learner = metalearners.maml(models.mlp(hidden=(8,)), inner_lr=0.01)
  return sampler, learner


def test_one_device_mesh_step_matches_no_mesh():
  sampler, learner = _sinusoid_setup()
  tx = optax.sgd(0.1)
  state = training.init_state(learner, tx, sampler, jax.random.key(0))
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
  key = jax.random.key(1)
  plain = training.make_meta_step(learner, tx, sampler, meta_batch_size=4)
  mesh = training.task_mesh(1)
  sharded = training.make_meta_step(learner, tx, sampler, meta_batch_size=4,
                                    mesh=mesh)
  s1, m1 = plain(copy(state), sampler.data, key)
  s2, m2 = sharded(training.replicate(copy(state), mesh), sampler.data, key)
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(s2))


def test_one_device_mesh_evaluate_matches_no_mesh():
  sampler, learner = _sinusoid_setup()
  params = learner.init(jax.random.key(0),
                        sampler.sample(jax.random.key(0), None))
  key = jax.random.key(3)
  plain = training.evaluate(learner, params, sampler, key, num_episodes=5)
  sharded = training.evaluate(learner, params, sampler, key, num_episodes=5,
                              mesh=training.task_mesh(1))
  assert sharded.keys() == plain.keys()
  for name, value in plain.items():
    np.testing.assert_allclose(sharded[name], value, rtol=1e-6, err_msg=name)


def test_task_mesh_forms():
  mesh = training.task_mesh()
  assert mesh.axis_names == (training.TASK_AXIS,)
  assert mesh.size == len(jax.devices())
  assert training.task_mesh([jax.devices()[0]]).size == 1
  with pytest.raises(ValueError, match="devices=0"):
    training.task_mesh(0)
  with pytest.raises(ValueError, match="empty"):
    training.task_mesh([])


def test_shard_tasks_rejects_mismatched_task_axes():
  with pytest.raises(ValueError, match="task axis"):
    training.shard_tasks((jnp.zeros(4), jnp.zeros(3)), training.task_mesh(1))


def test_replicate_keeps_values():
  tree = {"w": jnp.arange(3.0), "b": np.ones(2, np.float32)}
  placed = training.replicate(tree, training.task_mesh(1))
  np.testing.assert_array_equal(placed["w"], tree["w"])
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))


_LAUNCH_ENV = (
    "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
)
_SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]",
          "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.fixture
def fake_distributed(monkeypatch):
  """Records calls to jax.distributed.initialize instead of connecting."""
  calls = []
  for name in _LAUNCH_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  return calls


@pytest.mark.parametrize("env,kwargs,expected", [
    ({}, {}, False),
    ({**_SLURM, "SLURM_NTASKS": "1"}, {}, False),  # One sweep point.
    ({"OMPI_COMM_WORLD_SIZE": "1"}, {}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}, True),
    ({**_SLURM, "SLURM_NTASKS": "4"}, {}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, True),
    ({}, {"force": True}, True),
    ({}, {"num_processes": 2, "process_id": 0}, True),
], ids=["alone", "slurm-1-task", "mpi-1", "coordinator", "slurm-4-tasks",
        "mpi-2", "force", "explicit-kwargs"])
def test_initialize_distributed_only_when_asked(
    fake_distributed, monkeypatch, env, kwargs, expected
):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert training.initialize_distributed(**kwargs) is expected
  assert len(fake_distributed) == int(expected)
  if expected:
    passed = {k: v for k, v in kwargs.items() if k != "force"}
    assert fake_distributed[0] == passed


def test_initialize_distributed_is_idempotent(fake_distributed, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert training.initialize_distributed(force=True)
  assert fake_distributed == []


def test_no_throttle_on_one_device():
  assert not _sharding.needs_throttle(training.task_mesh(1))
