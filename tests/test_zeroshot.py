"""Zero-shot accuracy through lm-evaluation-harness, and MLflow's own features for what a run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_bad_input import here

from pipeline.settings import build

TASKS_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "tasks"


def cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env
    )


def test_pydocs_cloze_is_built_as_documented():
    sys.path.insert(0, str(TASKS_DIR))
    try:
        import cloze
    finally:
        sys.path.remove(str(TASKS_DIR))
    items = cloze.build()["test"]
    passages = cloze.passages()
    assert len(items) == len(passages) > 200
    assert items[0] == cloze.build()["test"][0]  # a fixed seed: the same task everywhere
    for item, (_, context, continuation) in zip(items, passages):
        assert item["context"] == context and item["choices"][item["label"]] == continuation
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert len(context.split()) == cloze.CONTEXT_WORDS and len(continuation.split()) == cloze.CONTINUATION_WORDS
    others = {continuation: document for document, _, continuation in passages}
    for item, (document, _, _) in zip(items, passages):  # the distractors come from other documents
        assert all(others[c] != document for i, c in enumerate(item["choices"]) if i != item["label"])
    labels = [item["label"] for item in items]
    assert all(0.15 < labels.count(i) / len(labels) < 0.35 for i in range(4))  # chance is 25%


def test_our_evaluate_and_the_harness_cli_give_the_same_accuracy(mlflow_store, tmp_path):
    """On the embedded model: the test's random tiny OPT has a 400-token vocabulary and 128 positions, too few
    for some continuations."""
    from pipeline.config import EvaluateConfig
    from pipeline.jobs.evaluate import run_evaluate
    from pipeline.models import resolve_model_source

    model_dir = resolve_model_source("opt-tiny")
    run_evaluate(
        build(
            EvaluateConfig,
            {"model": "opt-tiny", "device": "cpu", "experiment": "tasks", "tasks": ["pydocs-cloze"], "limit": 60},
        )
    )
    run = mlflow.search_runs(experiment_names=["tasks"]).iloc[0]
    ours = run["metrics.task/pydocs-cloze/acc"]
    assert (
        0 <= ours <= 1 and "metrics.task/pydocs-cloze/acc_norm" in run and "metrics.task/pydocs-cloze/acc_stderr" in run
    )
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{run['run_id']}/lm_eval_results.json"))
    assert saved["results"]["pydocs-cloze"]["acc,none"] == pytest.approx(ours)
    done = subprocess.run(
        [
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir},dtype=float32",
            "--tasks",
            "pydocs-cloze",
            "--include_path",
            str(TASKS_DIR),
            "--limit",
            "60",
            "--batch_size",
            "8",
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "harness"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next((tmp_path / "harness").rglob("results*.json")).read_text())
    assert result["results"]["pydocs-cloze"]["acc,none"] == pytest.approx(ours, abs=1e-12)


def test_opt_tiny_is_well_above_chance_on_pydocs_cloze():
    from loading import load_model_and_tokenizer

    from pipeline.config import TasksConfig
    from pipeline.zeroshot import run_tasks, task_metrics

    model, tokenizer = load_model_and_tokenizer("opt-tiny")
    metrics = task_metrics(run_tasks(model, tokenizer, TasksConfig(tasks=["pydocs-cloze"], tasks_batch_size=16), 256))
    assert metrics["task/pydocs-cloze/acc"] > 0.33  # chance: 0.25; 0.33 is chance + 3 standard errors (293 items)


def test_iterative_logs_the_tasks_once_per_iteration(mlflow_store, tiny_model_dir, corpus_dir, tmp_path):
    from pipeline.api import iterative_training_wrapper

    iterative_training_wrapper(
        {
            "model_name": str(tiny_model_dir),
            "dataset": f"text:{corpus_dir}",
            "target_sparsity": 0.36,
            "prune_percentage": 0.2,
            "epochs_per_iteration": 1,
            "batch_size": 4,
            "lr": 1e-3,
            "train_steps": 2,
            "seqlen": 64,
            "save_model": False,
            "experiment": "iterative-tasks",
            "eval_tasks": ["pydocs-cloze"],
            "limit": 12,
            "output_dir": str(tmp_path / "run"),
        }
    )
    run_id = mlflow.search_runs(experiment_names=["iterative-tasks"]).iloc[0]["run_id"]
    history = MlflowClient().get_metric_history(run_id, "task/pydocs-cloze/acc")
    assert sorted(m.step for m in history) == [0, 1, 2]  # the dense model, then one point per iteration
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "lm_eval")}
    assert artifacts == {f"lm_eval/iteration-{k}.json" for k in range(3)}


def test_a_run_records_its_dataset_system_metrics_and_registered_model(
    mlflow_store, tiny_model_dir, corpus_dir, monkeypatch
):
    from pipeline.config import TrainRunConfig
    from pipeline.data import load_corpus
    from pipeline.jobs.train import run_train

    # the run is shorter than one interval: its one sample is the one taken at its end
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    result = run_train(
        build(
            TrainRunConfig,
            {
                "model": str(tiny_model_dir),
                "dataset": f"text:{corpus_dir}",
                "device": "cpu",
                "seqlen": 64,
                "batch_size": 4,
                "max_steps": 30,
                "epochs": 2,
                "lr": 1e-3,
                "experiment": "features",
                "register_model": "tiny-sparse",
                "output_dir": "trained",
            },
        )
    )
    client = MlflowClient()
    run = client.get_run(mlflow.search_runs(experiment_names=["features"]).iloc[0]["run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    corpus = load_corpus(f"text:{corpus_dir}")
    assert set(inputs) == {"training", "evaluation"}
    assert inputs["training"].name == inputs["evaluation"].name == f"text:{corpus_dir}"
    assert json.loads(inputs["training"].profile)["corpus_digest"] == corpus.digest[:16]
    assert json.loads(inputs["evaluation"].profile)["split"] == "validation"
    assert json.loads(inputs["training"].profile)["tokens"] > 0
    assert any(key.startswith("system/cpu_utilization_percentage") for key in run.data.metrics)
    assert any(key.startswith("system/system_memory_usage") for key in run.data.metrics)
    version = client.search_model_versions("name = 'tiny-sparse'")[0]
    assert version.run_id == run.info.run_id and version.source == f"runs:/{run.info.run_id}/model"
    assert float(version.tags["perplexity"]) == pytest.approx(result["perplexity"])
    assert float(version.tags["sparsity"]) == pytest.approx(result["sparsity"])
    # the README's way back to the model: the registry's URI, downloaded, loaded by transformers
    from transformers import AutoModelForCausalLM

    local = mlflow.artifacts.download_artifacts("models:/tiny-sparse/1")
    registered = AutoModelForCausalLM.from_pretrained(local)
    saved = AutoModelForCausalLM.from_pretrained("trained")
    for (name, a), (_, b) in zip(registered.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_no_system_metrics_when_asked(mlflow_store, tiny_model_dir, monkeypatch):
    from pipeline.config import EvaluateConfig
    from pipeline.jobs.evaluate import run_evaluate

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    run_evaluate(
        build(
            EvaluateConfig,
            {
                "model": str(tiny_model_dir),
                "device": "cpu",
                "seqlen": 64,
                "experiment": "quiet",
                "system_metrics": False,
            },
        )
    )
    metrics = mlflow.search_runs(experiment_names=["quiet"]).columns
    assert not any(column.startswith("metrics.system/") for column in metrics)


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--tasks", "piqa"], 1, "the data of --tasks piqa could not be loaded"),
        (["--tasks", "no-such-task"], 2, "unknown --tasks no-such-task"),
    ],
)
def test_tasks_that_cannot_run_are_one_line(tmp_path, tiny_model_dir, args, code, fragment):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    result = here("evaluate", "--model", str(tiny_model_dir), "--device", "cpu", *args, cwd=tmp_path, env=env)
    assert result.returncode == code, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stdout + result.stderr
