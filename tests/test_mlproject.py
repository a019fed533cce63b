"""The MLproject entry points run for real under `mlflow run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_OUTPUTS = (
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    "checkpoints",
    "pruned_models",
    "reports",
    ".git",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
)


@pytest.fixture()
def project(tmp_path) -> Path:
    """A copy of the project: `mlflow run` works in the project directory, and must not write into ours."""
    import shutil

    copy = tmp_path / "project"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(*RUN_OUTPUTS))
    return copy


def test_mlflow_run_evaluate_entry_point(tmp_path, corpus_dir, project):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(project),
            "-e",
            "evaluate",
            "--env-manager",
            "local",
            "--experiment-name",
            "projects",
            "-P",
            f"dataset=text:{corpus_dir}",
            "-P",
            "device=cpu",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = float(result.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["projects"])
    assert len(runs) == 1  # the injected run was used, no second run created
    assert runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.perplexity"] == pytest.approx(printed, rel=1e-6)
    assert runs.iloc[0]["tags.model"] == "opt-tiny"


def test_mlflow_run_compare_entry_point_builds_the_report(tmp_path, tiny_model_dir, corpus_dir, project):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    params = {
        "model": str(tiny_model_dir),
        "dataset": f"text:{corpus_dir}",
        "sparsities": "0.5",
        "prune_percentage": "0.4",
        "max_steps": "2",
        "batch_size": "4",
        "lr": "1e-3",
        "nsamples": "4",
        "epochs_per_iteration": "1",
        "device": "cpu",
    }
    args = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(project),
        "-e",
        "compare",
        "--env-manager",
        "local",
        "--experiment-name",
        "demo",
    ]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "report: reports/demo/report.md" in result.stdout
    report = (project / "reports" / "demo" / "report.md").read_text()  # `mlflow run` works in the project dir
    assert report.count("| ") > 5 and "Iterative" in report and "SparseGPT" in report
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["demo"])
    assert set(runs["status"]) == {"FINISHED"}
    # compare + dense + three one-shot + iterative and its three equal-budget controls + report
    assert len(runs) == 1 + 1 + 3 + 4 + 1
    assert runs["tags.mlflow.parentRunId"].notna().sum() == 9
    assert runs.loc[runs["tags.kind"] == "report", "artifact_uri"].size == 1
