"""The notebooks: stored clean, public API only, and run top to bottom.

Each ``notebooks/*.ipynb`` is executed with nbclient at smoke size
(``METALEARN_NOTEBOOK_SMOKE=1``), with the matplotlib backend ``Agg`` and a
time budget per notebook, two notebooks at a time, each in a worker process
(this file run as a script). The kernel is this interpreter: a ``python3``
kernelspec for ``sys.executable`` is written to a temporary directory that
``JUPYTER_PATH`` puts first, so nothing is registered globally and a
``python3`` kernel of another environment is never picked up.
"""

import ast
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import nbclient
import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
REQUIRED = (
    "01_quickstart_sinusoid_maml",
    "02_omniglot_protonet",
    "03_custom_metalearner",
)
SMOKE_FLAG = "METALEARN_NOTEBOOK_SMOKE"
# Wall-clock budget per notebook, kernel start included. At smoke size each
# takes 20-40 s on two free cores; the margin is for a loaded CI machine.
NOTEBOOK_TIMEOUT_S = 300
# Notebooks run at once (test_notebook_runs_at_smoke_size).
PARALLEL = 2

by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)


def _read(path: pathlib.Path) -> nbformat.NotebookNode:
  return nbformat.read(path, as_version=4)


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _python_source(cell) -> str:
  """A code cell's source without IPython magics and shell escapes."""
  lines = cell.source.splitlines()
  return "\n".join(
      "" if line.lstrip().startswith(("%", "!")) else line for line in lines
  )


def _metalearn_imports(tree: ast.AST):
  """``(module, name)`` for every import of ``metalearn`` in a syntax tree;
  ``name`` is ``None`` for ``import module``."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "metalearn":
          yield alias.name, None
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.split(".")[0] == "metalearn":
        for alias in node.names:
          yield node.module, alias.name


def test_required_notebooks_exist():
  stems = {p.stem for p in NOTEBOOKS}
  missing = [name for name in REQUIRED if name not in stems]
  assert not missing, f"missing notebooks: {missing}"


@by_name
def test_notebook_is_valid_and_stored_without_outputs(path):
  nb = _read(path)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  for i, cell in enumerate(_code_cells(nb)):
    assert cell.outputs == [], f"code cell {i} has stored outputs"
    assert cell.execution_count is None, f"code cell {i} has a count"
  # A clean file ends with one newline and keeps its JSON indented.
  text = path.read_text()
  assert text.endswith("}\n") and json.loads(text)


@by_name
def test_first_code_cell_reads_the_smoke_flag(path):
  first = _code_cells(_read(path))[0].source
  assert f'os.environ.get("{SMOKE_FLAG}") == "1"' in first
  assert "SMOKE =" in first


def _is_public(module: str, name: str | None) -> bool:
  """Whether ``from module import name`` (or ``import module``) uses only
  public names: each is listed in its parent's ``__all__`` or is a public
  subpackage (``metalearn.learned_optimizers``), and none is private."""
  path = module.split(".") + ([name] if name else [])
  for i in range(1, len(path)):
    parent, child = ".".join(path[:i]), path[i]
    if child.startswith("_"):
      return False
    listed = child in getattr(importlib.import_module(parent), "__all__", ())
    if not listed and importlib.util.find_spec(f"{parent}.{child}") is None:
      return False
  return True


@by_name
def test_notebook_imports_only_the_public_api(path):
  found = []
  for i, cell in enumerate(_code_cells(_read(path))):
    tree = ast.parse(_python_source(cell), filename=f"{path.name}[{i}]")
    for module, name in _metalearn_imports(tree):
      found.append((module, name))
      assert _is_public(module, name), f"private import: {module} {name}"
  assert found, "the notebook never imports metalearn"


def test_public_import_check_rejects_private_names():
  assert _is_public("metalearn", "training")
  assert _is_public("metalearn.metalearners", "maml")
  assert _is_public("metalearn.learned_optimizers", None)
  assert not _is_public("metalearn.metalearners._maml", "inner_sgd")
  assert not _is_public("metalearn.training", "_loop")
  assert not _is_public("metalearn.tasks", "no_such_name")


@by_name
def test_notebook_explains_with_math(path):
  math_cells = [
      c for c in _read(path).cells
      if c.cell_type == "markdown" and "$" in c.source
  ]
  assert math_cells, "no markdown cell with LaTeX math"


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> pathlib.Path:
  """A ``JUPYTER_PATH`` entry whose ``python3`` kernel is this interpreter."""
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [
          sys.executable, "-m", "ipykernel_launcher", "-f",
          "{connection_file}",
      ],
      "display_name": "Python 3 (metalearn tests)",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return root


def _smoke_env(kernel_dir: pathlib.Path, data_dir) -> dict[str, str]:
  """The environment the notebook kernels inherit."""
  return dict(
      os.environ,
      **{SMOKE_FLAG: "1"},
      MPLBACKEND="Agg",
      METALEARN_DATA_DIR=str(data_dir),
      JUPYTER_PATH=str(kernel_dir),
      PYDEVD_DISABLE_FILE_VALIDATION="1",
  )


class NotebookTimeout(RuntimeError):
  """A notebook used up its time budget."""


def _execute(nb, path: pathlib.Path) -> float:
  """Runs every cell in order under one deadline; returns the seconds."""
  client = nbclient.NotebookClient(
      nb,
      kernel_name="python3",
      timeout=NOTEBOOK_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  start = time.monotonic()
  with client.setup_kernel():
    for index, cell in enumerate(nb.cells):
      remaining = NOTEBOOK_TIMEOUT_S - (time.monotonic() - start)
      if remaining <= 0:
        raise NotebookTimeout(
            f"{path.name} used up its {NOTEBOOK_TIMEOUT_S} s budget before "
            f"cell {index}"
        )
      client.timeout = max(1, int(remaining))
      client.execute_cell(cell, index)
  return time.monotonic() - start


def _run_one(path: pathlib.Path, out: pathlib.Path) -> None:
  """Executes one notebook (with a last cell printing the kernel's
  interpreter) and writes it, and its seconds, to ``out`` (the worker
  process of :func:`executed`)."""
  nb = _read(path)
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys\nprint(sys.executable)"))
  try:
    seconds, error = _execute(nb, path), None
  except Exception as e:  # noqa: BLE001 (reported by the test)
    seconds, error = None, f"{type(e).__name__}: {e}"
  nb.metadata["smoke_run"] = {"seconds": seconds, "error": error}
  nbformat.write(nb, out)


@pytest.fixture(scope="session")
def executed(kernel_dir, data_dir, tmp_path_factory):
  """Every notebook run at smoke size, :data:`PARALLEL` at a time, each in
  a worker process of its own: a kernel spends most of a smoke run
  compiling, on one core, so two kernels use the two cores of a CI
  machine. Returns the executed notebooks by path."""
  out_dir = tmp_path_factory.mktemp("executed")
  env = _smoke_env(kernel_dir, data_dir)
  pending, running, done = list(NOTEBOOKS), [], {}
  while pending or running:
    while pending and len(running) < PARALLEL:
      path = pending.pop(0)
      out = out_dir / path.name
      proc = subprocess.Popen(
          [sys.executable, __file__, str(path), str(out)], env=env,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      running.append((path, out, proc))
    path, out, proc = running.pop(0)
    log = proc.communicate()[0]
    done[path] = (_read(out) if proc.returncode == 0 and out.exists()
                  else log[-3000:])
  return done


@pytest.mark.slow
@by_name
def test_notebook_runs_at_smoke_size(path, executed):
  nb = executed[path]
  assert not isinstance(nb, str), f"the worker failed:\n{nb}"
  run = nb.metadata.smoke_run
  assert run.error is None, run.error
  outputs = [o for c in _code_cells(nb) for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors[0]
  # The kernel was this interpreter, not a python3 found elsewhere.
  printed = "".join(
      o.text for o in nb.cells[-1].outputs
      if o.output_type == "stream" and o.name == "stdout"
  )
  assert printed.strip() == sys.executable
  pngs = [
      o for o in outputs
      if o.output_type == "display_data" and "image/png" in o.data
  ]
  assert pngs, f"{path.name} rendered no inline PNG plot"
  print(f"{path.name}: {run.seconds:.1f} s, {len(pngs)} plots")


if __name__ == "__main__":
  _run_one(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
