"""The XLA:CPU flag ``import metalearn`` sets against jaxlib 0.10's YNN crash.

Every check runs in a subprocess with its own environment, so the flags and
the jax backend of the test process itself play no part.
"""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from metalearn import _xla_flags

FLAG = f"--{_xla_flags.FLAG}={_xla_flags.VALUE}"

# Loads _xla_flags.py on its own (no metalearn, no jax unless asked), calls
# apply for the given jaxlib version and prints what it did.
_APPLY = """
import importlib.util, json, os, sys, warnings
if sys.argv[3] == "backend":
  import jax
  jax.devices()
elif sys.argv[3] == "jax":
  import jax
spec = importlib.util.spec_from_file_location("_xla_flags", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  added = module.apply(jaxlib_version=sys.argv[2])
print(json.dumps({"added": added, "flags": os.environ.get("XLA_FLAGS"),
                  "warnings": [str(w.message) for w in caught]}))
"""

# The minimal plain-JAX reproduction of jax-ml/jax#40412: a 1x1
# convolution as a matmul, a 2x2 max-pool, a global mean and the ProtoNet
# loss; its gradient segfaulted XLA:CPU in a REDUCE YNN fusion (width >= 64).
_REPRODUCTION = """
import metalearn  # noqa: F401  (sets the flag before jax starts)
import jax, jax.numpy as jnp, optax
D = 64
x = jax.random.normal(jax.random.key(0), (80, 16, 16, 3))
W = jax.random.normal(jax.random.key(1), (3, D))
sy = jnp.arange(5)
qy = jnp.tile(jnp.arange(5), 15)
def loss(W):
  h = x @ W
  h = h.reshape(80, 8, 2, 8, 2, D).max(axis=(-4, -2))
  z = h.mean((1, 2))
  zs, zq = z[:5], z[5:]
  oh = jax.nn.one_hot(sy, 5)
  protos = oh.T @ zs / jnp.maximum(oh.sum(0), 1.0)[:, None]
  d = (jnp.sum(zq * zq, -1)[:, None] - 2.0 * zq @ protos.T
       + jnp.sum(protos * protos, -1)[None, :])
  return optax.softmax_cross_entropy_with_integer_labels(-d, qy).mean()
jax.block_until_ready(jax.jit(jax.grad(loss))(W))
print("OK")
"""


def _env(**values):
  """The test process's environment without the variables under test."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", _xla_flags.OPT_OUT)}
  env.update(values)
  return env


def _apply(version="0.10.2", jax_state="none", **env):
  result = subprocess.run(
      [sys.executable, "-c", _APPLY, _xla_flags.__file__, version,
       jax_state],
      capture_output=True, text=True, timeout=120, env=_env(**env),
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout)


def _installed_is_affected():
  return _xla_flags.is_affected(importlib.metadata.version("jaxlib"))


@pytest.mark.parametrize("version, affected", [
    ("0.10.0", True), ("0.10.2", True), ("0.10.3.dev20260101", True),
    ("0.10", True), ("0.9.2", False), ("0.11.0", False), ("0.100.1", False),
    ("1.10.0", False),
])
def test_is_affected(version, affected):
  assert _xla_flags.is_affected(version) is affected


def test_flag_added_for_affected_version():
  assert _apply() == {"added": True, "flags": FLAG, "warnings": []}


def test_existing_flags_kept():
  out = _apply(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert out["flags"] == f"--xla_force_host_platform_device_count=2 {FLAG}"


def test_flag_not_added_for_unaffected_version():
  out = _apply(version="0.9.2", XLA_FLAGS="--xla_dump_to=/dev/null")
  assert out == {"added": False, "flags": "--xla_dump_to=/dev/null",
                 "warnings": []}


def test_flag_already_set_is_left_alone():
  flags = f"--{_xla_flags.FLAG}= --xla_force_host_platform_device_count=2"
  assert _apply(XLA_FLAGS=flags)["flags"] == flags


def test_opt_out():
  out = _apply(**{_xla_flags.OPT_OUT: "1"})
  assert out == {"added": False, "flags": None, "warnings": []}


def test_warns_only_once_backend_started():
  assert _apply(jax_state="jax")["warnings"] == []
  out = _apply(jax_state="backend")
  assert out["added"] and len(out["warnings"]) == 1
  assert _xla_flags.FLAG in out["warnings"][0]
  assert _xla_flags.ISSUE in out["warnings"][0]


def test_import_metalearn_sets_flag_on_installed_jaxlib():
  code = "import os, metalearn; print(os.environ.get('XLA_FLAGS', ''))"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, env=_env())
  assert result.returncode == 0, result.stderr
  assert (FLAG in result.stdout) is _installed_is_affected()


def test_ynn_reduce_fusion_reproduction_runs():
  # Compiled afresh: no persistent compilation cache.
  env = _env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  result = subprocess.run([sys.executable, "-c", _REPRODUCTION],
                          capture_output=True, text=True, timeout=120,
                          env=env)
  assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
  assert result.stdout.strip() == "OK"
