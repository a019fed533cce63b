"""What a recovery trains (--train-params): every parameter, the norms and biases, or masked LoRA adapters."""

from __future__ import annotations

import copy

import mlflow
import pandas as pd
import pytest
import torch
from loading import load_model_and_tokenizer
from mlflow.tracking import MlflowClient
from test_refusals import here

from pipeline.adapters import MaskedLoRA, norm_and_bias_parameters
from pipeline.config import CompareConfig, TrainConfig
from pipeline.jobs.compare import run_compare
from pipeline.pruning.magnitude import magnitude_prune_layerwise
from pipeline.pruning.masks import model_masks, prunable_linears
from pipeline.settings import build
from pipeline.training import train_keeping_masks

RANK = 4


@pytest.fixture()
def pruned(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    magnitude_prune_layerwise(prunable_linears(model), 0.6)
    return model


def blocks(n=12, seqlen=32, vocab=400):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def config(mode, **extra):
    settings = dict(lr=5e-3, batch_size=4, max_steps=3, log_every=1, train_params=mode, lora_rank=RANK)
    return TrainConfig(**{**settings, **extra})


def test_the_masked_update_keeps_every_zero_at_every_step():
    weight = torch.randn(6, 10).masked_fill(torch.rand(6, 10) < 0.5, 0.0)
    adapter = MaskedLoRA(weight, rank=3, alpha=6.0)
    torch.nn.init.normal_(adapter.B)  # a trained B: the update is non-zero everywhere before the mask
    effective = adapter(weight)
    assert torch.equal(effective != 0, weight != 0)
    expected = weight + 2.0 * (adapter.B @ adapter.A) * (weight != 0)
    assert torch.allclose(effective, expected)


def test_lora_trains_only_the_adapters_and_merges_into_the_mask(pruned):
    linears = prunable_linears(pruned)
    masks = model_masks(linears)
    before = copy.deepcopy(pruned.state_dict())
    result = train_keeping_masks(pruned, linears, blocks(), config("lora"), show_progress=False)
    adapters = sum(RANK * (m.weight.shape[0] + m.weight.shape[1]) for m in linears.values())
    assert result.trained_parameters == adapters  # A and B of each matrix, nothing else
    assert result.optimizer_state_elements == 2 * adapters  # AdamW's two moments of exactly those
    after = pruned.state_dict()
    assert set(after) == set(before)  # merged: no adapter left in the model
    for name, module in linears.items():
        assert torch.equal(module.weight != 0, masks[name]), name  # exactly the mask's zeros
        assert not torch.equal(module.weight, before[f"{name}.weight"])  # the update reached the weight
    for key in before:  # everything but the prunable matrices untouched
        if not any(key == f"{name}.weight" for name in linears):
            assert torch.equal(after[key], before[key]), key
    assert all(p.requires_grad for p in pruned.parameters())


def test_norms_biases_leaves_every_matrix_bit_identical(pruned):
    linears = prunable_linears(pruned)
    before = copy.deepcopy(pruned.state_dict())
    result = train_keeping_masks(pruned, linears, blocks(), config("norms-biases"), show_progress=False)
    trained = norm_and_bias_parameters(pruned)
    assert result.trained_parameters == sum(p.numel() for p in trained)
    assert result.optimizer_state_elements == 2 * result.trained_parameters
    trained_ids = {id(p) for p in trained}
    changed = 0
    for name, parameter in pruned.named_parameters():
        if id(parameter) in trained_ids:
            changed += not torch.equal(parameter, before[name])
        else:
            assert torch.equal(parameter, before[name]), name  # bit for bit: linears, embeddings, lm_head
    assert changed > 0
    assert any(".bias" in n for n in before) and any("layer_norm" in n for n in before)


@pytest.mark.parametrize("mode", ["lora", "norms-biases"])
def test_distillation_trains_with_each_mode(pruned, tiny_model_dir, mode):
    teacher, _ = load_model_and_tokenizer(str(tiny_model_dir))
    linears = prunable_linears(pruned)
    masks = model_masks(linears)
    result = train_keeping_masks(
        pruned, linears, blocks(), config(mode, distill="logits"), teacher=teacher, show_progress=False
    )
    assert result.steps == 3 and result.final_loss == result.final_loss  # finite
    assert all(torch.equal(m.weight != 0, masks[n]) for n, m in linears.items())


@pytest.mark.parametrize("command", ["train", "iterative"])
def test_the_commands_with_lora_save_exactly_the_masks_zeros(
    command, mlflow_store, tmp_path, tiny_model_dir, corpus_dir
):
    """`train --train-params lora` on a pruned model, `iterative --train-params lora` from the dense one: the
    saved and reloaded model has exactly the mask's zeros."""
    source = tmp_path / "pruned"
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    magnitude_prune_layerwise(prunable_linears(model), 0.5)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    common = ("--dataset", f"text:{corpus_dir}", "--seqlen", "64", "--device", "cpu", "--batch-size", "4")
    common += ("--max-steps", "2", "--lr", "5e-3", "--train-params", "lora", "--lora-rank", "4", "--no-system-metrics")
    if command == "train":
        args = ("train", "--model", str(source), "--output-dir", "out", *common)
        saved = tmp_path / "out"
    else:
        args = ("iterative", "--model", str(tiny_model_dir), "--target-sparsity", "0.5", "--prune-percentage", "0.3")
        args += ("--epochs-per-iteration", "1", "--output-dir", "ckpt", "--model-dir", "final", *common)
        saved = tmp_path / "final"
    result = here(*args, "--experiment", "lora", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reloaded, _ = load_model_and_tokenizer(str(saved))
    linears = prunable_linears(reloaded)
    for name, module in linears.items():  # every matrix at exactly round(0.5 * n) zeros, the target's count
        assert int((module.weight == 0).sum()) == round(0.5 * module.weight.numel()), name
    if command == "train":  # the same zeros as the model it started from, element for element
        for (name, a), b in zip(prunable_linears(model).items(), linears.values()):
            assert torch.equal(a.weight == 0, b.weight == 0), name
    else:  # the last checkpoint's masks are the saved model's
        checkpoint = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
        for name, module in linears.items():
            assert torch.equal(module.weight != 0, checkpoint["masks"][name]), name
    run = mlflow.search_runs(experiment_names=["lora"], output_format="list")[0]
    adapters = sum(4 * (m.weight.shape[0] + m.weight.shape[1]) for m in linears.values())
    assert run.data.metrics["trained_parameters"] == adapters


def test_a_grid_trains_each_cell_each_way_at_one_budget(mlflow_store, tmp_path, tiny_model_dir, corpus_dir):
    settings = dict(
        model=str(tiny_model_dir),
        dataset=f"text:{corpus_dir}",
        sparsities=[0.5],
        prune_percentage=0.5,
        epochs_per_iteration=1,
        max_steps=2,
        batch_size=4,
        lr=5e-3,
        nsamples=4,
        seqlen=64,
        device="cpu",
        experiment="modes",
        output_dir="reports/modes",
        methods=["sparsegpt+ft"],
        train_params=["all", "norms-biases", "lora"],
        lora_rank=4,
    )
    run_compare(build(CompareConfig, settings))
    runs = pd.read_csv(tmp_path / "reports/modes/compare.csv")
    trained = runs[runs["kind"] == "trained"].set_index("train_params")
    assert sorted(trained.index) == ["all", "lora", "norms-biases"]
    assert trained["train_tokens"].nunique() == 1  # one budget
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    linears = prunable_linears(model)
    expected = {
        "all": sum(p.numel() for p in model.parameters()),
        "norms-biases": sum(p.numel() for p in norm_and_bias_parameters(model)),
        "lora": sum(4 * sum(m.weight.shape) for m in linears.values()),
    }
    for mode, count in expected.items():
        metrics = MlflowClient().get_run(trained.loc[mode, "run_id"]).data.metrics
        assert metrics["trained_parameters"] == count, mode
    summary = pd.read_csv(tmp_path / "reports/modes/summary.csv")
    assert len(summary[summary["kind"] == "trained"]) == 3  # a row each, not one mixed mean
    report = (tmp_path / "reports/modes/report.md").read_text()
    assert "SparseGPT + FT [lora]" in report and "SparseGPT + FT [norms-biases]" in report
