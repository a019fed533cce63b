"""On a CUDA device: the numbers the CPU gives where the arithmetic is the same (float32 perplexity, SparseGPT's
masks), the IMP loop and a grid end to end with the GPU's defaults (bf16 autocast), the peak memory read from the
CUDA allocator, and one process moving between the CPU and the GPU. Skipped where there is no CUDA device, as in
CI; on a GPU machine: `pytest tests/test_gpu.py`."""

from __future__ import annotations

import copy

import mlflow
import pandas as pd
import pytest
import torch
from imp_jobs import final_perplexity, final_sparsity, finished_output, run_iterative_cli
from loading import load_model_and_tokenizer
from test_crossover import settings as crossover_settings

from pipeline.config import CompareConfig, PruneConfig, TrainConfig
from pipeline.data import calibration_windows, load_corpus, training_blocks
from pipeline.errors import ConfigError
from pipeline.jobs.compare import run_compare
from pipeline.models import resolve_device
from pipeline.peak_memory import peak_memory
from pipeline.perplexity import evaluate_on
from pipeline.pruning import prune_model
from pipeline.pruning.magnitude import magnitude_prune_layerwise
from pipeline.pruning.masks import model_masks, prunable_linears
from pipeline.settings import build
from pipeline.training import train_keeping_masks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture()
def on_cpu(tiny_model_dir):
    return load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")


def test_float32_perplexity_on_the_gpu_equals_the_cpus(on_cpu, corpus_dir):
    model, tokenizer = on_cpu
    corpus = load_corpus(f"text:{corpus_dir}")
    cpu = evaluate_on(model, tokenizer, corpus, "test", 64, "cpu")
    gpu = evaluate_on(model, tokenizer, corpus, "test", 64, CUDA)
    assert gpu.windows == cpu.windows
    assert gpu.perplexity == pytest.approx(cpu.perplexity, rel=1e-4)  # float32 both: only the summation order
    assert next(model.parameters()).device.type == "cpu"  # evaluated on the GPU, handed back where it was


def test_sparsegpt_on_the_gpu_prunes_as_on_the_cpu(on_cpu, corpus_dir):
    """Same calibration, float32 both: exact sparsity on each, and the masks and perplexity agree but for the
    weights whose scores tie within rounding (the Cholesky factors differ in the last bits)."""
    model, tokenizer = on_cpu
    corpus = load_corpus(f"text:{corpus_dir}")
    windows = calibration_windows(corpus, tokenizer, 8, 64, seed=0)
    config = PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=8)
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model)
    assert prune_model(cpu, config, windows, "cpu").sparsity == pytest.approx(0.5, abs=1e-3)
    assert prune_model(gpu, config, windows, CUDA).sparsity == pytest.approx(0.5, abs=1e-3)
    masks = [
        (a.weight == 0, b.weight.cpu() == 0)
        for a, b in zip(prunable_linears(cpu).values(), prunable_linears(gpu).values())
    ]
    agree = sum(int((a == b).sum()) for a, b in masks) / sum(a.numel() for a, _ in masks)
    assert agree > 0.99
    ppl = [evaluate_on(m, tokenizer, corpus, "test", 64, "cpu").perplexity for m in (cpu, gpu)]
    assert ppl[1] == pytest.approx(ppl[0], rel=0.01)


def test_one_process_trains_on_the_cpu_then_the_gpu_then_the_cpu(on_cpu, corpus_dir):
    """Accelerate keeps one state per process: each training stays on the device its model is on, masks exact."""
    model, tokenizer = on_cpu
    blocks = training_blocks(load_corpus(f"text:{corpus_dir}"), tokenizer, 32)
    for device in ("cpu", "cuda", "cpu"):
        model.to(device)
        linears = prunable_linears(model)
        magnitude_prune_layerwise(linears, 0.5)
        before = model_masks(linears)
        train_keeping_masks(
            model, linears, blocks, TrainConfig(lr=1e-3, batch_size=4, max_steps=2), show_progress=False
        )
        assert {p.device.type for p in model.parameters()} == {device}
        assert all(torch.equal(before[n], mask) for n, mask in model_masks(linears).items())


def test_a_launcher_with_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ConfigError, match=r"process \d+ of this machine wants a GPU of its own"):
        resolve_device("cuda")


def test_peak_memory_on_the_gpu_is_the_allocators():
    before = torch.cuda.memory_allocated(CUDA)
    with peak_memory(CUDA) as peak:
        block = torch.empty(10 * 2**20, dtype=torch.float32, device=CUDA)  # 40 MiB
        del block
    assert peak.bytes - before == pytest.approx(40 * 2**20, rel=0.01)


def test_the_imp_loop_on_the_gpu_ends_where_the_cpus_does(mlflow_store, tmp_path, tiny_model_dir, corpus_dir):
    """bf16 autocast on the GPU, float32 on the CPU: the same schedule, sparsity and, within rounding's
    drift over 18 steps, the same perplexity; the peak memory is the GPU allocator's."""
    cpu = finished_output(
        run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "cpu", "--model-dir", "cpu-model")
    )
    gpu = finished_output(
        run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--device", "cuda", "--model-dir", "gpu-model")
    )
    assert final_sparsity(gpu) == pytest.approx(final_sparsity(cpu), abs=2e-3)
    assert final_perplexity(gpu) == pytest.approx(final_perplexity(cpu), rel=0.05)
    run = mlflow.search_runs(experiment_names=["imp"], order_by=["start_time DESC"], max_results=1).iloc[0]
    weights = sum(p.numel() * 4 for p in load_model_and_tokenizer(str(tiny_model_dir))[0].parameters())
    # weights, their gradients and AdamW's two moments at the least; the CUDA context itself is not counted
    assert 4 * weights < run["metrics.peak_memory_bytes"] < 2**30


def test_a_grid_on_the_gpu_trains_every_cell_its_budget(mlflow_store, tiny_model_dir, corpus_dir):
    settings = crossover_settings(tiny_model_dir, corpus_dir, ["1000"])  # the crossover test's grid, smaller
    settings.update(prune_percentages=[0.5], lrs=[3e-3], seeds=[0], device="cuda", experiment="gpu-grid")
    methods = ["sparsegpt", "iterative", "iterative-sparsegpt", "sparsegpt+ft"]
    settings.update(output_dir="reports/gpu-grid", methods=methods)
    run_compare(build(CompareConfig, settings))
    cells = pd.read_csv("reports/gpu-grid/compare.csv")
    trained = cells[cells["kind"] == "trained"]
    assert sorted(trained["method"]) == ["iterative", "iterative-sparsegpt", "sparsegpt+ft"]
    assert (trained["train_tokens"] == 4 * 4 * 64).all()  # 1000 tokens: 3.9 steps of 4 x 64, rounded to 4
    assert (cells.loc[cells["kind"] != "dense", "sparsity"] >= 0.75 - 1e-3).all()
    assert cells["perplexity"].between(1, 1e4).all()
