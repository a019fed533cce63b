"""The small IMP job that the kill, resume, outage and multi-process tests run as a subprocess, and how to read
its console summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PER_ITERATION = ("sparsity", "ppl_after_prune", "ppl_after_train", "recovery_pct", "train_loss", "iteration_seconds")


# 3 iterations: 20%, 36%, 48.8% (= 1 - 0.8^3)
def iterative_args(model_dir, corpus_dir, *extra) -> list:
    """The command's words after `python -m pipeline` (for tests/test_bad_input.here, in this process)."""
    return [
        "iterative",
        "--model",
        str(model_dir),
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
        "--experiment",
        "imp",
        "--log-every",
        "2",
        "--prune-method",
        "sparsegpt",
        "--nsamples",
        "8",
        *extra,
    ]  # SparseGPT: kills can land in pruning


def run_iterative_cli(workdir: Path, model_dir, corpus_dir, *extra, env=None, unset=(), **popen):
    args = [sys.executable, "-m", "pipeline", *iterative_args(model_dir, corpus_dir, *extra)]
    full_env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k not in unset}
    return subprocess.Popen(
        args, cwd=workdir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finished_output(process) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def final_perplexity(output: str) -> float:
    return float(output.split("Final perplexity:")[1].split()[0])


def final_sparsity(output: str) -> float:
    """At least the target: SparseGPT also zeroes the columns of inputs the calibration never activates."""
    return float(output.split("Final sparsity:")[1].split()[0].rstrip("%")) / 100
