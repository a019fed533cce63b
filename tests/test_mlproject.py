"""The MLproject entry points run for real under `mlflow run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mlflow_run_evaluate_entry_point(tmp_path, corpus_dir):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    result = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "evaluate",
                             "--env-manager", "local", "--experiment-name", "projects",
                             "-P", f"dataset=text:{corpus_dir}", "-P", "device=cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = float(result.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["projects"])
    assert len(runs) == 1  # the injected run was used, no second run created
    assert runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.perplexity"] == pytest.approx(printed, rel=1e-6)
    assert runs.iloc[0]["tags.model"] == "opt-tiny"
