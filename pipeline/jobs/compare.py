"""The compare job: every cell of the grid (grid.py) that has no finished run yet, then the tables and the
report. Cells run one after another in this process (the default), `--parallel N` at a time each in a process
of its own, or as the jobs of a submitit array (`--executor submitit`); `--shard K/N` runs one slice of the
grid for any other scheduler. Each cell is the evaluate, prune or iterative job in a child run of the grid's
run (jobs/cell.py), and claims its key first, so two compares on one grid never run a cell twice."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch

from ..adapters import check_lora
from ..config import REPORTS, CompareConfig
from ..data import load_corpus
from ..distributed import from_main, is_main_process, num_processes
from ..errors import ConfigError, UserError, option
from ..grid import lr_extension_cells, plan_cells, shard_of
from ..local_server import LocalMlflowServer
from ..models import model_skeleton, resolve_model_source
from ..outputs import check_writable_dir
from ..pruning.masks import prunable_linears
from ..reporting.numbers import markdown_table
from ..reporting.render import main_table
from ..reporting.results import collect_runs, save_tables, summarize
from ..settings import flat_values
from ..tracking.store import finished_cell_runs, mark_orphaned_runs, tracking_uri
from . import job_run
from .cell import CELL_FAULT_HINT, Claimed, cell_spec, claim, is_claimed, run_cell
from .executors import child_environment, gpu_count, require_submitit, run_local_pool, run_submitit
from .report import publish_report

CLAIM_POLL_SECONDS = 5.0


def write_tables(tracker, experiment_id: str, keys: set, out: Path) -> pd.DataFrame:
    """compare.csv (one row per run), summary.csv and compare.md (over seeds), logged to the grid's run."""
    table = collect_runs(experiment_id, keys)
    summary = summarize(table)
    save_tables(table, summary, out)
    headline = markdown_table(main_table(summary[summary["selected"]]))  # a sweep's selected lrs
    (out / "compare.md").write_text(headline + "\n")
    for name in ("compare.csv", "summary.csv", "compare.md"):
        tracker.log_artifact(out / name)
    print("\n" + headline)
    return table


def checks(config: CompareConfig):
    """Before the grid's run opens: where the tables go, the model and corpus, and what the executor needs."""
    # the grid's folder is named by its experiment once the run is open (under `mlflow run`, MLflow names it);
    # a folder given, or the reports root the default goes under, must be writable before any cell runs
    check_writable_dir(Path(config.grid.output_dir or REPORTS), "output_dir")
    resolve_model_source(config.model.model)
    if "lora" in config.grid.train_params:
        skeleton = model_skeleton(config.model.model, config.model.trust_remote_code)
        linears = prunable_linears(skeleton, config.prune.include, config.prune.exclude)
        check_lora(linears, config.train.lora_rank, config.train.lora_targets)
    corpus = load_corpus(config.data.dataset)
    if config.grid.lrs and not corpus.held_out_validation:
        raise ConfigError(
            f"{option('lrs')} selects each method's learning rate on the validation split, and {option('dataset')} "
            f"{config.data.dataset} has none apart from its test split: give text:DIR a validation.txt or valid.txt"
            + ("" if config.data.dataset.startswith("text:") else ", or use pydocs, wikitext2, ptb or c4")
        )
    settings = config.executor
    if settings.executor == "local" and not settings.in_process:
        gpus = cell_gpus(config)
        if settings.gpus_per_cell > 1 and not gpus:
            raise ConfigError(
                f"{option('gpus_per_cell')} {settings.gpus_per_cell} asks for GPUs this machine has "
                f"not: its cells share the CPU cores ({option('threads_per_cell')})"
            )
        if gpus and settings.parallel * settings.gpus_per_cell > gpus:
            raise ConfigError(
                f"{option('parallel')} {settings.parallel} x {option('gpus_per_cell')} "
                f"{settings.gpus_per_cell} needs {settings.parallel * settings.gpus_per_cell} GPUs and "
                f"this machine has {gpus}"
            )
    if settings.executor == "submitit":
        submitit = require_submitit()
        cluster = submitit.AutoExecutor.which()
        if cluster != "slurm" and not settings.wait:
            raise ConfigError(
                f"returning before the cells finish ({option('wait')} off) needs Slurm: off a cluster, submitit's "
                "local executor runs the cells as this process's children"
            )
        if cluster == "slurm" and not tracking_uri().startswith(("http://", "https://")):
            raise ConfigError(
                f"{option('executor')} submitit on a Slurm cluster runs cells on other machines, which must all "
                f"reach one tracking server: set MLFLOW_TRACKING_URI to an http(s) `mlflow server` (not "
                f"{tracking_uri()})"
            )
    return corpus


def cell_gpus(config: CompareConfig) -> int:
    """The GPUs the cells share out: none where they run on the CPU (`--device cpu` on a GPU machine)."""
    return 0 if config.model.device == "cpu" else gpu_count()


@contextlib.contextmanager
def store_for_cell_processes(config: CompareConfig, root: Path):
    """The tracking URI the cells' processes use. A sqlite store takes one writer at a time, so with cells in
    processes of their own a local `mlflow server` over the same database file becomes its one writer (this
    process too uses it meanwhile); any other store is used as it is."""
    uri = tracking_uri()
    if config.executor.in_process or not uri.startswith("sqlite:///"):
        yield uri
        return
    database = Path(uri[len("sqlite:///") :]).resolve()
    server = LocalMlflowServer(
        root / "server", backend_store_uri=f"sqlite:///{database}", artifacts=database.parent / "mlartifacts", tied=True
    ).start()
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    mlflow.set_tracking_uri(server.uri)
    print(f"cells record through a local mlflow server over {database} ({server.uri}): one writer", flush=True)
    try:
        yield server.uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if previous is None else os.environ.update(MLFLOW_TRACKING_URI=previous)
        mlflow.set_tracking_uri(uri)
        server.stop()


def run_in_process(cells: list, grid_run_id: str, experiment_id: str, claims: Path) -> list:
    """One after another in this process; a failure stops the grid (the cells share this process, which a failed
    cell may have left in a state the next should not inherit). Returns the cells another process had claimed."""
    claimed = []
    for number, cell in enumerate(cells, start=1):
        try:  # under `accelerate launch` every process runs every cell: one launch is one grid's only runner
            with claim(claims, cell.key) if num_processes() == 1 else contextlib.nullcontext():
                print(f"\n[{number}/{len(cells)}] {cell.label}: running", flush=True)
                run_cell(cell, grid_run_id, experiment_id)
        except Claimed:
            print(f"[{number}/{len(cells)}] {cell.label}: claimed by another compare; waiting for it later")
            claimed.append(cell)
    return claimed


def wait_for_claimed(cells: list, experiment_id: str, grid_run_id: str, claims: Path) -> None:
    """Cells another process was running: wait until it lets go of them; one it left unfinished (it died) runs
    here."""
    for cell in cells:
        while is_claimed(claims, cell.key):
            time.sleep(CLAIM_POLL_SECONDS)
        if cell.key not in finished_cell_runs(experiment_id, {cell.key}):
            run_in_process([cell], grid_run_id, experiment_id, claims)


def run_cells(
    config: CompareConfig, cells: list, experiment: str, experiment_id: str, grid_run_id: str, out: Path
) -> tuple:
    """The pending cells wherever the executor puts them; returns the failed ones' (cell, log)."""
    settings, claims = config.executor, out / "claims"
    if settings.in_process:
        if settings.threads_per_cell:  # given: this process's threads are the cells'
            torch.set_num_threads(settings.threads_per_cell)
        return [], run_in_process(cells, grid_run_id, experiment_id, claims)
    threads = settings.resolved("threads_per_cell")
    specs = [cell_spec(cell, grid_run_id, experiment, claims, threads, settings.gpus_per_cell) for cell in cells]
    with store_for_cell_processes(config, out) as uri:
        env = child_environment(uri, threads)
        if settings.executor == "local":
            outcomes = run_local_pool(specs, settings.parallel, settings.gpus_per_cell, cell_gpus(config), out, env)
        else:
            os.environ.update(MLFLOW_TRACKING_URI=uri)
            outcomes = run_submitit(specs, settings, out / "submitit", settings.wait)
    by_key = {cell.key: cell for cell in cells}
    if outcomes is None:
        return None, []
    failed = [(by_key[o.key], o.log) for o in outcomes if o.state == "failed"]
    claimed = [by_key[o.key] for o in outcomes if o.state == "claimed"]
    return failed, claimed


def extend_lr_sweeps(
    config: CompareConfig, cells: list, failed: list, experiment: str, experiment_id: str, grid_run_id: str, out: Path
) -> tuple[list, list]:
    """`--extend-lrs N`: up to N times, the next rung of the lr ladder where a row's selection is at an edge of
    the lrs it tried (grid.lr_extension_cells), run like the grid's own cells; returns the grid's cells with
    them, and the failed ones."""
    for _ in range(config.grid.extend_lrs):
        planned = {cell.key for cell in cells}
        if is_main_process():
            summary = summarize(collect_runs(experiment_id, planned))
            extensions = [cell for cell in lr_extension_cells(config, cells, summary) if cell.key not in planned]
            done = finished_cell_runs(experiment_id, {cell.key for cell in extensions}) if not config.grid.force else {}
        extensions, done = from_main((extensions, done) if is_main_process() else None)
        if not extensions:
            break
        print(f"\n{len(extensions)} cell(s) one rung of the lr ladder past a selection at its edge", flush=True)
        cells = cells + extensions
        more_failed, claimed = run_cells(
            config, [cell for cell in extensions if cell.key not in done], experiment, experiment_id, grid_run_id, out
        )
        if is_main_process():
            wait_for_claimed(claimed, experiment_id, grid_run_id, out / "claims")
        failed = failed + more_failed
    return cells, failed


def run_compare(config: CompareConfig) -> pd.DataFrame | None:
    """Runs every cell that has no finished run yet, then writes the tables and the report; returns the runs'
    table (None from a shard, a `--no-wait` submission, or a non-main process of a launch).

    The grid's own run owns no directory: its tables go to reports/<experiment>, named once the run is open
    (under `mlflow run`, by the experiment MLflow chose); each cell owns its own."""
    with job_run(
        f"compare {Path(config.model.model).name} {config.data.dataset}",
        params=flat_values(config),
        tags={"model": config.model.model, "dataset": config.data.dataset, "kind": "compare"},
        tracking=config.tracking,
        checks=lambda: checks(config),
        stop_hint="Stopped. Finished cells are kept in MLflow and a trained cell resumes from its last completed "
        "iteration: run the same compare command again to continue",
        fault_hint=CELL_FAULT_HINT,
    ) as job:
        cells = plan_cells(config, job.inputs.digest[:16])
        main = is_main_process()
        experiment_id = mlflow.get_run(job.tracker.run_id).info.experiment_id if main else None
        experiment = mlflow.get_experiment(experiment_id).name if main else None
        if main:
            mark_orphaned_runs(experiment_id)  # what a SIGKILLed grid left RUNNING
        out = Path(config.grid.resolved("output_dir", from_main(experiment)))
        done = from_main(
            {key: run.info.run_id for key, run in finished_cell_runs(experiment_id).items()}
            if main and not config.grid.force
            else {}
        )
        mine = shard_of(cells, *config.executor.shard_numbers) if config.executor.shard else cells
        for cell in mine:
            if cell.key in done:
                print(f"{cell.label}: reusing finished run {done[cell.key]}")
        pending = [cell for cell in mine if cell.key not in done]
        failed, claimed = run_cells(config, pending, experiment, experiment_id, job.tracker.run_id, out)
        if failed is None:  # --no-wait
            print("cells submitted: run the same compare command again to collect them and write the report")
            return None
        if main:
            wait_for_claimed(claimed, experiment_id, job.tracker.run_id, out / "claims")
        if config.executor.shard:
            print(
                f"shard {config.executor.shard}: {len(pending)} cells run; the report comes from a compare "
                "without --shard once every shard has finished"
            )
            return None
        cells, failed = extend_lr_sweeps(config, cells, failed, experiment, experiment_id, job.tracker.run_id, out)
        if not main:
            return None
        keys = {cell.key for cell in cells}
        table = write_tables(job.tracker, experiment_id, keys, out)
        if config.grid.report:
            print(f"\nreport: {publish_report(experiment_id, out, keys)}")
        if failed:
            where = "; ".join(f"{cell.label}: see {log}" for cell, log in failed)
            raise UserError(
                f"{len(failed)} cell(s) failed ({where}); the report covers the others: run the same compare "
                "command again to retry them"
            )
    return table
