"""Every public name is documented, and the docstring examples run."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import metalearn

PUBLIC = [
    "metalearn",
    "metalearn.data",
    "metalearn.tasks",
    "metalearn.models",
    "metalearn.metalearners",
    "metalearn.training",
    "metalearn.learned_optimizers",
]


def _modules():
  for name in PUBLIC:
    try:
      yield importlib.import_module(name)
    except ImportError:  # A subpackage that does not exist yet.
      continue


def _public_names():
  for module in _modules():
    for name in getattr(module, "__all__", ()):
      yield module.__name__, name, getattr(module, name)


@pytest.mark.parametrize(
    "module_name,name,obj",
    list(_public_names()),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_public_name_has_docstring(module_name, name, obj):
  if isinstance(obj, (str, int, float, tuple)):
    pytest.skip("constants are documented where they are defined")
  doc = inspect.getdoc(obj)
  assert doc and doc.strip(), f"{module_name}.{name} has no docstring"


def _private_modules():
  for module in _modules():
    if not hasattr(module, "__path__"):
      continue
    for info in pkgutil.iter_modules(module.__path__):
      yield f"{module.__name__}.{info.name}"


@pytest.mark.parametrize("module_name", sorted(set(_private_modules())))
def test_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} doctest(s) failed"


def test_every_module_has_a_docstring():
  for name in sorted(set(_private_modules())) + PUBLIC:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    assert module.__doc__, f"{name} has no module docstring"
  assert metalearn.__version__
