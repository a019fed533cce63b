"""Recovery modes (--train-params and --recovery) each at its own lr, paired against training every parameter:
the report's table equals a recomputation from compare.csv, and the trained parameters and peak memory beside
each mode are what they should be."""

from __future__ import annotations

import math
import time

import mlflow
import pandas as pd
import pytest
import torch
from loading import load_model_and_tokenizer
from scipy import stats
from test_refusals import here

from pipeline.config import CompareConfig
from pipeline.jobs.compare import run_compare
from pipeline.peak_memory import peak_memory
from pipeline.settings import build

pytestmark = pytest.mark.xdist_group("recovery-modes")  # one worker runs the module, so the grid is run once
MODES = [("all", "finetune"), ("lora", "finetune"), ("norms-biases", "finetune"), ("all", "reconstruct")]


def settings(model, corpus, **axes) -> dict:
    return dict(
        model=str(model),
        dataset=f"text:{corpus}",
        sparsities=[0.7],
        methods=["sparsegpt+ft"],
        lrs=[1e-3, 3e-3],
        seeds=[0, 1],
        budgets=["768"],
        batch_size=4,
        nsamples=4,
        seqlen=32,
        device="cpu",
        experiment="recovery-modes",
        output_dir="reports/recovery-modes",
        log_models="none",
        **axes,
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir, corpus_dir):
    """Fine-tuning three ways and reconstruction in one grid (reconstruction with lora or norms-biases makes no
    cell)."""
    root = tmp_path_factory.mktemp("recovery-modes")
    modes = dict(train_params=["all", "lora", "norms-biases"], recovery=["finetune", "reconstruct"])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        run_compare(build(CompareConfig, settings(tiny_model_dir, corpus_dir, **modes)))
        mlflow.set_tracking_uri(None)
    return root / "reports/recovery-modes"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--recovery", "reconstruct", "--train-params", "lora"], "makes no cell with --train-params lora"),
        (["--recovery", "finetune,reconstruct", "--distill", "logits"], "add none to --distill"),
        (["--recovery", "reconstruct", "--train-params", "all,lora"], "add finetune to --recovery"),
    ],
)
def test_a_recovery_that_would_make_no_cell_is_refused(tmp_path, args, words):
    result = here("compare", "--model", "opt-tiny", "--methods", "sparsegpt+ft", *args, cwd=tmp_path)
    assert result.returncode == 2 and words in result.stderr, result.stderr


def recomputed(runs: pd.DataFrame) -> pd.DataFrame:
    """From compare.csv alone: per mode the lr with the lowest mean validation perplexity; each mode's test
    perplexity minus the plain mode's, seed by seed, with Student's t interval."""
    trained = runs[runs["kind"] == "trained"]
    means = trained.groupby(["train_params", "recovery", "lr"])["val_perplexity"].mean().reset_index()
    chosen = means.loc[means.groupby(["train_params", "recovery"])["val_perplexity"].idxmin()]
    by_seed = {
        (row["train_params"], row["recovery"]): trained[
            (trained["train_params"] == row["train_params"])
            & (trained["recovery"] == row["recovery"])
            & (trained["lr"] == row["lr"])
        ].set_index("seed")["perplexity"]
        for _, row in chosen.iterrows()
    }
    rows = []
    for (train_params, recovery), lr in zip(zip(chosen["train_params"], chosen["recovery"]), chosen["lr"]):
        differences = by_seed[(train_params, recovery)] - by_seed[("all", "finetune")]
        n, mean = len(differences), differences.mean()
        half = stats.t.ppf(0.975, n - 1) * differences.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        mode = train_params if train_params != "all" else recovery if recovery != "finetune" else "plain"
        rows.append(
            dict(mode=mode, lr=lr, difference=mean, low=mean - half, high=mean + half, better=(differences < 0).sum())
        )
    return pd.DataFrame(rows)


def test_each_mode_is_paired_against_training_every_parameter_as_compare_csv_says(grid):
    runs = pd.read_csv(grid / "compare.csv")
    trained = runs[runs["kind"] == "trained"]
    assert sorted(set(zip(trained["train_params"], trained["recovery"]))) == sorted(MODES)
    assert (trained["train_tokens"] == 768).all()  # 6 steps of 4 x 32, whatever the mode
    assert len(trained) == 4 * 2 * 2
    written = pd.read_csv(grid / "recovery_modes.csv")
    expected = recomputed(runs)
    merged = written.merge(expected, on="mode", suffixes=("", "_expected"))
    assert sorted(merged["mode"]) == ["lora", "norms-biases", "plain", "reconstruct"]
    assert merged["lr"].tolist() == pytest.approx(merged["lr_expected"].tolist())  # each mode its own lr
    others = merged[merged["mode"] != "plain"]
    for column in ("difference", "low", "high"):
        assert others[column].to_numpy() == pytest.approx(others[f"{column}_expected"].to_numpy(), abs=1e-3), column
    assert others["mode_better"].tolist() == others["better"].tolist()
    for _, row in others.iterrows():
        expected_verdict = "better" if row["high"] < 0 else "worse" if row["low"] > 0 else "tie"
        assert row["verdict"] == expected_verdict
    report = (grid / "report.md").read_text()
    assert "Recovery modes, each at its own learning rate" in report
    for difference in others["difference"]:
        assert f"{difference:+.2f}" in report


def test_each_mode_logs_what_it_trained_and_its_peak_memory(grid, tiny_model_dir):
    """The trained parameters counted independently on the model: every parameter; LoRA's A and B (rank 8) on
    every prunable matrix; the one-dimensional parameters (OPT's norms and biases); the decoder layers' own."""
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    named = dict(model.named_parameters())
    matrices = [p for name, p in named.items() if ".layers." in name and p.ndim == 2]
    expected = {
        "plain": sum(p.numel() for p in model.parameters()),
        "lora": sum(8 * (p.shape[0] + p.shape[1]) for p in matrices),
        "norms-biases": sum(p.numel() for p in model.parameters() if p.ndim == 1),
        "reconstruct": sum(p.numel() for name, p in named.items() if ".layers." in name),
    }
    written = pd.read_csv(grid / "recovery_modes.csv").set_index("mode")
    assert written["trained_parameters"].to_dict() == expected
    assert (written["peak_memory_bytes"] > sum(p.numel() * 4 for p in model.parameters())).all()  # the weights at least


def test_the_peak_memory_of_a_phase_holds_what_it_allocated_and_not_what_was_freed_before():
    big = torch.ones(40_000_000)  # 160 MB, freed before the phase: an allocator may keep it, the peak must not count it
    del big
    with peak_memory(torch.device("cpu")) as before:
        pass
    with peak_memory(torch.device("cpu")) as during:
        held = torch.ones(10_000_000)  # 40 MB live in the phase
        time.sleep(0.2)  # as long as a phase lasts for its sampler, which a loaded machine may run late
        del held
    assert during.bytes - before.bytes == pytest.approx(40_000_000, rel=0.1)
