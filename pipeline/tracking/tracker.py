"""What a run records, and how: one small metric-tracker interface (torchtune style) with batched sends,
and `tracked_run`, which opens a run (or adopts the one `mlflow run` injected) and always closes it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .. import __version__
from ..config import DEFAULT_EXPERIMENT
from ..distributed import is_main_process
from .journal import (
    Journal,
    is_outage,
    journal_path,
    log_input,
    log_model,
    logged_model_id,
    metric_entries,
    register_model,
)
from .store import (
    OWNER_TAGS,
    git_commit,
    tracking_unreachable,
    tracking_uri,
    under_mlflow_run,
    use_experiment,
    use_tracking_store,
)

FLUSH_EVERY = 200  # metrics buffered per log_batch call; MLflow's batch limit is 1000
PENDING_DIR = "mlflow-pending"  # journal directory of commands that have no output directory


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _strings(values: dict) -> dict:
    return {k: _param_value(v) for k, v in values.items() if v is not None}


class MLflowTracker:
    """log_dict buffers, flush sends one log_batch.

    A tracking outage never stops the work: what could not be sent goes to a local journal
    (`journal.py`) and is retried at the next flush, at most every RETRY_SECONDS.
    """

    RETRY_SECONDS = 30.0

    def __init__(self, run_id: str, journal_dir: str | Path | None = None, store_uri: str | None = None):
        self.client = MlflowClient(store_uri)
        self.run_id = run_id
        self._buffer = []  # (Metric, the name of the LoggedModel it belongs to or None)
        self.models = {}  # name -> id of the LoggedModels this run has made
        self.journal = Journal(journal_path(journal_dir or PENDING_DIR, run_id), run_id, store_uri or tracking_uri())
        self._retry_at = 0.0

    def _deliver(self, send, entries: list, force: bool = False) -> bool:
        """send() unless the server is known to be down; on an outage journals `entries`. True if sent."""
        if time.monotonic() < self._retry_at and not force:
            self.journal.append(entries)
            return False
        try:
            if self.journal.exists():  # older undelivered entries first, so the run's history stays in order
                self.journal.replay(self.client)
            send()
            return True
        except Exception as error:
            if not is_outage(error):
                raise
            if self._retry_at == 0.0:
                print(
                    f"warning: MLflow tracking store {tracking_uri()} is unreachable; training goes on, "
                    f"tracking calls are kept in {self.journal.path} and retried",
                    flush=True,
                )
            self._retry_at = time.monotonic() + self.RETRY_SECONDS
            self.journal.append(entries)
            return False

    def log_dict(self, metrics: dict, step: int = 0, model: str | None = None, dataset: tuple = (None, None)) -> None:
        """Buffers the metrics at `step`; `model` (a LoggedModel's name) and `dataset` ((name, digest) of the
        data they measure) link them to that model, as MLflow's Models tab shows it."""
        now = int(time.time() * 1000)
        model_id = self.models.get(model) if model else None
        self._buffer += [
            (Metric(key, float(value), now, int(step), model_id, *(dataset if model else (None, None))), model)
            for key, value in metrics.items()
        ]
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def log_params(self, params: dict) -> None:
        values = {k: _param_value(v) for k, v in params.items()}
        items = [Param(k, v) for k, v in values.items()]

        def send():
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])

        self._deliver(send, [{"kind": "params", "params": values}])

    def set_tags(self, tags: dict) -> None:
        values = {k: str(v) for k, v in tags.items() if v is not None}
        self._deliver(
            lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()]),
            [{"kind": "tags", "tags": values}],
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._deliver(
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
            [{"kind": "artifacts", "path": str(Path(path).resolve()), "artifact_path": artifact_path}],
        )

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._deliver(
            lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_path),
            [{"kind": "artifacts", "path": str(Path(directory).resolve()), "artifact_path": artifact_path}],
        )

    def log_input(self, name: str, digest: str, source_type: str, source: str, context: str, profile: dict) -> None:
        """A dataset the run read (the UI's Datasets column): context is training, evaluation or calibration."""
        entry = {
            "kind": "input",
            "name": name,
            "digest": digest,
            "source_type": source_type,
            "source": source,
            "context": context,
            "profile": profile,
        }
        self._deliver(lambda: log_input(self.client, self.run_id, entry), [entry])

    def _linked(self, metric: Metric, model: str | None) -> Metric:
        """The metric with its model's id, looked up once where the model was made by a journal's replay."""
        if model is None or metric.model_id is not None:
            return metric
        if model not in self.models:
            self.models[model] = logged_model_id(self.client, self.run_id, model)
        dataset = metric.dataset_name, metric.dataset_digest
        return Metric(metric.key, metric.value, metric.timestamp, metric.step, self.models[model], *dataset)

    def log_model(self, name: str, params: dict, tags: dict) -> None:
        """A LoggedModel of the run, `name` unique within it (a model already logged under it is not logged
        again); metrics logged with `model=name` afterwards link to it. During an outage it is journaled, and
        its metrics link to it when the journal is replayed."""
        entry = {"kind": "model", "name": name, "params": _strings(params), "tags": _strings(tags)}
        self.flush()  # metrics logged before belong to no model

        def send():
            self.models[name] = log_model(self.client, self.run_id, entry)

        self._deliver(send, [entry])

    def register_model(self, name: str, artifact_path: str, tags: dict) -> None:
        """Registers the run's `artifact_path` as a new version of model `name`, tagged (sparsity, perplexity)."""
        entry = {"kind": "register", "name": name, "artifact_path": artifact_path, "tags": tags}
        self._deliver(lambda: register_model(self.client, self.run_id, entry), [entry])

    def log_model_dir(self, directory: str | Path, register_as: str | None = None, tags: dict | None = None) -> None:
        """A saved model directory as the run's `model` artifact, and (register_as) a new version of that
        registered model."""
        self.log_artifacts(directory, "model")
        if register_as:
            self.register_model(register_as, "model", tags or {})

    def logged_steps(self, key: str) -> set:
        """Steps of `key` already in the run: what a resumed run must not log again."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_text(self, text: str, artifact_file: str) -> None:
        self._deliver(
            lambda: self.client.log_text(self.run_id, text, artifact_file),
            [{"kind": "text", "text": text, "artifact_file": artifact_file}],
        )

    def log_dict_artifact(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2), artifact_file)

    def flush(self, force: bool = False) -> None:
        """Sends the buffered metrics (and any journaled backlog); `force` retries even inside the backoff."""
        if not self._buffer and not self.journal.exists():
            return
        pending, self._buffer = self._buffer, []

        def send():
            metrics = [self._linked(metric, model) for metric, model in pending]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

        self._deliver(send, metric_entries(pending), force)

    def close(self) -> None:
        self.flush(force=True)


class NullTracker:
    """What the non-main processes of a multi-process launch log through: nothing."""

    run_id = None

    def log_dict(self, metrics: dict, step: int = 0, model=None, dataset=(None, None)) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path, artifact_path=None) -> None: ...
    def log_artifacts(self, directory, artifact_path=None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict_artifact(self, data: dict, artifact_file: str) -> None: ...
    def log_input(self, **fields) -> None: ...
    def register_model(self, name: str, artifact_path: str, tags: dict) -> None: ...
    def log_model(self, name: str, params: dict, tags: dict) -> None: ...
    def log_model_dir(self, directory, register_as=None, tags=None) -> None: ...
    def flush(self, force: bool = False) -> None: ...
    def close(self) -> None: ...

    def logged_steps(self, key: str) -> set:
        return set()


def _open_run(run_name: str, experiment: str | None, resume_run_id: str | None, system_metrics: bool):
    parent = mlflow.active_run()
    monitor = {"log_system_metrics": system_metrics}
    if parent is not None and resume_run_id is None:  # a grid cell inside `compare`: a child run
        return mlflow.start_run(run_name=run_name, nested=True, experiment_id=parent.info.experiment_id, **monitor)
    if under_mlflow_run():
        return mlflow.start_run(**monitor)
    if resume_run_id:
        return mlflow.start_run(run_id=resume_run_id, nested=parent is not None, **monitor)
    use_experiment(experiment or DEFAULT_EXPERIMENT)
    return mlflow.start_run(run_name=run_name, **monitor)


def _log_a_system_sample_if_none(client: MlflowClient, run_id: str) -> None:
    """MLflow's monitor logs its first sample one sampling interval (10 s by default) after the run
    starts, so a shorter run would show no System metrics at all: give it one, taken at its end."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if any(key.startswith("system/") for key in client.get_run(run_id).data.metrics):
        return
    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri())
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()


def _end_run(run, tracker: MLflowTracker, status: str, system_metrics: bool) -> None:
    try:
        tracker.close()
    finally:
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
            try:
                mlflow.end_run(status)  # pops the run first, so a failure here leaves no active run
            except Exception as error:
                if not is_outage(error):
                    raise
                tracker.journal.append([{"kind": "status", "status": status, "end_time": int(time.time() * 1000)}])
            else:
                if system_metrics:  # after end_run: MLflow's monitor has stopped and flushed by then
                    with contextlib.suppress(Exception):  # a missing sample is not worth failing a finished run
                        _log_a_system_sample_if_none(tracker.client, run.info.run_id)
        if tracker.journal.exists():
            print(
                f"MLflow tracking store {tracking_uri()} is still unreachable: this run's remaining "
                f"tracking calls are kept in {tracker.journal.path}; when it is back, run "
                f"`python -m pipeline sync {tracker.journal.path}`",
                flush=True,
            )


@contextlib.contextmanager
def tracked_run(
    run_name: str,
    params: dict,
    tags: dict,
    experiment: str | None = None,
    resume_run_id: str | None = None,
    journal_dir: str | Path | None = None,
    system_metrics: bool = False,
):
    """Starts (or, under `mlflow run`, adopts) a run; ends it FINISHED, FAILED or KILLED.

    Inside another active run (a `compare` grid) the run is its child. `resume_run_id` reopens an
    earlier run (a resumed IMP run keeps one history), whatever its status: a run left RUNNING by a
    SIGKILL is taken over, not duplicated. What the tracking server cannot take mid-run is journaled
    in `journal_dir` (see journal.py), the run's status included. `system_metrics`: MLflow's monitor
    samples CPU, memory (and GPU) use into the run's System metrics while it lasts.
    """
    if not is_main_process():
        yield NullTracker()
        return
    try:
        use_tracking_store()
        adopted = under_mlflow_run() or resume_run_id is not None
        run = _open_run(run_name, experiment, resume_run_id, system_metrics)
        tracker = MLflowTracker(run.info.run_id, journal_dir)
        owner = dict(zip(OWNER_TAGS, (socket.gethostname(), os.getpid())))  # who to ask whether it still runs
        tracker.set_tags(
            {"mlflow.runName": run_name, "pipeline_version": __version__, "git_commit": git_commit(), **owner, **tags}
        )
        if adopted:  # `mlflow run` logged its entry-point parameters; a resumed run logged its own
            logged = set(tracker.client.get_run(tracker.run_id).data.params)
            tracker.log_params({k: v for k, v in params.items() if k not in logged})
        else:
            tracker.log_params(params)
    except Exception as error:  # an unreachable server or a broken store must stop us before any work
        raise tracking_unreachable(error) from None
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as error:
        tracker.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        raise
    finally:
        _end_run(run, tracker, status, system_metrics)
