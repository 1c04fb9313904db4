"""The benchmark scripts run at smoke size and write sensible results.

Each script's ``main`` runs in-process with ``--smoke`` (the throughput
script still starts its per-learner worker as a subprocess, through its
command line), so the scripts cannot rot unnoticed. Smaller checks cover the
parts the numbers rest on: the FLOP counting, the host sampler and the
learner table.
"""

import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.types import ClassPool

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = ("conv_in_scan", "norm_modes", "pooling", "population", "reproduce",
           "sampling", "throughput")


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      f"benchmarks_{name}", BENCH_DIR / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  """The scripts as modules (their folder on ``sys.path``)."""
  sys.path.insert(0, str(BENCH_DIR))
  try:
    yield {n: _load(n) for n in SCRIPTS}
  finally:
    sys.path.remove(str(BENCH_DIR))


def _run(module, tmp_path, *argv):
  out = tmp_path / "result.json"
  assert module.main(["--smoke", *argv, "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["machine"]["cpu_count"] >= 1
  assert result["machine"]["jax"] == jax.__version__
  assert result["config"]["smoke"] is True
  return result


def test_conv_in_scan_smoke(bench, tmp_path):
  mod = bench["conv_in_scan"]
  result = _run(mod, tmp_path)
  assert result["benchmark"] == "conv_in_scan"
  rows = result["results"]
  assert {(r["part"], r["context"]) for r in rows} == {
      (p, c) for p in mod.PARTS for c in mod.CONTEXTS
  }
  for r in rows:
    for field in ("lax_gflops", "conv2d_gflops", "lax_s", "conv2d_s"):
      assert r[field] > 0, (r, field)
    assert r["speedup"] == pytest.approx(r["conv2d_gflops"] / r["lax_gflops"])


def test_pooling_smoke(bench, tmp_path):
  result = _run(bench["pooling"], tmp_path)
  assert result["benchmark"] == "pooling"
  assert [r["op"] for r in result["results"]] == [
      "forward", "gradient", "block_gradient"]
  for r in result["results"]:
    assert r["reduce_window_ms"] > 0 and r["reshape_max_ms"] > 0
    assert r["speedup"] == pytest.approx(
        r["reduce_window_ms"] / r["reshape_max_ms"]
    )
    assert r["slices_vs_reshape"] == pytest.approx(
        r["reshape_max_ms"] / r["slices_max_ms"]
    )
    assert r["slices_vs_custom_jvp"] == pytest.approx(
        r["slices_max_ms"] / r["custom_jvp_ms"]
    )


# Scripts whose smoke run lives elsewhere or cannot run in CI, and why.
TESTED_ELSEWHERE = {
    "learned_optimizers": "tests/learned_optimizers/test_benchmark.py",
    "sharding": "its code paths: tests/training/test_sharding.py "
    "(8 simulated devices)",
    "mlti_fewtask": "its code paths: tests/metalearners/test_mlti.py "
    "(a --smoke run costs about a CPU-minute)",
    "peer_learn2learn": "needs the peer's own 5.7 GB virtualenv; run by hand",
    "remat": "its code path: tests/metalearners/test_inner.py (remat); a "
    "--smoke run compiles four Conv-4 meta-steps (about 40 s); its ratios: "
    "test_remat_ratios below",
}


def test_remat_ratios():
  sys.path.insert(0, str(BENCH_DIR))
  try:
    remat = _load("remat")
  finally:
    sys.path.remove(str(BENCH_DIR))
  rows = [
      {"inner_steps": s, "remat": r, "temp_bytes": t, "tasks_per_s": v}
      for s, r, t, v in ((1, False, 10, 8.0), (1, True, 10, 8.0),
                         (5, False, 50, 4.0), (5, True, 12, 2.0))
  ]
  remat.add_ratios(rows)
  assert [r["temp_vs_fewest_steps"] for r in rows] == [1.0, 1.0, 5.0, 1.2]
  assert [r["slowdown_vs_no_remat"] for r in rows] == [1.0, 1.0, 1.0, 2.0]


def test_every_script_is_smoke_tested():
  scripts = {p.stem for p in BENCH_DIR.glob("*.py")} - {"_harness"}
  assert set(SCRIPTS) <= scripts
  assert scripts <= set(SCRIPTS) | set(TESTED_ELSEWHERE)


def test_conv_flops_counts_padded_taps(bench):
  # 2 x batch x outputs x taps x in x out, as in the FLOP tables.
  assert bench["conv_in_scan"].conv_flops(80, 14, 64, 64) == (
      2 * 80 * 14 * 14 * 9 * 64 * 64
  )


def test_sampling_smoke(bench, tmp_path, data_dir, omniglot):
  result = _run(bench["sampling"], tmp_path, "--data-dir", str(data_dir))
  assert result["benchmark"] == "sampling"
  assert result["config"]["pool_shape"] == list(omniglot.train.images.shape)
  res = result["results"]
  for field in ("device_episodes_per_s", "host_episodes_per_s", "speedup",
                "device_batch_ms", "host_batch_ms"):
    assert res[field] > 0, field
  assert res["speedup"] == pytest.approx(
      res["device_episodes_per_s"] / res["host_episodes_per_s"]
  )


def test_norm_modes_smoke(bench, tmp_path, data_dir):
  # One learner and one mode: the script's every path, in seconds.
  result = _run(bench["norm_modes"], tmp_path, "--data-dir", str(data_dir),
                "--learners", "protonet", "--modes", "support")
  assert result["benchmark"] == "norm_modes"
  (row,) = result["results"]
  assert (row["learner"], row["norm"], row["transductive"]) == (
      "protonet", "support", False)
  assert 0 <= row["val_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1


def test_host_sampler_draws_valid_episodes(bench):
  # Pixel value = 10 * class + example, so every image names its source.
  classes, per_class = 12, 8
  values = 10 * np.arange(classes)[:, None] + np.arange(per_class)
  images = np.broadcast_to(
      values[:, :, None, None, None], (classes, per_class, 2, 2, 1)
  ).astype(np.uint8)
  ways, shots, queries, batch = 4, 2, 3, 5
  ep = bench["sampling"].host_batch(
      np.random.default_rng(0), images, num_ways=ways, num_shots=shots,
      num_queries=queries, batch_size=batch,
  )
  assert ep.support_x.shape == (batch, ways * shots, 2, 2, 1)
  assert ep.query_x.shape == (batch, ways * queries, 2, 2, 1)
  assert ep.support_x.dtype == np.float32 and ep.support_y.dtype == np.int32
  for b in range(batch):
    support = np.rint(ep.support_x[b, :, 0, 0, 0] * 255).astype(int)
    query = np.rint(ep.query_x[b, :, 0, 0, 0] * 255).astype(int)
    assert not set(support) & set(query)  # Disjoint examples.
    for label in range(ways):
      cls = set(support[ep.support_y[b] == label] // 10)
      assert cls == set(query[ep.query_y[b] == label] // 10)
      assert len(cls) == 1
    np.testing.assert_array_equal(np.bincount(ep.query_y[b]), [queries] * ways)
    assert len(set(support // 10)) == ways


def test_throughput_smoke(bench, tmp_path):
  mod = bench["throughput"]
  result = _run(mod, tmp_path, "--learners", "protonet")
  assert result["benchmark"] == "throughput"
  assert result["matmul_peak_gflops"] > 0
  (row,) = result["results"]
  assert row["learner"] == "protonet"
  assert row["task_map"] == ("scan" if jax.default_backend() == "cpu"
                             else "vmap")
  for field in ("tasks_per_s", "compile_s", "peak_rss_bytes",
                "gflop_per_task_xla", "achieved_gflops", "fraction_of_peak"):
    assert row[field] > 0, field
  assert len(row["step_times_s"]) == 1
  # XLA's count (in-bounds taps plus element-wise ops) and the hand count
  # (padded taps, convolutions only) measure the same work to within 10%.
  assert row["gflop_per_task_xla"] == pytest.approx(
      mod.ANALYTIC_GFLOP["protonet"], rel=0.1
  )
  assert row["achieved_gflops"] == pytest.approx(
      row["gflop_per_task_xla"] * row["tasks_per_s"]
  )
  assert row["images_per_s"] == pytest.approx(80 * row["tasks_per_s"])


def test_throughput_pretraining_draws_mini_batches(bench):
  mod = bench["throughput"]
  args = mod.parse_args(["--smoke", "--learners", "baseline"])
  learner, _ = mod.build("baseline")
  sampler = mod.training_sampler(learner, mod.synthetic_sampler(args))
  batch = jax.jit(sampler.sample)(jax.random.key(0), sampler.data)
  assert batch.support_x.shape[0] == mod.images_per_task("baseline", args)
  assert mod.images_per_task("protonet", args) == 5 * (1 + 15) == 80


def test_population_smoke(bench, tmp_path):
  result = _run(bench["population"], tmp_path, "--learner", "protonet")
  assert result["benchmark"] == "population"
  rows = result["results"]
  assert [r["members"] for r in rows] == [1, 2]
  assert rows[0]["vs_one_member"] == 1.0
  for row in rows:
    assert row["finite"]
    assert row["aggregate_tasks_per_s"] == pytest.approx(
        row["members"] * 2 / row["call_s"])


def test_unrolled_scans_count_every_iteration(bench):
  mod = bench["throughput"]
  original = jax.lax.scan

  def f(xs):
    return jax.lax.scan(lambda c, x: (c + (x @ x).sum(), None), 0.0, xs)[0]

  xs = jnp.ones((6, 32, 32))
  with mod.unrolled_scans():
    counted = mod._flops(jax.jit(f).lower(xs).compile())
  assert jax.lax.scan is original
  assert counted >= 6 * 2 * 32**3


def test_every_learner_builds(bench):
  mod = bench["throughput"]
  pool = ClassPool(np.zeros((6, 17, 28, 28, 1), np.uint8),
                   np.arange(6, dtype=np.int32))
  episode = mod.tasks.episode_sampler(
      pool, num_ways=5, num_shots=1, num_queries=15
  ).sample(jax.random.key(0), pool)
  key = jax.random.key(0)
  for name in mod.LEARNERS:
    learner, tx = mod.build(name)
    # Tracing every meta-gradient would take seconds; the smoke run above
    # traces one, and each learner's own tests trace the rest.
    params = jax.eval_shape(learner.init, key, episode)
    updates = jax.eval_shape(
        lambda p, tx=tx: tx.update(p, tx.init(p), p)[0], params
    )
    assert jax.tree.structure(updates) == jax.tree.structure(params), name


def test_throughput_rejects_unknown_names(bench):
  parse = bench["throughput"].parse_args
  with pytest.raises(SystemExit):
    parse(["--learners", "maml1,nope"])
  with pytest.raises(SystemExit):
    parse(["--task-map", "pmap"])
  args = parse(["--smoke", "--task-map", "scan,vmap"])
  assert args.task_map == ("scan", "vmap") and args.batch == 2


@pytest.mark.slow
def test_reproduce_smoke(bench, tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv("METALEARN_DATA_DIR", str(data_dir))
  monkeypatch.setenv("WANDB_MODE", "disabled")
  out = tmp_path / "repro"
  rows = "omniglot_5w1s_protonet,omniglot_20w1s_protonet"
  argv = ["--smoke", "--rows", rows, "--out", str(out),
          "--override", "model.features=8"]
  assert bench["reproduce"].main(argv) == 0
  summary = json.loads((out / "summary.json").read_text())
  five, twenty = summary["rows"]
  # One training run serves both rows; the 20-way row re-tests it.
  assert five["trained_in"] == twenty["trained_in"] == (
      "omniglot_5w1s_protonet")
  assert not (out / "omniglot_20w1s_protonet").exists()
  assert twenty["test_task_override"] == {"num_ways": 20}
  assert five["paper"].startswith("98.8%")
  assert [c["step"] for c in five["curve"]] == [1, 2]
  for row in (five, twenty):
    acc = row["results"]["test/outer/accuracy"]
    assert 0 <= acc <= 1
    assert row["curve"][-1]["test/outer/accuracy"] == acc
  assert (twenty["results"]["test/outer/accuracy"]
          != five["results"]["test/outer/accuracy"])
  table = (out / "table.md").read_text()
  assert "| omniglot_20w1s_protonet | 96.0%" in table
  assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A second call reuses the finished runs.
  assert bench["reproduce"].main(argv) == 0


def test_reproduce_regression_rows(bench, tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  out = tmp_path / "repro"
  argv = ["--smoke", "--rows", "sinusoid_maml,sinusoid_metasgd",
          "--out", str(out), "--override", "task.num_shots=5"]
  assert bench["reproduce"].main(argv) == 0
  summary = json.loads((out / "summary.json").read_text())
  for row in summary["rows"]:
    assert row["config"]["task"]["num_shots"] == 5
    assert "test/outer/accuracy" not in row["results"]
    assert row["curve"][-1]["test/outer/loss"] == (
        row["results"]["test/outer/loss"])
  table = (out / "table.md").read_text()
  assert len(re.findall(r"\| MSE \d+\.\d{3} ± \d+\.\d{3} \| 0 \|", table)) == 2
  assert (out / "curves_mse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (out / "curves.png").exists()  # No classification rows.


def test_reproduce_continues_runs_the_time_limit_stopped(bench, tmp_path,
                                                        monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  out = tmp_path / "repro"
  argv = ["--smoke", "--rows", "sinusoid_maml", "--out", str(out)]
  mod = bench["reproduce"]
  assert mod.main([*argv, "--max-time-s", "1e-6"]) == 0
  first = json.loads((out / "sinusoid_maml" / "results.json").read_text())
  assert first["stopped_by_time_limit"] and first["steps"] == 1
  assert mod.main(argv) == 0  # Not run again without the flag.
  assert json.loads(
      (out / "sinusoid_maml" / "results.json").read_text()) == first
  assert mod.main([*argv, "--continue-stopped"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  results = summary["rows"][0]["results"]
  assert results["steps"] == 2 and not results["stopped_by_time_limit"]
  assert [c["step"] for c in summary["rows"][0]["curve"]] == [1, 2]


def test_reproduce_trains_a_shared_run_once(bench, tmp_path, monkeypatch):
  # Two rows tested from one run: with --continue-stopped, the second row
  # must not extend the run the first row just continued.
  mod = bench["reproduce"]
  calls = []

  def fake_train(row, run_dir, args):
    calls.append(row)
    (run_dir / "checkpoints" / "3").mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(
        {"steps": 3, "stopped_by_time_limit": True}))
    (run_dir / "config.json").write_text("{}")

  from metalearn import experiment
  monkeypatch.setattr(mod, "train", fake_train)
  monkeypatch.setattr(experiment, "evaluate_run", lambda run_dir, steps, **kw: [
      {"step": s, "test/outer/accuracy": 0.5} for s in steps])
  monkeypatch.setattr(experiment, "read_metrics", lambda run_dir: [])
  args = mod.parse_args(["--rows", "omniglot_5w1s_protonet,"
                         "omniglot_20w1s_protonet", "--out", str(tmp_path),
                         "--continue-stopped"])
  trained = set()
  rows = [mod.measure_row(r, args, tmp_path, trained) for r in args.rows]
  assert calls == ["omniglot_5w1s_protonet"]
  assert [r["trained_in"] for r in rows] == ["omniglot_5w1s_protonet"] * 2


def test_reproduce_test_task_changes_only_the_test(bench, tmp_path,
                                                  monkeypatch):
  # --test-task re-tests the final checkpoint on episodes of another shape:
  # the row's results are that test's, merged with a shared run's own
  # change (the 20-way ProtoNet row), and the table names the change.
  mod = bench["reproduce"]
  seen = []

  def fake_train(row, run_dir, args):
    (run_dir / "checkpoints" / "3").mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(
        {"steps": 3, "num_steps": 3, "seed": 0, "train_seconds": 60.0,
         "test/num_episodes": 600,
         "test/outer/accuracy": 0.9, "test/outer/accuracy_ci95": 0.01}))
    (run_dir / "config.json").write_text("{}")

  def fake_evaluate(run_dir, steps, task=None, **kw):
    seen.append(task)
    return [{"step": s, "test/outer/accuracy": 0.5,
             "test/outer/accuracy_ci95": 0.02, "test/num_episodes": 6000}
            for s in steps]

  from metalearn import experiment
  monkeypatch.setattr(mod, "train", fake_train)
  monkeypatch.setattr(experiment, "evaluate_run", fake_evaluate)
  monkeypatch.setattr(experiment, "read_metrics", lambda run_dir: [])
  args = mod.parse_args(["--rows", "omniglot_5w1s_protonet,"
                         "omniglot_20w1s_protonet", "--out", str(tmp_path),
                         "--test-task", "num_queries=1",
                         "--test-task", "split=val"])
  assert args.test_task == {"num_queries": 1, "split": "val"}
  rows = [mod.measure_row(r, args, tmp_path, set()) for r in args.rows]
  assert seen == [{"num_queries": 1, "split": "val"},
                  {"num_ways": 20, "num_queries": 1, "split": "val"}]
  for r in rows:
    assert r["results"]["test/outer/accuracy"] == 0.5
    assert r["results"]["steps"] == 3
  text = mod.table(rows, {"cpu": "x", "cpu_count": 1, "device": "cpu",
                          "backend": "cpu", "jax": "0"})
  assert "| omniglot_5w1s_protonet (test: num_queries=1, split=val) |" in text
  assert "| 50.00 ± 2.00 |" in text
  for bad in ("num_queries", "=1", "num_queries="):
    with pytest.raises(SystemExit):
      mod.parse_args(["--rows", "sinusoid_maml", "--test-task", bad])


def test_reproduce_paper_value_and_wall_time(bench):
  mod = bench["reproduce"]
  assert mod.paper_value("98.8% (Snell et al. 2017)", 1) == 98.8
  assert mod.paper_value("98.7 ± 0.4% (Finn et al. 2017)", 1) == 98.7
  mse = "MSE 1.13 ± 0.18 / 0.85 ± 0.14 / 0.71 ± 0.12 for K = 5 / 10 / 20 (Li)"
  assert [mod.paper_value(mse, k) for k in (5, 10, 20, 7)] == [
      1.13, 0.85, 0.71, None]
  assert mod.paper_value("n/a", 1) is None
  assert mod.paper_value("none (Raghu et al. 2020 report 20-way only)",
                         1) is None
  # Every experiment's header gives an accuracy in [0, 100], an MSE, or
  # nothing: never a year or a way count read as the paper's figure.
  for path in sorted(mod.EXPERIMENTS.glob("*.yaml")):
    value = mod.paper_value(mod.paper_number(path.stem), 5)
    assert value is None or 0 < value <= 100, (path.name, value)
  # A resumed run: results.json times the last process, metrics.jsonl all.
  row = {"results": {"train_seconds": 5.0},
         "metrics": [{"step": 10, "wall_s": 100.0}, {"step": 20,
                                                     "wall_s": 160.0}]}
  assert mod.train_wall_s(row) == 160.0
  assert mod.train_wall_s({**row, "metrics": []}) == 5.0


def test_reproduce_spaced_checkpoints_keep_the_last(bench):
  spaced = bench["reproduce"].spaced
  assert spaced([1, 2, 3], 8) == [1, 2, 3]
  assert spaced(list(range(1, 11)), 4) == [1, 4, 7, 10]
  assert spaced(list(range(1, 11)), 1) == [10]


def test_peer_medians_and_memory_columns(bench, monkeypatch, capsys):
  # The orchestration without the peer's virtualenv: both sides faked.
  del bench  # Only for the scripts' folder on sys.path.
  mod = _load("peer_learn2learn")
  args = mod.parse_args(["--learners", "maml1", "--rounds", "3",
                         "--with-metalearn"])
  rss = iter([3e9, 1e9, 2e9])
  peer_rss = iter([4e9, 6e9, 5e9])

  def peer(_, name):
    return {"learner": name, "peak_rss_bytes": next(peer_rss),
            **{m: {"tasks_per_s": 8.0} for m in mod.MODES}}

  monkeypatch.setattr(mod, "spawn_peer", peer)
  monkeypatch.setattr(mod, "_metalearn_runner", lambda a: lambda name: {
      "tasks_per_s": 10.0, "peak_rss_bytes": next(rss)})
  (row,) = mod.measure(args)
  assert row["metalearn_peak_rss_bytes"] == 2e9
  assert row["l2l_peak_rss_bytes"] == 5e9
  assert row["l2l_end_to_end_tasks_per_s"] == 8.0
  mod.report(args, {"cpu": "x", "cpus": [0], "load_average_1m": 0}, [row])
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("| MAML k=1 | 10") and line.endswith("| 2 | 5 |")
  # Shares of the matmul peak: 10 and 8 tasks/s of 5 GFLOP at 200 GFLOP/s.
  work = {"matmul_peak_gflops": 200.0, "gflop_per_task": {"maml1": 5.0}}
  mod.add_peak_shares([row], work)
  assert row["metalearn_peak_percent"] == pytest.approx(25.0)
  assert row["l2l_compute_only_peak_percent"] == pytest.approx(20.0)
  mod.report(args, {"cpu": "x", "cpus": [0], "load_average_1m": 0}, [row],
             work)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line == "| MAML k=1 | 5 | 25.0 | 20.0 |"
