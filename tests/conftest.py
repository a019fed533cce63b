"""Shared fixtures: real tiny models and corpora made here, a real MLflow store in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["PIPELINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("pipeline-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable in CI; fail fast, never retry
    # the outage tests stop a server on purpose: each call to it should fail at once, not after backoff
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # each xdist worker its share of the cores, and so the processes its tests start: OpenMP threads beyond the
    # cores spin against each other (measured: the grid tests 1.6x slower with 2 workers of 2 threads on 2 cores)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    yield


@pytest.fixture(autouse=True)
def _no_mlflow_run_state_between_tests():
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID into os.environ; a later test's store (or its
    `mlflow run` subprocess) must not inherit an experiment id from another store."""
    yield
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        os.environ.pop(name, None)


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store; the test runs in its own working directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A text:PATH directory cut from the pydocs corpus (train/validation/test)."""
    from pipeline.caching import cache_dir
    from pipeline.pydocs import build_pydocs_splits

    splits = build_pydocs_splits(cache_dir())  # parsed once; the suite's other processes read the cache
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(splits["train"][:120_000], encoding="utf-8")
    (root / "validation.txt").write_text(splits["validation"][:20_000], encoding="utf-8")
    (root / "test.txt").write_text(splits["test"][:20_000], encoding="utf-8")
    return root


def make_tiny_opt(
    directory: Path, text: str, *, hidden=64, layers=2, ffn=128, heads=2, positions=128, vocab=400, seed=0
) -> Path:
    """A randomly initialised OPT with a BPE tokenizer trained on `text`, saved with save_pretrained."""
    from pipeline.tools.pretrain import PretrainConfig, build_model, train_tokenizer

    tokenizer = train_tokenizer(text, vocab)
    config = PretrainConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        ffn_dim=ffn,
        max_positions=positions,
        seed=seed,
    )
    model = build_model(config, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_dir) -> Path:
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    return make_tiny_opt(tmp_path_factory.mktemp("tiny-opt"), text)


@pytest.fixture(scope="session")
def _shared_mlflow_server(tmp_path_factory):
    from pipeline.local_server import LocalMlflowServer

    with LocalMlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture()
def mlflow_server(_shared_mlflow_server):
    """A real `mlflow server` on 127.0.0.1 that a test may stop and start again (started once per session;
    a test that stopped it gets it back for the next)."""
    if not _shared_mlflow_server.running:
        _shared_mlflow_server.start()
    yield _shared_mlflow_server


@pytest.fixture(scope="session")
def reference_iterative_run(tmp_path_factory, tiny_model_dir, corpus_dir) -> str:
    """The output of one uninterrupted imp_jobs job: what killed, resumed, launched and tracking-outage runs
    of the same job are compared with."""
    from imp_jobs import finished_output, run_iterative_cli

    # made once for all of a run's xdist workers (their common temp root), as pytest-xdist's docs do it: the
    # first worker to ask runs the job, the others wait on the lock and read its output
    shared = tmp_path_factory.getbasetemp().parent
    with FileLock(shared / "reference-imp.lock"):
        output = shared / "reference-imp.txt"
        if not output.exists():
            workdir = tmp_path_factory.mktemp("reference-imp")
            env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
            run = run_iterative_cli(workdir, tiny_model_dir, corpus_dir, "--output-dir", "ref", env=env)
            output.write_text(finished_output(run))
        return output.read_text()
