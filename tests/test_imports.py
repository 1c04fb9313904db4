"""Imports: ``import metalearn`` stays light (heavy optional dependencies
load lazily), and the experiment modules import one another in layers."""

import ast
import pathlib
import subprocess
import sys

import metalearn


def test_import_does_not_load_tensorflow_hydra_or_wandb():
  code = (
      "import sys, metalearn; "
      "loaded = [m for m in ('tensorflow', 'hydra', 'wandb') "
      "if m in sys.modules]; "
      "assert not loaded, loaded"
  )
  result = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr


def _private_imports(path: pathlib.Path, package: str) -> set[str]:
  """The modules of ``package`` that a module imports, lazily or not."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0:
      if node.module == package:
        found.update(alias.name for alias in node.names)
      elif node.module and node.module.startswith(package + "."):
        found.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      found.update(
          alias.name.split(".")[2] for alias in node.names
          if alias.name.startswith(package + ".")
      )
    elif isinstance(node, ast.ImportFrom):
      raise AssertionError(f"{path}: relative import")
  return found


def test_experiment_modules_import_no_circle():
  package = "metalearn.experiment"
  folder = pathlib.Path(metalearn.__file__).parent / "experiment"
  graph = {
      path.stem: _private_imports(path, package) - {path.stem}
      for path in folder.glob("_*.py") if path.stem != "__init__"
  }
  assert {"_checks", "_config", "_run", "_lopt"} <= set(graph)
  done, path = set(), []

  def visit(module):
    if module in path:
      circle = path[path.index(module):] + [module]
      raise AssertionError("import circle: " + " -> ".join(circle))
    if module in done or module not in graph:
      return
    path.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  # Each kind of run stands alone; the entry point dispatches between them.
  assert "_lopt" not in graph["_run"] and "_run" not in graph["_lopt"]



# The packages of metalearn, each importing only those before it.
LAYERS = ("types", "data", "tasks", "models", "metalearners",
          "learned_optimizers", "training", "experiment")


def _packages_imported(path: pathlib.Path) -> set[str]:
  """The metalearn packages (``data``, ``tasks``, ...) a module imports."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module] + (
          [f"metalearn.{a.name}" for a in node.names]
          if node.module == "metalearn" else [])
    elif isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    found.update(n.split(".")[1] for n in names
                 if n.startswith("metalearn.") and n.count(".") >= 1)
  return found


def test_packages_import_only_the_layers_below_them():
  root = pathlib.Path(metalearn.__file__).parent
  wrong = []
  for rank, layer in enumerate(LAYERS):
    folder = root / layer
    paths = [root / "types.py"] if layer == "types" else folder.glob("*.py")
    for path in paths:
      for package in _packages_imported(path) - {layer}:
        if package in LAYERS and LAYERS.index(package) > rank:
          wrong.append(f"{path.relative_to(root)} imports {package}")
  assert not wrong, wrong
