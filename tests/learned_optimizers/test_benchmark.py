"""benchmarks/learned_optimizers.py runs at smoke size and writes sensible
results (its numbers mean nothing at that size)."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
  sys.path.insert(0, str(BENCH_DIR))
  try:
    spec = importlib.util.spec_from_file_location(
        "benchmarks_learned_optimizers", BENCH_DIR / "learned_optimizers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(str(BENCH_DIR))


@pytest.mark.slow
def test_smoke_run_writes_results_and_plot(bench, tmp_path, capsys):
  out, png = tmp_path / "r.json", tmp_path / "curves.png"
  assert bench.main(["--smoke", "--out", str(out), "--plot", str(png)]) == 0
  result = json.loads(out.read_text())
  cfg = result["config"]
  assert result["benchmark"] == "learned_optimizers" and cfg["smoke"]
  names = {"adam", "sgd", "learned (bmg)", "learned (pes)",
           "learned (tbptt)"}
  assert set(result["summary"]) == names
  for name in names:
    runs = result["per_seed"][name]
    assert len(runs) == cfg["seeds"]
    for run in runs:
      assert len(run["curve_train"]) == cfg["horizon"] + 1
      assert np.all(np.isfinite(run["curve_held_out"]))
    final = [r["final_held_out"] for r in runs]
    agg = result["summary"][name]["final_held_out"]
    assert agg["mean"] == pytest.approx(np.mean(final))
    assert agg["std"] == pytest.approx(np.std(final))
  # The tuned rates are the grid's best on the training tasks.
  for name, lr in result["tuned_lr"].items():
    table = {float(k): v for k, v in result["tuning_final_train"][name].items()}
    assert set(table) == set(cfg["lrs"])
    assert table[lr] == min(table.values())
  for est in ("bmg", "pes", "tbptt"):
    (first, *_) = result["meta_training"][est]
    assert [h["step"] for h in first["history"]][-1] == cfg["outer_steps"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "| optimiser |" in printed and "learned (pes)" in printed


@pytest.mark.slow
def test_adam_residual_smoke_run_names_its_row(bench, tmp_path):
  out = tmp_path / "r.json"
  assert bench.main(["--smoke", "--estimators", "tbptt", "--adam-residual",
                     "--seeds", "1", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["config"]["adam_residual"]
  assert set(result["summary"]) == {"adam", "sgd",
                                    "learned (tbptt, Adam residual)"}
  (run,) = result["per_seed"]["learned (tbptt, Adam residual)"]
  assert np.all(np.isfinite(run["curve_train"]))
  # Out of distribution: the same optimisers, twice the horizon and a
  # wider network.
  ood = result["out_of_distribution"]
  assert set(ood) == {"longer_horizon", "wider_network"}
  for shift in ood.values():
    assert set(shift) == set(result["summary"])
    for agg in shift.values():
      assert np.isfinite(agg["final_held_out"]["mean"])
