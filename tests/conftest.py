"""Shared fixtures: the data directory and Omniglot loaded once per session.

The data directory comes from ``$METALEARN_DATA_DIR`` (CI sets it to
``../shared/data``); when unset, it defaults to ``../shared/data`` next to the
repository. Nothing is skipped: a missing directory fails with a message.
Every cache the loaders write goes to a temporary directory, never to ``~``.

XLA's persistent compilation cache is on for the session, in a temporary
directory (subprocesses inherit it through ``$JAX_COMPILATION_CACHE_DIR``):
tests that run the same programs again (a resumed run against a whole one, a
command-line run against an in-process one) load the compiled executables
instead of compiling them again. The executables are the ones a compile
would build, so every result stays bit for bit the same.
"""

import functools
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

from metalearn.data import CACHE_DIR_ENV, DATA_DIR_ENV, load_omniglot

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

_COMPILATION_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": None,  # Set in pytest_configure.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
_saved_env = {}


def _is_xdist_worker() -> bool:
  return "PYTEST_XDIST_WORKER" in os.environ


def pytest_configure(config):
  """Turns the compilation cache on before anything compiles.

  Under pytest-xdist (``-n 2``, README's test command) the workers share
  the controller's cache, which they inherit through the environment, and
  only the controller removes it at the end.
  """
  del config
  inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if _is_xdist_worker() and pathlib.Path(inherited).name.startswith(
      "metalearn_xla_cache_"):
    cache = inherited
  else:
    cache = tempfile.mkdtemp(prefix="metalearn_xla_cache_")
  env = dict(_COMPILATION_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=cache)
  for name, value in env.items():
    _saved_env[name] = os.environ.get(name)
    os.environ[name] = value
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_collection_modifyitems(config, items):
  """Puts each test in an ``xdist_group``: its file, or finer where asked.

  README's test command distributes the groups over pytest-xdist workers
  (``--dist loadgroup``). A file is one group by default, since its tests
  share module-level caches and fixtures. A file that names a parameter in
  ``XDIST_GROUP_BY`` is split by that parameter's value instead (the
  conformance suite by learner: the tests of one learner share its
  compiled programs, different learners share nothing).
  """
  del config
  for item in items:
    group = item.nodeid.split("::")[0]
    by = getattr(getattr(item, "module", None), "XDIST_GROUP_BY", None)
    callspec = getattr(item, "callspec", None)
    if by and callspec is not None and by in callspec.params:
      value = callspec.params[by]
      group += f"[{getattr(value, 'name', value)}]"
    item.add_marker(pytest.mark.xdist_group(group))


def pytest_unconfigure(config):
  del config
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  for name, value in _saved_env.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  if _is_xdist_worker():
    return
  if cache and pathlib.Path(cache).name.startswith("metalearn_xla_cache_"):
    shutil.rmtree(cache, ignore_errors=True)


def _find_data_dir() -> pathlib.Path:
  configured = os.environ.get(DATA_DIR_ENV)
  if configured is None:
    candidates = [DEFAULT_DATA_DIR]
  else:
    path = pathlib.Path(configured).expanduser()
    # A relative path is relative to the working directory (as the library
    # reads it), or else to the repository root (as CI writes it).
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
  for candidate in candidates:
    if (candidate / "omniglot").is_dir():
      return candidate.resolve()
  source = (
      f"${DATA_DIR_ENV}={configured!r}" if configured is not None
      else f"the default {DEFAULT_DATA_DIR} (${DATA_DIR_ENV} is unset)"
  )
  pytest.fail(
      f"Test data not found: no omniglot/ folder under {source}; tried "
      f"{', '.join(str(c) for c in candidates)}. Set {DATA_DIR_ENV} to the "
      "shared data directory (the one holding omniglot/).",
      pytrace=False,
  )


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The directory that holds ``omniglot/`` (and the other datasets)."""
  return _find_data_dir()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """One cache directory for the session, shared by every loader call."""
  return tmp_path_factory.mktemp("metalearn_cache")


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(cache_dir):
  """Points ``$METALEARN_CACHE_DIR`` at the session cache, away from ``~``."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(CACHE_DIR_ENV, str(cache_dir))
    yield


@pytest.fixture(scope="session")
def load_real_omniglot(data_dir, cache_dir):
  """``load_omniglot`` bound to the real data and the session cache.

  The first call resizes all 1623 characters (a few seconds) and caches them;
  later calls, with any split scheme or rotation setting, read that cache.
  """
  return functools.partial(load_omniglot, data_dir, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def omniglot(load_real_omniglot):
  """Omniglot, Vinyals split, with rotations, 28x28: 4112/688/1692 classes."""
  return load_real_omniglot(
      split_scheme="vinyals", rotations=True, image_size=28
  )


@pytest.fixture(scope="session")
def omniglot_finn(load_real_omniglot, omniglot):
  """Omniglot, Finn split, without rotations, 28x28: 1100/100/423 classes."""
  del omniglot  # Requested so that the resized cache already exists.
  return load_real_omniglot(
      split_scheme="finn", rotations=False, image_size=28
  )
