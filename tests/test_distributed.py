"""Two CPU processes (gloo) under `accelerate launch`, with DDP and with FSDP2, train like one
process and keep one mask."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from imp_jobs import final_perplexity, final_sparsity

from pipeline.local_server import free_port

WORKER = Path(__file__).with_name("launch_worker.py")
LAUNCH_FLAGS = {
    "ddp": ["--multi_gpu"],  # as the README says: the wrapped layer class is read from the model
    "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"],
}


def accelerate_launch(mode: str, *args) -> list:
    return [
        "accelerate",
        "launch",
        *LAUNCH_FLAGS[mode],
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


def run(command, cwd, env=None) -> str:
    # CPU processes on a GPU machine too (its GPUs hidden): the numbers they are held to are the CPU's
    cpus = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env or {}))
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=cpus)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.mark.parametrize("mode, losses", [("ddp", ("none", "logits")), ("fsdp", ("none", "squarehead"))])
def test_two_processes_keep_one_mask_and_train_like_one(mode, losses, tmp_path, tiny_model_dir, corpus_dir):
    """Each loss against one process (this one); one launch trains with each loss in turn (a launch's start-up
    is most of its cost here)."""
    from launch_worker import train_and_record

    model, corpus = str(tiny_model_dir), str(corpus_dir)
    run(accelerate_launch(mode, str(WORKER), model, corpus, str(tmp_path / mode), ",".join(losses)), tmp_path)
    for distill in losses:
        train_and_record(model, corpus, tmp_path / "single" / distill, distill)
        single = torch.load(tmp_path / "single" / distill / "rank0.pt", weights_only=True)
        ranks = [torch.load(tmp_path / mode / distill / f"rank{i}.pt", weights_only=True) for i in range(2)]
        assert_trained_like_one(mode, distill, single, ranks)


def assert_trained_like_one(mode: str, distill: str, single: dict, ranks: list) -> None:
    for name, mask in single["masks"].items():  # rank 1 pruned other weights; training gave it rank 0's
        assert torch.equal(ranks[0]["masks"][name], mask) and torch.equal(ranks[1]["masks"][name], mask), name
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name  # the processes stayed in lockstep
    # Data parallel sums a split batch's gradients in another order, and Adam turns the last bits of a near-zero
    # gradient into a whole step of either sign: single weights may differ by the lr (2.2e-3 measured on a
    # 16-core machine). What training did must not: the distance between the two runs' weights is a small part
    # of how far training moved them (1e-5 of it here), where a wrong split or mask would be most of it.
    moved, apart = (
        math.sqrt(sum(float(((ends[name] - starts[name]) ** 2).sum()) for name in single["state"]))
        for ends, starts in ((single["state"], single["start"]), (ranks[0]["state"], single["state"]))
    )
    assert apart < 0.02 * moved, (apart, moved)
    for result in ranks:
        assert result["sparsity"] == pytest.approx(0.5, abs=1e-12) and result["changed"] == []
        assert result["tokens"] == single["tokens"]  # batch 4 is the global batch: 2 windows per process
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4)
        assert result["perplexity"] == pytest.approx(single["perplexity"], rel=1e-4)  # windows split, gathered
    assert ranks[0]["perplexity"] == ranks[1]["perplexity"]
    assert single["parallelism"] == "NO" and single["held_parameters"] == single["parameters"]
    if mode == "ddp":
        assert [r["parallelism"] for r in ranks] == ["MULTI_CPU"] * 2
        assert all(r["held_parameters"] == r["parameters"] for r in ranks)  # every process holds a full copy
        if distill != "none":  # and a full copy of the teacher
            assert all(r["teacher_held_parameters"] == r["parameters"] for r in ranks)
    else:
        assert [r["parallelism"] for r in ranks] == ["FSDP"] * 2
        # each process held its half of every parameter (dim 0 split in two) and no more
        assert sum(r["held_parameters"] for r in ranks) == single["parameters"]
        assert all(r["held_parameters"] < 0.6 * r["parameters"] for r in ranks)
        if distill != "none":  # the teacher is sharded as the student is
            assert sum(r["teacher_held_parameters"] for r in ranks) == single["parameters"]
            assert all(r["teacher_held_parameters"] < 0.6 * r["parameters"] for r in ranks)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_iterative_under_accelerate_launch_logs_and_saves_once(
    mode, tmp_path, tiny_model_dir, corpus_dir, reference_iterative_run
):
    import mlflow

    from pipeline.checkpoint import load_checkpoint

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [
        "iterative",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        f"text:{corpus_dir}",
        "--target-sparsity",
        "0.488",
        "--prune-percentage",
        "0.2",
        "--epochs-per-iteration",
        "1",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--seqlen",
        "64",
        "--device",
        "cpu",
        "--log-every",
        "2",
        "--prune-method",
        "sparsegpt",
        "--nsamples",
        "8",
    ]  # run_iterative_cli's job
    single = reference_iterative_run
    launched = run(
        accelerate_launch(mode, "-m", "pipeline", *args, "--output-dir", mode, "--experiment", mode), tmp_path, env
    )
    assert launched.count("Iterative pruning complete") == 1  # only the main process prints
    assert final_perplexity(launched) == pytest.approx(final_perplexity(single), rel=1e-3)
    assert load_checkpoint(tmp_path / mode)["iteration"] == 3
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=[mode])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.final_sparsity"] == pytest.approx(final_sparsity(single), abs=1e-4)


def test_batch_that_does_not_split_over_the_processes_is_refused_before_any_work(tmp_path, tiny_model_dir):
    done = subprocess.run(
        accelerate_launch(
            "ddp", "-m", "pipeline", "train", "--model", str(tiny_model_dir), "--batch-size", "3", "--output-dir", "out"
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2 and "must split evenly over the 2 processes" in ours[0], done.stderr  # one line per process
    assert not (tmp_path / "out").exists()


def test_compare_under_accelerate_launch_runs_every_cell_on_both_processes(
    tmp_path, tiny_model_dir, corpus_dir, monkeypatch
):
    """The grid launched on two processes: one MLflow run per cell, the one-process numbers, one budget."""
    import mlflow

    from pipeline.config import CompareConfig
    from pipeline.jobs.compare import run_compare
    from pipeline.settings import build

    settings = {
        "model": str(tiny_model_dir),
        "dataset": f"text:{corpus_dir}",
        "sparsities": [0.5],
        "methods": ["sparsegpt", "iterative", "magnitude+ft"],
        "prune_percentage": 0.4,
        "epochs_per_iteration": 1,
        "max_steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "nsamples": 4,
        "seqlen": 64,
        "device": "cpu",
    }
    flags = [
        word
        for key, value in settings.items()
        for word in (f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value))
    ]
    (tmp_path / "launched").mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'launched' / 'mlflow.db'}"}
    out = run(
        accelerate_launch("ddp", "-m", "pipeline", "compare", *flags, "--experiment", "launched", "--no-report"),
        tmp_path / "launched",
        env,
    )
    assert out.count("| Method | Sparsity |") == 1  # only the main process writes the table
    launched = pd.read_csv(tmp_path / "launched" / "reports" / "launched" / "compare.csv").set_index("method")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'single.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'single.db'}")
    single = run_compare(build(CompareConfig, {**settings, "experiment": "single", "report": False})).set_index(
        "method"
    )
    assert sorted(launched.index) == sorted(single.index) == ["iterative", "magnitude+ft", "sparsegpt", "unpruned"]
    for method in single.index:
        assert launched.loc[method, "perplexity"] == pytest.approx(single.loc[method, "perplexity"], rel=1e-3), method
        assert launched.loc[method, "train_tokens"] == single.loc[method, "train_tokens"]  # the global budget
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["launched"])
    assert len(runs) == 1 + 4 and set(runs["status"]) == {"FINISHED"}  # the compare run and one run per cell
    mlflow.set_tracking_uri(None)
