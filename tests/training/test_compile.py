"""training.jit: XLA:CPU convolutions outside YNNPACK, same values."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import models, training
from metalearn.training import _compile


def _conv_bn(x, w):
  """A convolution whose result has two users (batch norm's statistics
  and its normalisation), the pattern YNNPACK ran on one thread."""
  y = models.conv2d(x, w, (1, 1), "SAME")
  return models.standardize(y, (0, 1, 2), 1e-5)[0]


def _ynn_convolutions(compiled_text: str) -> int:
  """Convolutions inside ``__ynn_fusion`` fusions of compiled HLO."""
  bodies = dict(re.findall(r"^%(\S+) [^\n]*\{\n(.*?)\n\}", compiled_text,
                           re.S | re.M))
  called = re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", compiled_text)
  return sum("convolution(" in bodies.get(name, "") for name in called)


def _operands():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 14, 14, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.1, jnp.float32)
  return x, w


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_jit_keeps_convolutions_out_of_ynnpack_with_the_same_values():
  x, w = _operands()
  fn = jax.grad(lambda x, w: jnp.sum(jnp.tanh(_conv_bn(x, w))), (0, 1))
  assert _compile.compiler_options() is not None
  ours = training.jit(fn).lower(x, w).compile().as_text()
  default = jax.jit(fn).lower(x, w).compile().as_text()
  assert "convolution(" in ours
  assert _ynn_convolutions(ours) == 0
  # XLA's defaults hand them to YNNPACK: the check above can fail.
  assert _ynn_convolutions(default) > 0
  for a, b in zip(training.jit(fn)(x, w), jax.jit(fn)(x, w), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_compiler_options_only_on_cpu_and_when_not_overridden(monkeypatch):
  assert _compile.compiler_options("gpu") is None
  assert _compile.compiler_options("tpu") is None
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(_compile.ENV_VAR, "1")
  assert _compile.compiler_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type":
          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
          "LIBRARY_FUSION_TYPE_DOT"}
  monkeypatch.setenv(_compile.ENV_VAR, "0")
  assert _compile.compiler_options("cpu") is None
  monkeypatch.setenv(_compile.ENV_VAR, "1")
  monkeypatch.setenv(
      "XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert _compile.compiler_options("cpu") is None


def test_jit_nests_inside_another_jit():
  """Options are top-level only in JAX: nested, training.jit is a plain
  jit, and ``lower`` still reaches the top-level one."""
  x, w = _operands()
  inner = training.jit(_conv_bn)
  outer = jax.jit(lambda x, w: inner(x, w).sum() + inner(x, 2 * w).sum())
  expected = _conv_bn(x, w).sum() + _conv_bn(x, 2 * w).sum()
  np.testing.assert_allclose(outer(x, w), expected, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(jax.jit(lambda: inner(x, w).sum())(),
                             _conv_bn(x, w).sum(), rtol=1e-4, atol=1e-3)
  assert "convolution(" in inner.lower(x, w).compile().as_text()
