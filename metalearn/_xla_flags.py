"""An XLA:CPU flag that keeps jaxlib 0.10 from crashing on metalearn models.

jaxlib 0.10.x (0.10.2 is the newest release available to metalearn) runs
some XLA:CPU fusions through the YNNPACK library ("YNN fusions"). Its REDUCE
YNN fusions mis-compile the backward pass of a max-pool followed by a mean:
the process dies with a segmentation fault (a store past a buffer in a
YNNPACK fp32 dot kernel). In metalearn that kills every ProtoNet
meta-gradient on ``models.resnet12`` (widths of 64 and up) on CPU. This is
https://github.com/jax-ml/jax/issues/40412, fixed upstream after 0.10.2.

The default YNN fusion types of jaxlib 0.10.2 are ``INDIVIDUAL_DOT``,
``INDIVIDUAL_CONVOLUTION`` and ``REDUCE``. ``apply`` keeps the first two,
which are unaffected, and drops ``REDUCE`` by appending
``--xla_cpu_experimental_ynn_fusion_type=...`` to ``XLA_FLAGS``. The flag
changes XLA:CPU only; other backends ignore it. It is left alone when
``XLA_FLAGS`` already names it, and ``METALEARN_KEEP_XLA_FLAGS=1`` turns the
whole thing off. XLA reads ``XLA_FLAGS`` once, when jax first creates a
backend, so ``apply`` must run before that: ``import metalearn`` calls it
before it imports jax.
"""

import importlib.metadata
import os
import sys
import warnings
from collections.abc import MutableMapping

FLAG = "xla_cpu_experimental_ynn_fusion_type"
VALUE = (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
)
OPT_OUT = "METALEARN_KEEP_XLA_FLAGS"
ISSUE = "https://github.com/jax-ml/jax/issues/40412"


def is_affected(jaxlib_version: str) -> bool:
  """Whether a jaxlib release has the YNN reduce-fusion crash.

  Args:
    jaxlib_version: a version string such as ``"0.10.2"`` or
      ``"0.10.3.dev20260101"``.

  Returns:
    True for the 0.10 series (0.10.2 crashes; the series is taken as a
    whole because the fix is not known to be in any 0.10 release).
  """
  parts = jaxlib_version.strip().split(".")
  return len(parts) >= 2 and parts[0] == "0" and parts[1] == "10"


def _installed_jaxlib() -> str | None:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def _backend_started(modules: dict) -> bool:
  """Whether jax has already created a backend (and so read XLA_FLAGS)."""
  bridge = modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def apply(
    environ: MutableMapping[str, str] | None = None,
    jaxlib_version: str | None = None,
) -> bool:
  """Appends the YNN fusion flag to ``XLA_FLAGS`` on an affected jaxlib.

  Nothing happens when ``METALEARN_KEEP_XLA_FLAGS`` is set (to anything but
  ``""`` or ``"0"``), when ``XLA_FLAGS`` already names the flag, or when
  the jaxlib release is not affected. When jax has already created its
  backend the flag is still appended (subprocesses see it) but cannot take
  effect in this process, so a warning says so.

  Args:
    environ: the environment to edit; ``os.environ`` by default.
    jaxlib_version: the jaxlib version; the installed one by default.

  Returns:
    Whether the flag was appended.
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "") not in ("", "0"):
    return False
  flags = environ.get("XLA_FLAGS", "")
  if FLAG in flags:
    return False
  if jaxlib_version is None:
    jaxlib_version = _installed_jaxlib()
  if jaxlib_version is None or not is_affected(jaxlib_version):
    return False
  environ["XLA_FLAGS"] = f"{flags} --{FLAG}={VALUE}".strip()
  if _backend_started(sys.modules):
    warnings.warn(
        f"metalearn sets --{FLAG}={VALUE} in XLA_FLAGS to avoid an XLA:CPU "
        f"crash of jaxlib {jaxlib_version} ({ISSUE}), but jax's backend was "
        "created before metalearn was imported, so the flag has no effect in "
        "this process: import metalearn before using jax, or set the flag "
        "yourself.",
        RuntimeWarning,
        stacklevel=2,
    )
  return True
