"""``import metalearn`` stays light: heavy optional dependencies load lazily."""

import subprocess
import sys


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
