"""`bench --quick` runs end to end; its figures are checked for sense, not for speed."""

from __future__ import annotations

import json
import math

import pytest


def test_bench_quick_runs_and_reports_every_target(mlflow_store, tmp_path, tiny_model_dir, corpus_dir):
    import mlflow

    from pipeline.config import BenchConfig
    from pipeline.jobs.bench import run_bench
    from pipeline.settings import build
    from pipeline.tools.bench import PAIRED_RATIOS, TARGETS

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
    walls, trained, evaluated = (results[f"imp_{k}_seconds"] for k in ("iteration", "train", "eval"))
    assert all(w > t + e and t > 0 and e > 0 for w, t, e in zip(walls, trained, evaluated))
    for key, _, _ in PAIRED_RATIOS:  # a median of the repeats' ratios lies within their spread
        low, high = results[f"{key}_spread"]
        assert low <= results[key] <= high, key
    assert results["distill_step_ratio_floor"] > 1
    machine = results["machine"]
    assert machine["cpu"] and machine["threads"] >= 1 and machine["torch"]
    table = (tmp_path / "bench" / f"bench-{tiny_model_dir.name}-quick.md").read_text()
    assert f"machine: {machine['cpu']}" in table
    bound = results["sparsegpt_opt_125m"]  # the ratio is measured seconds over FLOPs at the measured peak
    assert results["sparsegpt_bound_ratio"] == pytest.approx(
        sum(bound["seconds_per_layer"].values())
        * bound["matmul_peak_flops_per_second"]
        / sum(bound["flops_per_layer"].values())
    )
    saved = json.loads((tmp_path / "bench" / f"bench-{tiny_model_dir.name}-quick.json").read_text())
    assert saved["masked_step_ratio"] == results["masked_step_ratio"]
    runs = mlflow.search_runs(experiment_names=["bench-test"])
    bench_run = runs[runs["tags.mlflow.runName"] == f"bench {tiny_model_dir.name}-quick"].iloc[0]
    assert bench_run["metrics.eval_speedup"] == pytest.approx(results["eval_speedup"])
    assert "metrics.target_met_masked_step_ratio" in runs.columns


def test_sparsegpt_arithmetic_of_an_opt_layer_by_hand():
    """Two layers 8 wide (MLP 32), 3 windows of 5 tokens: the phases' FLOPs written out by hand."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    from pipeline.tools.bench import inputs_shared, sparsegpt_layer_flops

    config = OPTConfig(
        hidden_size=8, word_embed_proj_dim=8, ffn_dim=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=50
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    groups = inputs_shared(model, torch.randint(0, 50, (1, 5)))
    assert sorted(map(sorted, groups)) == sorted(
        [
            [
                "model.decoder.layers.0.self_attn.k_proj",
                "model.decoder.layers.0.self_attn.q_proj",
                "model.decoder.layers.0.self_attn.v_proj",
            ],
            ["model.decoder.layers.0.self_attn.out_proj"],
            ["model.decoder.layers.0.fc1"],
            ["model.decoder.layers.0.fc2"],
        ]
    )
    flops = sparsegpt_layer_flops(model, windows=3, seqlen=5, groups=groups)
    tokens = 15
    weights = 4 * 8 * 8 + 32 * 8 + 8 * 32  # q, k, v, out; fc1; fc2
    forward = 2 * tokens * weights + 2 * 3 * 5**2 * 8
    assert flops["forward"] == forward
    assert flops["statistics"] == forward + 2 * tokens * (8**2 + 8**2 + 8**2 + 32**2)  # qkv, out, fc1, fc2
    assert flops["factorization"] == pytest.approx(2 / 3 * (5 * 8**3 + 32**3))
    assert flops["sweep"] == 4 * 8 * 8 * 9 + 32 * 8 * 9 + 8 * 32 * 33
