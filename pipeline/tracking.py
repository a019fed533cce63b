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
    """The one metric-logger interface (torchtune style): log_dict buffers, flush sends one log_batch."""

    def __init__(self, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id = run_id
        self._buffer = []

    def log_dict(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def logged_steps(self, key: str) -> set:
        """Steps of `key` already in the run: what a resumed run must not log again."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict_artifact(self, data: dict, artifact_file: str) -> None:
        import json

        self.client.log_text(self.run_id, json.dumps(data, indent=2), artifact_file)

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def close(self) -> None:
        self.flush()


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


def _tracking_unreachable(error: Exception):
    from .errors import UserError

    return UserError(f"MLflow tracking store {tracking_uri()} is not usable "
                     f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); start the server or "
                     "set MLFLOW_TRACKING_URI to a reachable store (default sqlite:///mlflow.db)")


@contextlib.contextmanager
def tracked_run(run_name: str, params: dict, tags: dict, experiment: str | None = None,
                resume_run_id: str | None = None):
    """Starts (or, under `mlflow run`, adopts) a run; ends it FINISHED, FAILED or KILLED.

    `resume_run_id` reopens an earlier run (a resumed IMP run keeps one history), whatever its
    status: a run left RUNNING by a SIGKILL is taken over, not duplicated.
    """
    import mlflow

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
    except Exception as error:  # an unreachable server or a broken store must stop us before any work
        raise _tracking_unreachable(error) from None
    logger = MLflowLogger(run.info.run_id)
    status = "FAILED"
    try:
        logger.set_tags({"mlflow.runName": run_name, "pipeline_version": __version__,
                         "git_commit": git_commit(), **tags, **_EXTRA_TAGS.get()})
        if adopted:  # `mlflow run` logged its entry-point parameters; a resumed run logged its own
            logger.log_params({k: v for k, v in params.items() if k not in _logged_params(logger)})
        else:
            logger.log_params(params)
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
                mlflow.end_run(status)
