"""Two processes on localhost, 2 CPU devices each, train as one process does.

``distributed_worker.py`` is started twice, with the coordinator on a free
localhost port in ``JAX_COORDINATOR_ADDRESS`` and ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` set, as README.md's "Many hosts" documents; each joins
through :func:`metalearn.training.initialize_distributed` and runs
``meta_train`` on ``task_mesh()``, a 4-device mesh over both processes (CPU
collectives over gloo). Their final meta-parameters must equal those of the
same run in this process, on one device and without a mesh.
"""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 120


def _load_worker():
  spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp_path):
  """Runs the workers; returns their outputs, or fails with their stderr."""
  env = dict(os.environ)
  # Each process compiles its own executables (no shared on-disk cache).
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.update(
      XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                 f"device_count={LOCAL_DEVICES}").strip(),
      JAX_PLATFORMS="cpu",
      JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
      JAX_NUM_PROCESSES=str(NUM_PROCESSES),
  )
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  logs = [tmp_path / f"process{i}.log" for i in range(NUM_PROCESSES)]
  procs = []
  for i in range(NUM_PROCESSES):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER), str(outs[i])],
          env={**env, "JAX_PROCESS_ID": str(i)},
          stdout=log, stderr=subprocess.STDOUT,
      ))
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
      codes.append("timeout")
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  if codes != [0] * NUM_PROCESSES:
    report = "\n".join(
        f"--- process {i} (exit {code}) ---\n{log.read_text()[-3000:]}"
        for i, (code, log) in enumerate(zip(codes, logs, strict=True))
    )
    pytest.fail(f"distributed workers failed:\n{report}")
  return [dict(np.load(out)) for out in outs]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  results = _launch(tmp_path)
  worker = _load_worker()
  state, loss = worker.train()
  expected = [np.asarray(x) for x in jax.tree.leaves(state.meta_params)]
  init = worker.training.init_state(
      *worker.setup(), jax.random.split(jax.random.key(0))[0]
  )
  change = max(
      float(np.max(np.abs(a - np.asarray(b))))
      for a, b in zip(expected, jax.tree.leaves(init.meta_params),
                      strict=True)
  )
  assert change > 1e-3  # The meta-steps moved the parameters.
  for i, r in enumerate(results):
    assert int(r["process_index"]) == i
    assert int(r["process_count"]) == NUM_PROCESSES
    assert int(r["local_device_count"]) == LOCAL_DEVICES
    assert int(r["device_count"]) == int(r["mesh_size"]) == (
        NUM_PROCESSES * LOCAL_DEVICES
    )
    np.testing.assert_allclose(r["loss"], loss, rtol=1e-5, atol=1e-6)
    for j, leaf in enumerate(expected):
      np.testing.assert_allclose(r[f"leaf{j}"], leaf, rtol=1e-5, atol=1e-6,
                                 err_msg=f"process {i}, leaf {j}")


def test_initialize_distributed_reads_process_count_and_id(monkeypatch):
  # jax.distributed.initialize reads only JAX_COORDINATOR_ADDRESS itself.
  from metalearn import training

  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert training.initialize_distributed()
  assert training.initialize_distributed(process_id=0)
  assert calls == [{"num_processes": 2, "process_id": 1},
                   {"num_processes": 2, "process_id": 0}]
