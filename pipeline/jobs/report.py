"""The report job: the comparison report of an experiment's grid runs (reporting/), written and published as
its own MLflow run."""

from __future__ import annotations

from pathlib import Path

import mlflow

from ..config import ReportConfig, TrackingConfig
from ..reporting import write_report
from ..tracking.store import experiment_id_named, use_tracking_store
from . import job_run


def publish_report(
    experiment_id: str | None, out: Path | None, keys: set | None = None, experiment: str | None = None
) -> Path:
    """write_report inside a `report` MLflow run (a child run when called from `compare`).

    experiment_id None: the experiment the report run itself goes to (under `mlflow run`, the injected
    run's); out None: reports/<experiment name>.
    """
    with job_run(
        "report",
        params={"experiment": experiment, "output_dir": str(out) if out else None},
        tags={"kind": "report"},
        tracking=TrackingConfig(experiment=experiment, system_metrics=False),
    ) as job:
        experiment_id = experiment_id or mlflow.get_run(job.tracker.run_id).info.experiment_id
        out = out or ReportConfig().resolved("output_dir", mlflow.get_experiment(experiment_id).name)
        path = write_report(experiment_id, Path(out), keys)
        job.tracker.log_artifacts(out, "report")
    return path


def run_report(config: ReportConfig) -> Path:
    """Reports on `config.experiment` (default: the one the report run goes to, e.g. under `mlflow run`)."""
    use_tracking_store()
    experiment_id = experiment_id_named(config.experiment) if config.experiment else None
    path = publish_report(
        experiment_id, Path(config.output_dir) if config.output_dir else None, experiment=config.experiment
    )
    print(f"report: {path} and {path.with_suffix('.html')}")
    return path
