"""The report job: the comparison report of an experiment's grid runs (reporting/), written and published as
its own MLflow run."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from ..config import DEFAULT_EXPERIMENT, ReportConfig, TrackingConfig
from ..errors import UserError
from ..outputs import check_writable_dir
from ..reporting.render import write_report
from ..reporting.results import collect_runs
from ..tracking.store import experiment_id_named, under_mlflow_run, use_tracking_store
from . import job_run


def publish_report(
    experiment_id: str, out: Path | None, keys: set | None = None, experiment: str | None = None
) -> Path:
    """write_report inside a `report` MLflow run (a child run when called from `compare`); out None:
    reports/<experiment name>."""
    name = mlflow.get_experiment(experiment_id).name
    out = Path(out or ReportConfig().resolved("output_dir", name))
    with job_run(
        "report",
        params={"experiment": experiment, "output_dir": str(out)},
        tags={"kind": "report"},
        tracking=TrackingConfig(experiment=experiment, system_metrics=False),
    ) as job:
        path = write_report(experiment_id, out, keys)
        job.tracker.log_artifacts(out, "report")
    return path


def experiment_to_report(config: ReportConfig) -> str:
    """The experiment named, else the one the report run goes to: under `mlflow run` the injected run's,
    otherwise the default experiment."""
    if config.experiment:
        return experiment_id_named(config.experiment)
    if under_mlflow_run():
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    return experiment_id_named(DEFAULT_EXPERIMENT)


def checks(config: ReportConfig) -> str:
    """Bad input opens no run: an output directory that cannot be written, an experiment without runs."""
    use_tracking_store()
    if config.output_dir:
        check_writable_dir(Path(config.output_dir))
    experiment_id = experiment_to_report(config)
    if collect_runs(experiment_id).empty:
        raise UserError(
            f"experiment '{mlflow.get_experiment(experiment_id).name}' holds no finished comparison runs: run "
            "`python -m pipeline compare` first, or name another experiment"
        )
    return experiment_id


def run_report(config: ReportConfig) -> Path:
    experiment_id = checks(config)
    path = publish_report(
        experiment_id, Path(config.output_dir) if config.output_dir else None, experiment=config.experiment
    )
    print(f"report: {path} and {path.with_suffix('.html')}")
    return path
