"""How metalearn compiles its steps: ``jax.jit`` plus XLA:CPU options.

jaxlib 0.10.2's XLA:CPU hands convolutions to YNNPACK one at a time. A
YNNPACK convolution whose result is written out (any convolution followed
by batch norm, that is every Conv-4 and ResNet-12 layer) ran on one thread
of the two this machine has: the 14x14x64 convolution of a ProtoNet step
took 14 ms per task inside the meta-step against 7 ms alone, at the same
HLO (``benchmarks/README.md``, "Speed and memory", has the profile).
Leaving convolutions to XLA's own (Eigen) kernels, which use every thread,
and keeping YNNPACK for dots and reductions, took the Conv-4 meta-steps
from 25-27% to 47-56% of the matmul peak measured in each run.
:func:`jit` compiles with that setting on CPU; other backends are
untouched.

Set ``METALEARN_XLA_CPU_OPTIONS=0`` to compile with XLA's defaults. A
``--xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is the
user's choice and is left to win.
"""

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax

_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's default YNNPACK fusion types less INDIVIDUAL_CONVOLUTION (the
# meta-steps compiled with this list and with XLA_FLAGS' own
# "=-individual_convolution" gave bit-identical losses). compiler_options
# take one value per option, so the list is spelled out.
_YNN_WITHOUT_CONVOLUTIONS = ",".join(
    f"LIBRARY_FUSION_TYPE_{t}" for t in ("INDIVIDUAL_DOT", "REDUCE", "DOT"))
ENV_VAR = "METALEARN_XLA_CPU_OPTIONS"


@functools.cache
def _cpu_options_compile() -> bool:
  """Whether this jaxlib accepts the options (checked once, on a scalar)."""
  options = {_YNN_FLAG: _YNN_WITHOUT_CONVOLUTIONS}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except Exception as e:  # noqa: BLE001 - any refusal means "not here".
    warnings.warn(
        f"XLA:CPU refused {_YNN_FLAG}={_YNN_WITHOUT_CONVOLUTIONS} ({e}); "
        "metalearn compiles with XLA's defaults", stacklevel=3)
    return False
  return True


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """The XLA options :func:`jit` compiles with on ``backend``.

  Args:
    backend: a platform name; ``None`` is ``jax.default_backend()``.

  Returns:
    On CPU, ``{"xla_cpu_experimental_ynn_fusion_type": ...}`` (YNNPACK for
    dots and reductions, XLA's kernels for convolutions); ``None`` on other
    backends, when ``METALEARN_XLA_CPU_OPTIONS=0``, when ``XLA_FLAGS``
    already sets the fusion types, or when this jaxlib refuses the option.
  """
  if (backend or jax.default_backend()) != "cpu":
    return None
  if os.environ.get(ENV_VAR, "1") == "0":
    return None
  if _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  if not _cpu_options_compile():
    return None
  return {_YNN_FLAG: _YNN_WITHOUT_CONVOLUTIONS}


class _Jitted:
  """``jax.jit(fun)`` with compiler options when called at the top level,
  without them inside another trace (JAX accepts ``compiler_options`` on
  top-level jits only; an outer jit's options govern the whole program).
  Everything else (``lower``, ``trace``, ``eval_shape``...) is the
  top-level jit's."""

  def __init__(self, fun, options, kwargs):
    self._top = jax.jit(fun, compiler_options=options, **kwargs)
    self._nested = jax.jit(fun, **kwargs)
    functools.update_wrapper(self, fun)

  def __call__(self, *args, **kwargs):
    leaves = jax.tree.leaves((args, kwargs))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return self._nested(*args, **kwargs)
    try:
      return self._top(*args, **kwargs)
    except ValueError as e:  # Inside a trace that closes over constants.
      if "compiler_options" not in str(e):
        raise
      return self._nested(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._top, name)


def jit(fun: Callable, **kwargs: Any) -> Callable:
  """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` added.

  Every step metalearn builds (meta-training, evaluation, populations) is
  compiled by this; use it for your own jitted functions of metalearn
  models to get the same kernels. Called inside another ``jax.jit`` (or
  any trace) it is a plain nested jit: the outer jit's options apply.

  Examples:
    >>> import jax.numpy as jnp
    >>> from metalearn import training
    >>> training.jit(lambda x: 2 * x)(jnp.ones(3)).tolist()
    [2.0, 2.0, 2.0]
  """
  options = compiler_options()
  if options is None:
    return jax.jit(fun, **kwargs)
  return _Jitted(fun, options, kwargs)
