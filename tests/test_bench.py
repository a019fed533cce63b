"""`bench --quick` runs end to end; its figures are checked for sense, not for speed."""

from __future__ import annotations

import json
import math

import pytest


def test_bench_quick_runs_and_reports_every_target(mlflow_store, tmp_path, tiny_model_dir, corpus_dir):
    import mlflow

    from pipeline.bench import TARGETS
    from pipeline.config import BenchConfig
    from pipeline.jobs.bench import run_bench
    from pipeline.settings import build

    results = run_bench(
        build(
            BenchConfig,
            dict(
                model=str(tiny_model_dir),
                dataset=f"text:{corpus_dir}",
                quick=True,
                device="cpu",
                output_dir=str(tmp_path / "bench"),
                experiment="bench-test",
            ),
        )
    )
    for key, _, _, _ in TARGETS:
        assert math.isfinite(results[key]) and results[key] > 0, key
    # The batched evaluation and the reference one-window loop are two computations of one number.
    assert results["eval_perplexity"] == pytest.approx(results["eval_perplexity_one_window"], rel=1e-5)
    assert results["eval_windows"] == 4
    assert [row["sparsity"] for row in results["sparsegpt"].values()] == [pytest.approx(0.5, abs=1e-6)] * 2
    two, eight = results["sparsegpt"][2], results["sparsegpt"][8]
    assert eight["weights_bytes"] > two["weights_bytes"]
    assert len(results["imp_iteration_seconds"]) == 2
    assert all(w > t > 0 for w, t in zip(results["imp_iteration_seconds"], results["imp_train_seconds"]))
    saved = json.loads((tmp_path / "bench" / f"bench-{tiny_model_dir.name}-quick.json").read_text())
    assert saved["masked_step_ratio"] == results["masked_step_ratio"]
    runs = mlflow.search_runs(experiment_names=["bench-test"])
    bench_run = runs[runs["tags.mlflow.runName"] == f"bench {tiny_model_dir.name}-quick"].iloc[0]
    assert bench_run["metrics.eval_speedup"] == pytest.approx(results["eval_speedup"])
    assert "metrics.target_met_masked_step_ratio" in runs.columns
