"""Tracking outages (a real `mlflow server` stopped and restarted), kills mid-write, a full disk."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from imp_jobs import PER_ITERATION, final_perplexity, finished_output, run_iterative_cli

from pipeline.local_server import free_port


def test_unreachable_tracking_server_fails_fast_before_any_work(tmp_path, tiny_model_dir, corpus_dir):
    started = time.monotonic()
    # with the shipped retry settings (2 retries, backoff 1 s, timeout 20 s), not the suite's 0 retries
    process = run_iterative_cli(
        tmp_path,
        tiny_model_dir,
        corpus_dir,
        "--output-dir",
        "run",
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        unset=("MLFLOW_HTTP_REQUEST_MAX_RETRIES",),
    )
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow tracking store http://127.0.0.1:"), out
    assert "start the server" in lines[0]
    assert not (tmp_path / "run").exists()  # no work was done
    # ours back off about 3 s in all, MLflow's own (7 retries, factor 2) over 4 minutes; the rest is starting
    # Python and torch, 10 s here and 20 s on a machine that runs 14 tests at once
    assert time.monotonic() - started < 60


def test_cells_logging_one_new_dataset_at_once_all_link_it(mlflow_server):
    """Parallel cells read the same evaluation text: each logs it as an input in the same instant. The server
    checks for the dataset, then inserts it, so all but one insert collide; each run still gets its input."""
    import threading

    from mlflow.tracking import MlflowClient

    from pipeline.tracking.journal import log_input

    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"dataset-race-{time.time_ns()}")
    errors = []
    for trial in range(20):  # a collision needs two inserts in one window: about one trial in three has one
        runs = [client.create_run(experiment).info.run_id for _ in range(8)]
        entry = dict(name=f"text-{trial}", digest=f"{trial:016x}", source_type="local", source="/corpus")
        entry.update(context="evaluation", profile={"split": "test"})
        together = threading.Barrier(len(runs))

        def log(run_id, entry=entry, together=together):
            together.wait()
            try:
                log_input(client, run_id, entry)
            except Exception as error:  # collected: an exception in a thread would not fail the test
                errors.append(error)

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        inputs = [client.get_run(run_id).inputs.dataset_inputs for run_id in runs]
        assert all(len(linked) == 1 and linked[0].dataset.name == f"text-{trial}" for linked in inputs)


def test_metrics_sent_during_an_outage_land_when_the_server_is_back(tmp_path, mlflow_server, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MLflowTracker, tracked_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(MLflowTracker, "RETRY_SECONDS", 1.0)
    with tracked_run("outage", {"lr": 0.1}, {}, "outage", journal_dir=tmp_path) as tracker:
        tracker.log_dict({"loss": 1.0}, step=1)
        tracker.flush()
        mlflow_server.stop()
        for step in range(2, 302):  # crosses FLUSH_EVERY: one flush fails mid-"training"
            tracker.log_dict({"loss": float(step)}, step=step)
        tracker.set_tags({"phase": "outage"})
        tracker.flush()
        assert tracker.journal.exists()
        assert "unreachable" in capsys.readouterr().out
        mlflow_server.start()
        time.sleep(1.0)  # past the retry delay: the next ordinary flush replays the journal
        tracker.log_dict({"loss": 302.0}, step=302)
        tracker.flush()
        assert not tracker.journal.exists()
        run_id = tracker.run_id
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 303)]
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "outage" and run.data.params["lr"] == "0.1"
    assert run.info.status == "FINISHED"


def test_iterative_outlives_the_tracking_server_and_sync_replays_the_rest(
    tmp_path, mlflow_server, tiny_model_dir, corpus_dir, reference_iterative_run, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint import load_checkpoint
    from pipeline.tracking.journal import sync_journals

    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    process = run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "run", env=env)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("Iteration 1:"):  # iteration 1 is in MLflow; the server dies for good
            mlflow_server.stop()
            break
    out = "".join(seen) + finished_output(process)
    assert "unreachable" in out and "pipeline sync" in out
    assert final_perplexity(out) == final_perplexity(reference_iterative_run)  # the outage changed nothing
    journals = list((tmp_path / "run").glob("mlflow-pending-*.jsonl"))
    assert len(journals) == 1
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint["iteration"] == 3

    mlflow_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert sync_journals([str(tmp_path / "run")], None) == 1  # the CLI's `sync` is this call (see test_bad_input)
    assert not journals[0].exists()
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(checkpoint["run_id"])
    assert run.info.status == "FINISHED"
    for key in PER_ITERATION:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        expected = [(h["iteration"], h[key]) for h in checkpoint["history"]]
        assert [s for s, _ in points] == [s for s, _ in expected], key  # none missing, none twice
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], nan_ok=True), key
    step_losses = [m.step for m in client.get_metric_history(run.info.run_id, "train_step_loss")]
    assert sorted(step_losses) == list(range(2, 19, 2))  # 3 iterations x 6 steps, logged every 2
    assert run.data.metrics["final_perplexity"] == pytest.approx(final_perplexity(out), abs=0.01)
    assert client.list_artifacts(run.info.run_id, "model")
    # the final model, journaled while the server was gone, is a LoggedModel with its metrics linked to it
    (model,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    linked = {m.key: m.value for m in model.metrics}
    assert model.name == "iterative-sparsegpt-s48p8-it3"  # an IMP run pruning with SparseGPT, as the grid names it
    assert linked["final_perplexity"] == run.data.metrics["final_perplexity"]


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint

    weights = {"w": torch.arange(6.0)}
    save_checkpoint(
        tmp_path, model_state=weights, masks={}, iteration=1, history=[{"iteration": 1}], config={}, run_id="r"
    )
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, torch; from pipeline.checkpoint import save_checkpoint; "
                "save_checkpoint(sys.argv[1], model_state={'w': torch.ones(100_000_000)}, masks={}, iteration=2, "
                "history=[], config={}, run_id='r')"
            ),
            str(tmp_path),
        ]
    )
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".checkpoint.pt.tmp*")):
        assert time.monotonic() < deadline and writer.poll() is None, "the writer never started writing"
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)  # mid-write of a 400 MB payload
    writer.wait(timeout=60)
    assert list(tmp_path.glob(".checkpoint.pt.tmp*"))  # the half-written file is there ...
    kept = load_checkpoint(tmp_path)
    assert kept["iteration"] == 1 and torch.equal(kept["model"]["w"], weights["w"])  # ... the checkpoint intact
    save_checkpoint(tmp_path, model_state=weights, masks={}, iteration=2, history=[], config={}, run_id="r")
    assert load_checkpoint(tmp_path)["iteration"] == 2
    assert not list(tmp_path.glob(".checkpoint.pt.tmp*"))  # the next write cleans up after the killed one


def test_kill_during_pruning_then_resume_equals_uninterrupted(
    tmp_path, tiny_model_dir, corpus_dir, reference_iterative_run
):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    process = run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "killed", env=env)
    for line in process.stdout:
        if "Iteration 2/3" in line:  # printed just before iteration 2's SparseGPT pass
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed = finished_output(
        run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "killed", "--resume", env=env)
    )
    assert "Resuming after iteration 1" in resumed
    assert final_perplexity(resumed) == final_perplexity(reference_iterative_run)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, corpus_dir):
    """ENOSPC, injected without mounting anything: the checkpoint's temp file of the run's process is made a
    link to /dev/full (every write to it fails with "No space left on device") once iteration 0 is saved."""
    from loading import load_model_and_tokenizer

    from pipeline.checkpoint import load_checkpoint

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))  # what iteration 0's checkpoint holds
    process = run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "run", env=env)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and process.poll() is None, "iteration 0 was never saved"
        time.sleep(0.01)
    (tmp_path / "run" / f".checkpoint.pt.tmp{process.pid}").symlink_to("/dev/full")
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 1, out
    assert "Traceback" not in out
    error = out.strip().splitlines()[-1]
    assert error.startswith("error: could not write run/checkpoint.pt (No space left on device)"), out
    assert "previous checkpoint is intact" in error and "--resume" in error
    kept = load_checkpoint(tmp_path / "run")
    assert kept["iteration"] == 0 and len(kept["history"]) == 1
    assert all(torch.equal(kept["model"][k], v) for k, v in model.state_dict().items())  # iteration 0: dense
    assert not list((tmp_path / "run").glob(".checkpoint.pt.tmp*"))  # the partial temp file is removed
