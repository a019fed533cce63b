"""Masks, magnitude, SparseGPT, Wanda and the prune command."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from loading import load_model_and_tokenizer
from torch import nn

from pipeline.config import PruneConfig
from pipeline.errors import UserError
from pipeline.pruning import prune_model
from pipeline.pruning.magnitude import magnitude_prune_global, magnitude_prune_layerwise
from pipeline.pruning.masks import (
    MaskKeeper,
    allocate_exactly,
    lowest_k_mask,
    prunable_linears,
    sparsity_of,
    sparsity_report,
)
from pipeline.pruning.sequential import capture_layer_inputs, layer_output
from pipeline.pruning.sparsegpt import sparsegpt_prune_matrix
from pipeline.pruning.wanda import wanda_prune_matrix


@pytest.fixture()
def tiny(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    return model, tokenizer


def test_prunable_set_is_the_decoder_linears(tiny):
    model, _ = tiny
    names = list(prunable_linears(model))
    assert len(names) == 2 * 6
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert all(n.startswith("model.decoder.layers.") for n in names)
    assert list(prunable_linears(model, include=r"fc[12]")) == [n for n in names if ".fc" in n]
    assert len(prunable_linears(model, exclude=r"layers\.0\.")) == 6


def test_lowest_k_is_exact_under_ties():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5, 2.0])
    assert lowest_k_mask(scores, 3).tolist() == [False, True, True, False, True, False]
    assert int(lowest_k_mask(torch.zeros(100), 37).sum()) == 37
    assert allocate_exactly(10, torch.tensor([1, 1, 1])).tolist() == [3, 4, 3]
    assert int(allocate_exactly(1234, torch.rand(17) + 0.1).sum()) == 1234


def test_magnitude_layerwise_equals_torch_l1_unstructured(tiny):
    model, _ = tiny
    ours = prunable_linears(model)
    theirs = prunable_linears(copy.deepcopy(model))
    magnitude_prune_layerwise(ours, 0.37)
    for name, module in theirs.items():
        torch_prune.l1_unstructured(module, "weight", amount=0.37)
        assert torch.equal(module.weight_mask.bool(), ours[name].weight != 0), name
        assert int((ours[name].weight == 0).sum()) == round(0.37 * module.weight.numel())


def test_magnitude_global_equals_torch_global_unstructured(tiny):
    model, _ = tiny
    ours = prunable_linears(model)
    theirs = prunable_linears(copy.deepcopy(model))
    magnitude_prune_global(ours, 0.61)
    torch_prune.global_unstructured(
        [(m, "weight") for m in theirs.values()], pruning_method=torch_prune.L1Unstructured, amount=0.61
    )
    for name, module in theirs.items():
        assert torch.equal(module.weight_mask.bool(), ours[name].weight != 0), name
    total = sum(m.weight.numel() for m in ours.values())
    assert sum(int((m.weight == 0).sum()) for m in ours.values()) == round(0.61 * total)


def test_pruning_is_monotone_and_fraction_of_remaining(tiny):
    model, _ = tiny
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    before = {n: m.weight != 0 for n, m in linears.items()}
    target = sparsity_of(linears) + 0.2 * (1 - sparsity_of(linears))  # 20% of the remaining weights
    assert target == pytest.approx(0.6)
    magnitude_prune_layerwise(linears, target)
    for name, module in linears.items():
        assert not ((module.weight != 0) & ~before[name]).any()  # no zero came back
    assert sparsity_of(linears) == pytest.approx(0.6, abs=1e-3)
    magnitude_prune_layerwise(linears, 0.3)  # a lower target never revives weights
    assert sparsity_of(linears) == pytest.approx(0.6, abs=1e-3)


def test_sparsity_report_levels(tiny):
    model, _ = tiny
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    report = sparsity_report(model, linears)
    assert set(report["layers"]) == {"0", "1"}
    assert all(v == pytest.approx(0.5, abs=1e-3) for v in report["matrices"].values())
    prunable = sum(m.weight.numel() for m in linears.values())
    everything = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())  # zero-initialised biases count too
    assert report["all_parameters"] == pytest.approx(all_zeros / everything)
    assert report["prunable_zeros"] == sum(round(0.5 * m.weight.numel()) for m in linears.values())
    assert report["prunable_numel"] == prunable


def correlated_problem(rows=48, columns=128, samples=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    X = torch.randn(samples, columns, generator=generator) @ mixing
    W = torch.randn(rows, columns, generator=generator)
    return W, X, 2.0 / samples * X.T @ X


def output_error(W, W_pruned, X):
    return float(((X @ (W - W_pruned).T) ** 2).sum())


def test_sparsegpt_beats_magnitude_on_correlated_inputs():
    W, X, H = correlated_problem()
    pruned, _ = sparsegpt_prune_matrix(W, H.clone(), 0.5, blocksize=32)
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data = W.clone()
    magnitude_prune_layerwise({"w": linear}, 0.5)
    assert int((pruned == 0).sum()) == W.numel() // 2
    assert output_error(W, pruned, X) < 0.75 * output_error(W, linear.weight.data, X)


def test_sparsegpt_2_4_is_exact_and_sparsity_zero_changes_nothing():
    """The OBS result itself is checked against an oracle in test_oracles.py; here, the pattern and the no-op."""
    W, X, H = correlated_problem()
    pruned, _ = sparsegpt_prune_matrix(W, H.clone(), 0.0, prune_n=2, prune_m=4, blocksize=32)
    groups = (pruned != 0).reshape(W.shape[0], -1, 4).sum(dim=2)
    assert (groups == 2).all()
    unchanged, losses = sparsegpt_prune_matrix(W, H.clone(), 0.0)
    assert torch.allclose(unchanged, W, atol=1e-5) and float(losses.sum()) == 0.0
    magnitude_24 = wanda_prune_matrix(W, torch.ones(W.shape[1]), 0.0, 2, 4)
    assert output_error(W, pruned, X) < 0.75 * output_error(W, magnitude_24, X)


def test_sparsegpt_honours_an_existing_mask_and_dead_inputs():
    W, X, H = correlated_problem()
    W = W.clone()
    W[:, :10] = 0  # an earlier pruning step
    H[5, :] = 0
    H[:, 5] = 0  # input 5 never active
    pruned, _ = sparsegpt_prune_matrix(W, H.clone(), 0.6, blocksize=32)
    assert (pruned[:, :10] == 0).all()
    assert (pruned[:, 5] == 0).all()
    assert int((pruned == 0).sum()) == round(0.6 * W.numel())


def test_wanda_prunes_per_row_by_weight_times_input_norm():
    W, X, _ = correlated_problem()
    norms = (X**2).sum(dim=0)
    pruned = wanda_prune_matrix(W, norms, 0.5)
    score = W.abs() * norms.sqrt()
    for row in range(W.shape[0]):
        kept = pruned[row] != 0
        assert int((~kept).sum()) == W.shape[1] // 2
        assert score[row][kept].min() >= score[row][~kept].max()
    pattern = wanda_prune_matrix(W, norms, 0.0, 2, 4)
    assert ((pattern != 0).reshape(W.shape[0], -1, 4).sum(dim=2) == 2).all()


def test_wanda_beats_magnitude_when_input_norms_vary():
    W, X, _ = correlated_problem()
    scales = torch.logspace(-1, 1, X.shape[1])[torch.randperm(X.shape[1], generator=torch.Generator().manual_seed(1))]
    X = X * scales  # feature norms spread over two decades, as in trained LLMs
    norms = (X**2).sum(dim=0)
    magnitude_50 = wanda_prune_matrix(W, torch.ones(W.shape[1]), 0.5)
    magnitude_24 = wanda_prune_matrix(W, torch.ones(W.shape[1]), 0.0, 2, 4)
    assert output_error(W, wanda_prune_matrix(W, norms, 0.5), X) < 0.5 * output_error(W, magnitude_50, X)
    assert output_error(W, wanda_prune_matrix(W, norms, 0.0, 2, 4), X) < 0.5 * output_error(W, magnitude_24, X)


def test_layer_by_layer_forward_equals_the_full_model(tiny):
    model, tokenizer = tiny
    windows = torch.randint(3, len(tokenizer), (3, 40))
    batches = capture_layer_inputs(model, windows, torch.device("cpu"), batch_size=2)
    decoder = model.model.decoder
    with torch.no_grad():
        for layer in decoder.layers:
            for batch in batches:
                batch.hidden = layer_output(layer, batch)
        logits = torch.cat([model.lm_head(decoder.final_layer_norm(b.hidden)) for b in batches])
        expected = model(windows).logits
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize(
    "method, pattern",
    [
        ("sparsegpt", "unstructured"),
        ("wanda", "unstructured"),
        ("sparsegpt", "2:4"),
        ("wanda", "2:4"),
        ("magnitude", "2:4"),
    ],
)
def test_prune_model_lands_exactly(tiny, method, pattern):
    model, tokenizer = tiny
    windows = torch.randint(3, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, PruneConfig(method=method, sparsity=0.5, pattern=pattern, nsamples=8), windows)
    linears = prunable_linears(model)
    for name, module in linears.items():
        zeros = int((module.weight == 0).sum())
        assert zeros == module.weight.numel() // 2, name
        if pattern == "2:4":
            assert ((module.weight != 0).reshape(module.out_features, -1, 4).sum(2) == 2).all()
    if method != "magnitude":
        assert len(result.layers) == 2
        assert all(0 < r.relative_output_error < 1 for r in result.layers)


def test_calibrated_pruning_is_deterministic(tiny_model_dir):
    weights = []
    for _ in range(2):
        model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
        windows = torch.randint(3, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(1))
        prune_model(model, PruneConfig(method="sparsegpt", sparsity=0.7, nsamples=4), windows)
        weights.append(torch.cat([m.weight.reshape(-1) for m in prunable_linears(model).values()]))
    assert torch.equal(*weights)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, "outside"),
        ({"sparsity": -0.1}, "outside"),
        ({"pattern": "4:2"}, "N:M"),
        ({"pattern": "2-4"}, "N:M"),
        ({"method": "sparsegpt", "scope": "global"}, "global"),
        ({"method": "optimal"}, "unknown pruning method"),
        ({"include": "("}, "regex"),
    ],
)
def test_prune_config_rejects_bad_values(kwargs, message):
    with pytest.raises(UserError, match=message):
        PruneConfig(**kwargs)


def test_mask_keeper_keeps_zeros_through_adamw(tiny):
    model, tokenizer = tiny
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    keeper = MaskKeeper(linears)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = torch.randint(3, len(tokenizer), (2, 32))
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        keeper.zero_pruned_grads()
        assert all(float(m.weight.grad[m.weight == 0].abs().sum()) == 0 for m in linears.values())
        optimizer.step()
        optimizer.zero_grad()
        keeper.zero_pruned_weights()
    assert keeper.changed_matrices() == []
    assert sparsity_of(linears) == pytest.approx(0.5, abs=1e-3)


def test_prune_command_logs_and_reuses_the_dense_perplexity(
    mlflow_store, tiny_model_dir, corpus_dir, capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "own-cache"))  # no dense value from earlier tests
    import mlflow

    from pipeline.config import PruneRunConfig
    from pipeline.data import eval_tokens, load_corpus
    from pipeline.jobs.prune import run_prune
    from pipeline.perplexity import perplexity
    from pipeline.settings import build

    common = dict(
        model=str(tiny_model_dir),
        dataset=f"text:{corpus_dir}",
        device="cpu",
        seqlen=64,
        experiment="grid",
        seed=0,
        sparsity=0.5,
        nsamples=8,
    )
    first = run_prune(build(PruneRunConfig, {**common, "method": "wanda"}))
    assert "(cached)" not in capsys.readouterr().out
    second = run_prune(build(PruneRunConfig, {**common, "method": "sparsegpt"}))
    assert "(cached)" in capsys.readouterr().out  # the second run read the first's dense perplexity
    assert second["dense_perplexity"] == first["dense_perplexity"]

    dense_model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    ids = eval_tokens(load_corpus(f"text:{corpus_dir}"), tokenizer, "test", 64)
    assert first["dense_perplexity"] == pytest.approx(perplexity(dense_model, ids, 64).perplexity, rel=1e-6)
    saved, _ = load_model_and_tokenizer(str(second["output_dir"]))
    assert sparsity_of(prunable_linears(saved)) == pytest.approx(0.5, abs=1e-4)
    assert perplexity(saved, ids, 64).perplexity == pytest.approx(second["perplexity"], rel=1e-5)

    runs = mlflow.search_runs(experiment_names=["grid"]).set_index("params.prune_method")
    assert runs.loc["sparsegpt", "metrics.perplexity"] == pytest.approx(second["perplexity"])
    assert runs.loc["wanda", "metrics.sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert runs.loc["sparsegpt", "metrics.dense_perplexity"] == pytest.approx(first["dense_perplexity"])
    assert runs.loc["sparsegpt", "metrics.prune_seconds"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.loc["sparsegpt", "run_id"])}
    assert {"layers.csv", "sparsity_report.json"} <= artifacts
    table = mlflow.artifacts.load_text(f"runs:/{runs.loc['sparsegpt', 'run_id']}/layers.csv").splitlines()
    assert table[0].startswith("layer,") and len(table) == 3  # header + 2 decoder layers


def test_on_opt_tiny_sparsegpt_and_wanda_beat_magnitude():
    """The bar on the embedded model: at 50% and 2:4, on the whole pydocs test split, with the
    default calibration (128 pydocs windows, seed 0)."""
    from pipeline.data import calibration_windows, eval_tokens, load_corpus
    from pipeline.perplexity import perplexity

    corpus = load_corpus("pydocs")
    model, tokenizer = load_model_and_tokenizer("opt-tiny")
    seqlen = model.config.max_position_embeddings
    ids = eval_tokens(corpus, tokenizer, "test", seqlen)
    windows = calibration_windows(corpus, tokenizer, 128, seqlen, seed=0)
    for pattern in ("unstructured", "2:4"):
        results = {}
        for method in ("magnitude", "sparsegpt", "wanda"):
            model, _ = load_model_and_tokenizer("opt-tiny")
            prune_model(model, PruneConfig(method=method, sparsity=0.5, pattern=pattern), windows)
            results[method] = perplexity(model, ids, seqlen).perplexity
        # Measured: SparseGPT 0.84x / 0.79x magnitude's perplexity, Wanda 0.92x at 50%; at 2:4 Wanda ties
        # magnitude (0.999x here; 1.013x under torch 2.11 and transformers 5.17, magnitude itself 2% apart)
        assert results["sparsegpt"] < 0.9 * results["magnitude"], (pattern, results)
        if pattern == "unstructured":
            assert results["wanda"] < 0.95 * results["magnitude"], (pattern, results)
        else:
            assert results["wanda"] == pytest.approx(results["magnitude"], rel=0.02), (pattern, results)
