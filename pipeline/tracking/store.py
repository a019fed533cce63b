"""Where runs go: the tracking store and its experiments, and the finished runs of a comparison grid."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import subprocess
from functools import cache
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..distributed import is_main_process
from ..errors import ConfigError, UserError
from ..outputs import process_alive

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # never the deprecated ./mlruns file store
# MLflow's REST client retries a dead server 7 times with doubling waits (minutes); we want a start to
# fail fast and a mid-run outage to cost seconds, and do our own retrying (MLflowTracker.RETRY_SECONDS).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a plain `sqlite:///path` URI (not of a `file:...?mode=ro` one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if path.startswith("file:") or "?" in path or path == ":memory:" else Path(path)


@cache
def _create_store_once(uri: str) -> None:
    """Creates a new sqlite store under a file lock beside it: MLflow's schema creation is not safe for two
    processes at once (one fails with "duplicate column name" or "table already exists")."""
    path = sqlite_path(uri)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the tables


def use_tracking_store() -> None:
    """Points MLflow at our store (created once, under a lock), with its INFO lines (creating tables,
    creating the experiment) silenced: they would drown the one line a user reads."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # it logs each SQLAlchemy error with a traceback, then raises it: we report the raised one, in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # its monitor warns at every sample it cannot send during an outage; the tracker's one warning says it all
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    _create_store_once(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())


def check_tracking_store() -> None:
    """Fails at once, in one line, when the store cannot be reached or used (before any work is done). Only
    the main process of a launch talks to MLflow."""
    if not is_main_process():
        return
    try:
        use_tracking_store()
        MlflowClient().search_experiments(max_results=1)
    except Exception as error:
        raise tracking_unreachable(error) from None


def under_mlflow_run() -> bool:
    """`mlflow run` injects a run through MLFLOW_RUN_ID; set_experiment would break it."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def use_experiment(name: str) -> None:
    """set_experiment, creating it with artifacts in `mlartifacts/` beside a sqlite store: MLflow's
    default would be `./mlruns`, the directory name of the deprecated file store."""
    if mlflow.get_experiment_by_name(name) is None:
        uri = tracking_uri()
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent run
            pass
    mlflow.set_experiment(name)


def experiment_id_named(name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        raise ConfigError(
            f"no MLflow experiment named '{name}' in {tracking_uri()}; `mlflow experiments search` lists them"
        )
    return experiment.experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain: MLflow wraps SQLAlchemy's, which wraps sqlite's, which says what is wrong."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def tracking_unreachable(error: Exception, uri: str | None = None) -> UserError:
    uri = uri or tracking_uri()
    cause = root_cause(error)
    first = (str(cause).strip().splitlines() or [""])[0][:200]
    remedy = "make the database and its directory writable" if uri.startswith("sqlite:") else "start the server"
    return UserError(
        f"MLflow tracking store {uri} is not usable ({type(cause).__name__}: {first}); {remedy} or "
        "set MLFLOW_TRACKING_URI to a usable store (default sqlite:///mlflow.db)"
    )


def experiment_identity(experiment_id: str) -> str:
    """`e<id>-<hash>`: the experiment's id and a hash of its creation time, which another store's experiment of
    the same id (another sqlite file, or the same file deleted and created anew) does not share. Whatever
    belongs to one store and experiment (a grid cell's checkpoints, its shared prunings) is named by it."""
    return _experiment_identity(mlflow.get_tracking_uri(), experiment_id)


@cache
def _experiment_identity(store: str, experiment_id: str) -> str:
    """Asked of the store once per process (a cell names three things by it)."""
    created = MlflowClient(store).get_experiment(experiment_id).creation_time
    return f"e{experiment_id}-{hashlib.sha256(f'{experiment_id}:{created}'.encode()).hexdigest()[:8]}"


def run_in_store(run_id: str) -> bool:
    """Whether this tracking store holds the run (a checkpoint made with another store names one it lacks)."""
    try:
        MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def finished_cell_runs(experiment_id: str, keys: set | None = None) -> dict:
    """cell_key -> the newest FINISHED run carrying it (the runs `compare` tagged), in newest-first order."""
    found = {}
    for run in MlflowClient().search_runs(
        [experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=5000
    ):
        key = run.data.tags.get("cell_key")
        if key and key not in found and (keys is None or key in keys):
            found[key] = run
    return found


OWNER_TAGS = ("pipeline.host", "pipeline.pid")  # the process that opened a run: `tracked_run` sets them


def mark_orphaned_runs(experiment_id: str) -> list:
    """Runs of this experiment left RUNNING by a process of this machine that no longer exists (SIGKILL, a
    crash) are marked KILLED, so the UI tells them from live ones; a run of another machine is left as it
    is, since its owner cannot be seen from here. Returns their ids."""
    client, host, orphaned = MlflowClient(), socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        pid = tags.get("pipeline.pid", "")
        if tags.get("pipeline.host") == host and pid.isdigit() and not process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            orphaned.append(run.info.run_id)
    if orphaned:
        print(
            f"note: {len(orphaned)} run(s) left RUNNING by processes that no longer exist marked KILLED: "
            f"{', '.join(orphaned)}"
        )
    return orphaned
