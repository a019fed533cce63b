"""The compare job: every cell of the grid (grid.py) that has no finished run yet, each one the evaluate,
prune or iterative job in a child run of the grid's run, then the tables and the report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd

from ..checkpoint import has_checkpoint
from ..config import CompareConfig
from ..data import load_corpus
from ..distributed import from_main, is_main_process
from ..grid import Cell, plan_cells
from ..models import resolve_model_source
from ..reporting import collect_runs, markdown_table, summarize
from ..reporting.render import main_table
from ..settings import flat_values
from ..tracking.store import finished_cell_runs, mark_orphaned_runs
from . import job_run
from .evaluate import run_evaluate
from .iterative import run_iterative
from .prune import run_prune
from .report import publish_report


def run_cell(cell: Cell, grid_run_id: str) -> None:
    tags = {**cell.tags, "grid": grid_run_id}
    if cell.kind == "dense":
        run_evaluate(cell.config, tags)
    elif cell.kind == "one-shot":
        # a cell's directories belong to its key: a forced rerun replaces its own model
        saved = replace(cell.config.saved_model, overwrite=True)
        run_prune(replace(cell.config, output_dir=f"pruned_models/compare-{cell.key}", saved_model=saved), tags)
    else:  # trained: the IMP loop; a killed cell resumes from its last completed iteration
        out = f"checkpoints/compare-{cell.key}"
        run_iterative(
            replace(
                cell.config,
                saved_model=replace(cell.config.saved_model, overwrite=True),
                output_dir=out,
                model_dir=f"pruned_models/compare-{cell.key}",
                resume=has_checkpoint(Path(out)),
            ),
            tags,
        )


def write_tables(tracker, experiment_id: str, keys: set, out: Path) -> pd.DataFrame:
    """compare.csv (one row per run), summary.csv and compare.md (over seeds), logged to the grid's run."""
    table = collect_runs(experiment_id, keys)
    summary = summarize(table)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "compare.md").write_text(markdown_table(main_table(summary)) + "\n")
    for name in ("compare.csv", "summary.csv", "compare.md"):
        tracker.log_artifact(out / name)
    print("\n" + markdown_table(main_table(summary)))
    return table


def run_compare(config: CompareConfig) -> pd.DataFrame | None:
    """Runs every cell that has no finished run yet, then writes the tables and the report; returns the runs'
    table. Under `accelerate launch` every cell uses all processes: the main one decides which cells are done
    and writes the results (and returns the table; the others return None).

    The grid's own run owns no directory: its tables go to reports/<experiment>, named once the run is open
    (under `mlflow run`, by the experiment MLflow chose); each cell owns its own."""

    def checks():
        resolve_model_source(config.model.model)
        return load_corpus(config.data.dataset)

    with job_run(
        f"compare {Path(config.model.model).name} {config.data.dataset}",
        params=flat_values(config),
        tags={"model": config.model.model, "dataset": config.data.dataset, "kind": "compare"},
        tracking=config.tracking,
        checks=checks,
        stop_hint="Stopped. Finished cells are kept in MLflow and a trained cell resumes from its last completed "
        "iteration: run the same compare command again to continue",
    ) as job:
        cells = plan_cells(config, job.inputs.digest[:16])
        main = is_main_process()
        experiment_id = mlflow.get_run(job.tracker.run_id).info.experiment_id if main else None
        if main:
            mark_orphaned_runs(experiment_id)  # what a SIGKILLed grid left RUNNING
        done = from_main(
            {key: run.info.run_id for key, run in finished_cell_runs(experiment_id).items()}
            if main and not config.grid.force
            else {}
        )
        for number, cell in enumerate(cells, start=1):
            if cell.key in done:
                print(f"[{number}/{len(cells)}] {cell.label}: reusing finished run {done[cell.key]}")
                continue
            print(f"\n[{number}/{len(cells)}] {cell.label}: running", flush=True)
            run_cell(cell, job.tracker.run_id)
        if not main:
            return None
        keys = {cell.key for cell in cells}
        out = Path(config.grid.resolved("output_dir", mlflow.get_experiment(experiment_id).name))
        table = write_tables(job.tracker, experiment_id, keys, out)
        if config.grid.report:
            print(f"\nreport: {publish_report(experiment_id, out, keys)}")
    return table
