"""What the tracking server could not take yet: a local JSON-lines journal per run, and its replay.

A run lasts hours; an `mlflow server` restart must not stop it. When a call to the server fails with an
outage (connection refused, timeout, 5xx), the tracker appends what it was sending to
`mlflow-pending-<run_id>.jsonl` in the run's output directory and keeps training. Every later flush
first replays the journal, so the metrics land as soon as the server is back; if it never comes back
the file stays, and `python -m pipeline sync` replays it. Replay skips metric points the run already
has (same key and step), so replaying twice, or after a half-delivered batch, duplicates nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import ConfigError, UserError, option
from .store import tracking_unreachable, use_tracking_store

JOURNAL_PREFIX = "mlflow-pending-"
ENTRY_KINDS = ("metric", "params", "tags", "text", "artifacts", "status", "input", "register", "model")
MODEL_TAG = "pipeline.model"  # a LoggedModel's name within its run: what makes logging it again a no-op

# MLflow error codes that mean "try again later" rather than "this request is wrong".
_TRANSIENT_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "INTERNAL_ERROR",
    "REQUEST_LIMIT_EXCEEDED",
    "ABORTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
}


def is_outage(error: BaseException) -> bool:
    """True for a tracking store that is down or overloaded; False for a request it rejects."""
    if isinstance(error, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        # the REST client wraps connection failures (after its own retries) as "API request to ... failed"
        return error.error_code in _TRANSIENT_CODES or str(error).startswith("API request to")
    return False


def dataset_input(entry: dict) -> DatasetInput:
    """A run's input dataset, as the UI lists it: name, digest, source, and a profile (split, tokens)."""
    dataset = Dataset(
        entry["name"],
        entry["digest"],
        entry["source_type"],
        json.dumps({"uri": entry["source"]}),
        profile=json.dumps(entry["profile"]),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", entry["context"])])


_DUPLICATE_ROW = ("UNIQUE constraint failed", "Duplicate entry", "duplicate key value")  # sqlite, MySQL, PostgreSQL


def log_input(client, run_id: str, entry: dict) -> None:
    """Links the dataset entry describes to the run. Two runs logging one new dataset at once can both find it
    missing and both insert it (the store checks, then inserts): the loser's retry finds the row and links it."""
    try:
        client.log_inputs(run_id, [dataset_input(entry)])
    except MlflowException as error:
        if not any(collision in str(error) for collision in _DUPLICATE_ROW):
            raise
        client.log_inputs(run_id, [dataset_input(entry)])


def register_model(client, run_id: str, entry: dict) -> None:
    """A new version of registered model entry["name"], from the run's model artifact, with its tags."""
    try:
        client.create_registered_model(entry["name"])
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.create_model_version(
        entry["name"],
        f"runs:/{run_id}/{entry['artifact_path']}",
        run_id=run_id,
        tags={k: str(v) for k, v in entry["tags"].items()},
    )


def logged_model_id(client, run_id: str, name: str, experiment_id: str | None = None) -> str | None:
    """The id of the run's LoggedModel called `name`, or None."""
    experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND tags.`{MODEL_TAG}` = '{name}'", max_results=1
    )
    return found[0].model_id if found else None


def log_model(client, run_id: str, entry: dict) -> str:
    """The run's LoggedModel entry["name"] (params, tags; its weights where entry["tags"]["weights"] says), made
    READY; a model the run has already logged under that name is not logged again. Returns its id."""
    experiment_id = client.get_run(run_id).info.experiment_id
    existing = logged_model_id(client, run_id, entry["name"], experiment_id)
    if existing:
        return existing
    model = client.create_logged_model(
        experiment_id,
        name=entry["name"],
        source_run_id=run_id,
        tags={**entry["tags"], MODEL_TAG: entry["name"]},
        params=entry["params"],
        model_type="pruned causal LM",
    )
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def metric_entries(metrics: list) -> list:
    """Journal entries of (Metric, the name of the LoggedModel it belongs to or None) pairs."""
    return [
        {
            "kind": "metric",
            "key": m.key,
            "value": m.value,
            "timestamp": m.timestamp,
            "step": m.step,
            **({"model": model, "dataset": [m.dataset_name, m.dataset_digest]} if model else {}),
        }
        for m, model in metrics
    ]


def journal_path(directory: Path, run_id: str) -> Path:
    return Path(directory) / f"{JOURNAL_PREFIX}{run_id}.jsonl"


class Journal:
    """Append-only record of one run's undelivered tracking calls."""

    def __init__(self, path: Path, run_id: str, tracking_uri: str):
        self.path, self.run_id, self.tracking_uri = Path(path), run_id, tracking_uri

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, entries: list) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as handle:
            if new:
                handle.write(
                    json.dumps({"kind": "run", "run_id": self.run_id, "tracking_uri": self.tracking_uri}) + "\n"
                )
            for entry in entries:
                handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def replay(self, client) -> int:
        """Sends everything in the journal to `client`'s store, then deletes it; returns entries sent."""
        entries = read_journal(self.path)[1]
        send_entries(client, self.run_id, entries)
        self.path.unlink()
        return len(entries)


def read_journal(path: Path) -> tuple[dict, list]:
    """(header, entries); a line cut by a kill mid-write is the last one and is dropped. Anything this
    pipeline would not have written is a UserError naming the file and the line."""
    not_ours = f"{path} is not a tracking journal of this pipeline"
    header, entries = None, []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except UnicodeDecodeError:
        raise UserError(f"{not_ours} (it is not UTF-8 text)") from None
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror or error})") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise UserError(f"{not_ours} (line {number} is not JSON)") from None
        if not isinstance(record, dict) or record.get("kind") not in ("run", *ENTRY_KINDS):
            raise UserError(f"{not_ours} (line {number} is not an entry it writes)")
        if record["kind"] == "run":
            header = record
        else:
            entries.append(record)
    if header is None or not isinstance(header.get("run_id"), str):
        raise UserError(f"{not_ours} (no run header)")
    return header, entries


def send_entries(client, run_id: str, entries: list) -> None:
    """Replays journaled calls: the LoggedModels first (their metrics link to them by name), then the metrics the
    run does not hold yet, then the rest in order."""
    models = {e["name"]: log_model(client, run_id, e) for e in entries if e["kind"] == "model"}
    metrics = [e for e in entries if e["kind"] == "metric"]
    present = {}
    for key in {m["key"] for m in metrics}:
        present[key] = {m.step for m in client.get_metric_history(run_id, key)}

    def model_of(entry: dict) -> str | None:
        name = entry.get("model")
        return None if name is None else models.get(name) or logged_model_id(client, run_id, name)

    missing = [
        Metric(m["key"], m["value"], m["timestamp"], m["step"], model_of(m), *m.get("dataset", (None, None)))
        for m in metrics
        if m["step"] not in present[m["key"]]
    ]
    for start in range(0, len(missing), 1000):
        client.log_batch(run_id, metrics=missing[start : start + 1000])
    for entry in entries:
        kind = entry["kind"]
        if kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
        elif kind == "params":
            logged = client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in entry["params"].items() if k not in logged]
            if params:
                client.log_batch(run_id, params=params)
        elif kind == "text":
            client.log_text(run_id, entry["text"], entry["artifact_file"])
        elif kind == "artifacts":
            source = Path(entry["path"])
            if source.is_dir():
                client.log_artifacts(run_id, str(source), entry.get("artifact_path"))
            elif source.exists():
                client.log_artifact(run_id, str(source), entry.get("artifact_path"))
        elif kind == "status":
            client.set_terminated(run_id, entry["status"], entry["end_time"])
        elif kind == "input":
            log_input(client, run_id, entry)
        elif kind == "register":
            register_model(client, run_id, entry)


def find_journals(paths: list) -> list:
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob(f"{JOURNAL_PREFIX}*.jsonl"))
        elif path.exists():
            found.append(path)
        else:
            raise ConfigError(f"{path} does not exist: give a journal file or a directory to search")
    return found


def sync_journals(paths: list, tracking_uri: str | None) -> int:
    """Replays journals into MLflow, each into the store it was recorded for unless `tracking_uri`
    (or MLFLOW_TRACKING_URI) says otherwise; returns how many runs were completed."""
    use_tracking_store()
    journals = find_journals(paths or ["."])
    if not journals:
        print(f"nothing to sync: no {JOURNAL_PREFIX}*.jsonl under {', '.join(map(str, paths or ['.']))}")
        return 0
    for path in journals:
        header, entries = read_journal(path)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header["tracking_uri"]
        client = MlflowClient(tracking_uri=uri)
        try:
            client.get_run(header["run_id"])
        except Exception as error:
            if is_outage(error):
                raise tracking_unreachable(error, uri) from None
            raise UserError(
                f"{path}: run {header['run_id']} is not in {uri} ({str(error).splitlines()[0][:200]}); "
                f"pass {option('tracking_uri')} with the store the run was started in"
            ) from None
        started = time.perf_counter()
        try:
            send_entries(client, header["run_id"], entries)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(
                f"{path} holds an entry this pipeline would not write ({type(error).__name__}: "
                f"{error}); nothing after it was sent"
            ) from None
        except Exception as error:
            if is_outage(error):
                raise tracking_unreachable(error, uri) from None
            raise
        path.unlink()
        print(
            f"synced {len(entries)} entries of run {header['run_id']} into {uri} "
            f"({time.perf_counter() - started:.1f}s); removed {path}"
        )
    return len(journals)
