"""Issue 8: two CPU processes (gloo) under `accelerate launch` train like one process, masks identical."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.local_server import free_port
from imp_jobs import final_perplexity, final_sparsity

WORKER = Path(__file__).with_name("ddp_worker.py")


def accelerate_launch(*args) -> list:
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def run(command, cwd, env=None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def test_two_processes_keep_one_mask_and_train_like_one(tmp_path, tiny_model_dir, corpus_dir):
    from ddp_worker import train_and_record

    train_and_record(str(tiny_model_dir), str(corpus_dir), tmp_path / "single")  # one process: this one
    run(accelerate_launch(str(WORKER), str(tiny_model_dir), str(corpus_dir), str(tmp_path / "ddp")), tmp_path)
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for name, mask in single["masks"].items():  # rank 1 pruned other weights; DDP gave it rank 0's
        assert torch.equal(ranks[0]["masks"][name], mask) and torch.equal(ranks[1]["masks"][name], mask), name
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name  # DDP kept the processes in lockstep
    for result in ranks:
        assert result["sparsity"] == pytest.approx(0.5, abs=1e-12) and result["changed"] == []
        assert result["tokens"] == single["tokens"]  # batch 4 is the global batch: 2 windows per process
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4)
        assert result["perplexity"] == pytest.approx(single["perplexity"], rel=1e-4)  # windows split, gathered
    assert ranks[0]["perplexity"] == ranks[1]["perplexity"]


def test_iterative_under_accelerate_launch_logs_and_saves_once(tmp_path, tiny_model_dir, corpus_dir,
                                                                reference_iterative_run):
    import mlflow

    from pipeline.checkpoint import load_checkpoint

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = ["iterative", "--model", str(tiny_model_dir), "--dataset", f"text:{corpus_dir}", "--target-sparsity",
            "0.488", "--prune-percentage", "0.2", "--epochs-per-iteration", "1", "--max-steps", "6", "--batch-size",
            "4", "--lr", "2e-3", "--seqlen", "64", "--device", "cpu", "--log-every", "2", "--prune-method",
            "sparsegpt", "--nsamples", "8"]  # run_iterative_cli's job
    single = reference_iterative_run
    launched = run(accelerate_launch("-m", "pipeline", *args, "--output-dir", "ddp", "--experiment", "ddp"),
                   tmp_path, env)
    assert launched.count("Iterative pruning complete") == 1  # only the main process prints
    assert final_perplexity(launched) == pytest.approx(final_perplexity(single), rel=1e-3)
    assert load_checkpoint(tmp_path / "ddp")["iteration"] == 3
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["ddp"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.final_sparsity"] == pytest.approx(final_sparsity(single), abs=1e-4)
