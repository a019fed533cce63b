"""Everything MLflow, in one module: where runs go, what a run records, and a batched metric logger."""

from __future__ import annotations

import contextlib
import contextvars
import os
import subprocess
import time
from pathlib import Path

from . import __version__

DEFAULT_EXPERIMENT = "llm-pruning"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # never the deprecated ./mlruns file store
FLUSH_EVERY = 200  # metrics buffered per log_batch call; MLflow's batch limit is 1000
PENDING_DIR = "mlflow-pending"  # journal directory of commands that have no output directory
# MLflow's REST client retries a dead server 7 times with doubling waits (minutes); we want a start to
# fail fast and a mid-run outage to cost seconds, and do our own retrying (MLflowLogger.RETRY_SECONDS).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


# Tags every run started inside `run_tags(...)` gets: how `compare` marks the runs of its grid cells
# without threading a parameter through every command.
_EXTRA_TAGS: contextvars.ContextVar = contextvars.ContextVar("pipeline_run_tags", default={})


@contextlib.contextmanager
def run_tags(tags: dict):
    token = _EXTRA_TAGS.set({**_EXTRA_TAGS.get(), **tags})
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_tracking_store() -> None:
    """Points MLflow at our store, with its INFO lines (creating tables, creating the experiment)
    silenced: they would drown the one line a user reads."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(tracking_uri())


def under_mlflow_run() -> bool:
    """`mlflow run` injects a run through MLFLOW_RUN_ID; set_experiment would break it."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class MLflowLogger:
    """The one metric-logger interface (torchtune style): log_dict buffers, flush sends one log_batch.

    A tracking outage never stops the work: what could not be sent goes to a local journal
    (`journal.py`) and is retried at the next flush, at most every RETRY_SECONDS.
    """

    RETRY_SECONDS = 30.0

    def __init__(self, run_id: str, journal_dir: str | Path | None = None, store_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        from .journal import Journal, journal_path

        self.client = MlflowClient(store_uri)
        self.run_id = run_id
        self._buffer = []
        self.journal = Journal(journal_path(journal_dir or PENDING_DIR, run_id), run_id, store_uri or tracking_uri())
        self._retry_at = 0.0

    def _deliver(self, send, entries: list, force: bool = False) -> bool:
        """send() unless the server is known to be down; on an outage journals `entries`. True if sent."""
        from .journal import is_outage

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
                print(f"warning: MLflow tracking store {tracking_uri()} is unreachable; training goes on, "
                      f"tracking calls are kept in {self.journal.path} and retried", flush=True)
            self._retry_at = time.monotonic() + self.RETRY_SECONDS
            self.journal.append(entries)
            return False

    def log_dict(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        values = {k: _param_value(v) for k, v in params.items()}
        items = [Param(k, v) for k, v in values.items()]

        def send():
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start:start + 100])
        self._deliver(send, [{"kind": "params", "params": values}])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        values = {k: str(v) for k, v in tags.items() if v is not None}
        self._deliver(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()]),
                      [{"kind": "tags", "tags": values}])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._deliver(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
                      [{"kind": "artifacts", "path": str(Path(path).resolve()), "artifact_path": artifact_path}])

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._deliver(lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_path),
                      [{"kind": "artifacts", "path": str(Path(directory).resolve()), "artifact_path": artifact_path}])

    def logged_steps(self, key: str) -> set:
        """Steps of `key` already in the run: what a resumed run must not log again."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_text(self, text: str, artifact_file: str) -> None:
        self._deliver(lambda: self.client.log_text(self.run_id, text, artifact_file),
                      [{"kind": "text", "text": text, "artifact_file": artifact_file}])

    def log_dict_artifact(self, data: dict, artifact_file: str) -> None:
        import json

        self.log_text(json.dumps(data, indent=2), artifact_file)

    def flush(self, force: bool = False) -> None:
        """Sends the buffered metrics (and any journaled backlog); `force` retries even inside the backoff."""
        from .journal import metric_entries

        if not self._buffer and not self.journal.exists():
            return
        pending, self._buffer = self._buffer, []

        def send():
            for start in range(0, len(pending), 1000):
                self.client.log_batch(self.run_id, metrics=pending[start:start + 1000])
        self._deliver(send, metric_entries(pending), force)

    def close(self) -> None:
        self.flush(force=True)


class NullLogger:
    """What the non-main processes of a multi-process launch log through: nothing."""

    run_id = None

    def log_dict(self, metrics: dict, step: int = 0) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path, artifact_path=None) -> None: ...
    def log_artifacts(self, directory, artifact_path=None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict_artifact(self, data: dict, artifact_file: str) -> None: ...
    def flush(self, force: bool = False) -> None: ...
    def close(self) -> None: ...

    def logged_steps(self, key: str) -> set:
        return set()


def _use_experiment(name: str) -> None:
    """set_experiment, creating it with artifacts in `mlartifacts/` beside a sqlite store: MLflow's
    default would be `./mlruns`, the directory name of the deprecated file store."""
    import mlflow

    if mlflow.get_experiment_by_name(name) is None:
        uri = tracking_uri()
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent run
            pass
    mlflow.set_experiment(name)


def _logged_params(logger: "MLflowLogger") -> set:
    return set(logger.client.get_run(logger.run_id).data.params)


def tracking_unreachable(error: Exception, uri: str | None = None):
    from .errors import UserError

    return UserError(f"MLflow tracking store {uri or tracking_uri()} is not usable "
                     f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); start the server or "
                     "set MLFLOW_TRACKING_URI to a reachable store (default sqlite:///mlflow.db)")


@contextlib.contextmanager
def tracked_run(run_name: str, params: dict, tags: dict, experiment: str | None = None,
                resume_run_id: str | None = None, journal_dir: str | Path | None = None):
    """Starts (or, under `mlflow run`, adopts) a run; ends it FINISHED, FAILED or KILLED.

    `resume_run_id` reopens an earlier run (a resumed IMP run keeps one history), whatever its
    status: a run left RUNNING by a SIGKILL is taken over, not duplicated. What the tracking server
    cannot take mid-run is journaled in `journal_dir` (see journal.py), the run's status included.
    """
    import mlflow

    from .distributed import is_main_process
    from .journal import is_outage

    if not is_main_process():
        yield NullLogger()
        return
    use_tracking_store()
    try:
        parent = mlflow.active_run()
        adopted = under_mlflow_run() or resume_run_id is not None
        if parent is not None and resume_run_id is None:  # a grid cell inside `compare`: a child run
            run = mlflow.start_run(run_name=run_name, nested=True, experiment_id=parent.info.experiment_id)
        elif under_mlflow_run():
            run = mlflow.start_run()
        elif resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, nested=parent is not None)
        else:
            _use_experiment(experiment or DEFAULT_EXPERIMENT)
            run = mlflow.start_run(run_name=run_name)
        logger = MLflowLogger(run.info.run_id, journal_dir)
        logger.set_tags({"mlflow.runName": run_name, "pipeline_version": __version__,
                         "git_commit": git_commit(), **tags, **_EXTRA_TAGS.get()})
        if adopted:  # `mlflow run` logged its entry-point parameters; a resumed run logged its own
            logger.log_params({k: v for k, v in params.items() if k not in _logged_params(logger)})
        else:
            logger.log_params(params)
    except Exception as error:  # an unreachable server or a broken store must stop us before any work
        raise tracking_unreachable(error) from None
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as error:
        logger.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        raise
    finally:
        try:
            logger.close()
        finally:
            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
                try:
                    mlflow.end_run(status)  # pops the run first, so a failure here leaves no active run
                except Exception as error:
                    if not is_outage(error):
                        raise
                    logger.journal.append([{"kind": "status", "status": status,
                                            "end_time": int(time.time() * 1000)}])
            if logger.journal.exists():
                print(f"MLflow tracking store {tracking_uri()} is still unreachable: this run's remaining "
                      f"tracking calls are kept in {logger.journal.path}; when it is back, run "
                      f"`python -m pipeline sync {logger.journal.path}`", flush=True)
