"""One cell of the comparison grid, as a job of its own: in the compare process, or in a process of its own
(`python -m pipeline cell SPEC.json`, a hidden command, or a submitit job) from a spec that carries everything it needs.

A cell claims its key before it runs: an exclusive `flock` on `<grid directory>/claims/<key>.lock`, which
the kernel drops when the process ends however it ends. Two `compare` processes on one grid (on one
machine, or on machines sharing the directory over a file system with working locks) therefore never run a
cell twice at once; the one that finds a cell claimed waits for it instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from ..checkpoint import has_checkpoint
from ..config import EvaluateConfig, IterativeConfig, PruneRunConfig
from ..errors import ConfigError, Continuable, UserError, option
from ..grid import Cell
from ..outputs import Held, hold_lock
from ..settings import build, flat_values
from ..tracking.store import experiment_identity, finished_cell_runs, use_tracking_store
from .evaluate import run_evaluate
from .iterative import run_iterative
from .prune import run_prune

CONFIGS = {cls.__name__: cls for cls in (EvaluateConfig, PruneRunConfig, IterativeConfig)}


# how to go on after a cell's training diverged, in compare's words (a lower lr is another cell)
CELL_FAULT_HINT = (
    f"lower or leave out that learning rate ({option('lrs')}, or {option('lr')} without a sweep) and run the "
    "compare again: finished cells are reused"
)
CLAIMED = 75  # a cell process's exit code when another process holds the cell (EX_TEMPFAIL)


def cell_command(spec_path: Path, gpus: int) -> list:
    """The cell's process: itself, or under `accelerate launch` with one process per GPU when it has several."""
    if gpus > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(gpus),
            "-m",
            "pipeline",
            "cell",
            str(spec_path),
        ]
    return [sys.executable, "-m", "pipeline", "cell", str(spec_path)]


class Claimed(UserError):
    """Another process is running this cell: the cell's process exits with CLAIMED, and compare waits."""

    exit_code = CLAIMED


@contextlib.contextmanager
def claim(claims: Path, key: str):
    """Holds the cell's claim while the block runs; raises Claimed when another process holds it."""
    claims.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hold_lock(claims / f"{key}.lock"))
        except Held as held:
            owner = held.owner
            raise Claimed(f"cell {key} is claimed by pid {owner.get('pid', '?')} on {owner.get('host', '?')}") from None
        yield


def is_claimed(claims: Path, key: str) -> bool:
    try:
        with claim(claims, key):
            return False
    except Claimed:
        return True


def cell_directory(kind: str, cell: Cell, experiment_id: str) -> str:
    """`checkpoints/` or `pruned_models/` + the cell's name: its key within its store's experiment (the same
    cell of another experiment, or of another store's experiment of the same id, is another run, with
    directories of its own: a checkpoint of theirs is never resumed here, nor touched)."""
    return f"{kind}/compare-{experiment_identity(experiment_id)}-{cell.key}"


def run_trained_cell(config, tags: dict, shared_pruning: Path) -> None:
    """The trained cell's IMP run; a diverged loss is told in compare's words, whichever process it ran in."""
    try:
        run_iterative(config, tags, shared_pruning)
    except Continuable as fault:
        fault.hint = CELL_FAULT_HINT
        raise


def run_cell(cell: Cell, grid_run_id: str, experiment_id: str, extra_tags: dict | None = None) -> None:
    """The cell's job: evaluate (dense), prune (one-shot) or iterative (trained); a killed trained cell resumes
    from its last completed iteration. Its directories belong to it, so a forced rerun replaces its own
    model."""
    tags = {**cell.tags, "grid": grid_run_id, **(extra_tags or {})}
    model_dir = cell_directory("pruned_models", cell, experiment_id)
    # one pruning per criterion, target and seed, shared by this experiment's cells
    shared_pruning = Path(f"checkpoints/compare-{experiment_identity(experiment_id)}-pruning")
    if cell.kind == "dense":
        run_evaluate(cell.config, tags)
    elif cell.kind == "one-shot":
        saved = replace(cell.config.saved_model, overwrite=True)
        run_prune(replace(cell.config, output_dir=model_dir, saved_model=saved), tags, shared_pruning)
    else:
        out = cell_directory("checkpoints", cell, experiment_id)
        run_trained_cell(
            replace(
                cell.config,
                saved_model=replace(cell.config.saved_model, overwrite=True),
                output_dir=out,
                model_dir=model_dir,
                resume=has_checkpoint(Path(out)),
            ),
            tags,
            shared_pruning,
        )


def cell_spec(cell: Cell, grid_run_id: str, experiment: str, claims: Path, threads: int | None, gpus: int) -> dict:
    """What a cell's own process needs (JSON): its config by flat keys, where it records, its claim."""
    return {
        "cell": dict(cell.values),
        "corpus": cell.corpus,
        "config_class": type(cell.config).__name__,
        "values": flat_values(cell.config),
        "key": cell.key,
        "grid_run_id": grid_run_id,
        "experiment": experiment,
        "claims": str(claims),
        "threads": threads,
        "gpus": gpus,
    }


def write_spec(spec: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec['key']}.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


SPEC_FIELDS = ("cell", "corpus", "config_class", "values", "key", "grid_run_id", "experiment", "claims")


def cell_from_spec(spec: dict) -> Cell:
    """The cell a spec describes; a spec that is not one compare wrote, or was changed since, is a ConfigError."""
    if not isinstance(spec, dict) or any(field not in spec for field in SPEC_FIELDS):
        missing = [field for field in SPEC_FIELDS if not isinstance(spec, dict) or field not in spec]
        raise ConfigError(f"is not a cell spec of compare: it lacks {', '.join(missing)}")
    if spec["config_class"] not in CONFIGS:
        raise ConfigError(f"names no cell job ({spec['config_class']!r}; a cell is one of {', '.join(CONFIGS)})")
    values = {**spec["values"], "experiment": spec["experiment"]}  # the grid's experiment, by name
    cell = Cell(build(CONFIGS[spec["config_class"]], values), spec["corpus"], spec["cell"])
    if cell.key != spec["key"]:
        raise ConfigError(
            f"describes cell {cell.key}, not the {spec['key']} it is named for: it was changed after compare "
            "wrote it; run the compare again to write it anew"
        )
    return cell


def run_spec(spec: dict) -> None:
    """A cell in a process of its own: the grid's experiment, not whatever run `mlflow run` injected into the
    compare process; this process's share of the threads; skipped when it already finished."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    cell = cell_from_spec(spec)
    use_tracking_store()
    with claim(Path(spec["claims"]), cell.key):
        import mlflow

        experiment_id = mlflow.get_run(spec["grid_run_id"]).info.experiment_id
        if cell.key in finished_cell_runs(experiment_id, {cell.key}):
            print(f"{cell.label}: already finished")
            return
        # an out-of-process cell is a child of the grid's run all the same (the UI nests it)
        run_cell(cell, spec["grid_run_id"], experiment_id, {"mlflow.parentRunId": spec["grid_run_id"]})


def run_cell_job(spec: dict) -> str:
    """What a submitit job runs: the cell (under `accelerate launch` with a process per GPU when it has
    several); "finished", or "claimed" when another process holds it."""
    if spec.get("gpus", 1) > 1:
        path = write_spec(spec, Path(spec["claims"]).parent / "cells")
        code = subprocess.run(cell_command(path, spec["gpus"])).returncode
        if code not in (0, CLAIMED):
            raise RuntimeError(f"the cell's processes exited with {code}: see this job's log")
        return "claimed" if code == CLAIMED else "finished"
    try:
        run_spec(spec)
    except Claimed:
        return "claimed"
    return "finished"


def run_spec_file(path: str) -> None:
    """What `python -m pipeline cell SPEC.json` runs: a spec that does not read as one is one line naming it."""
    try:
        spec = json.loads(Path(path).read_text())
        cell_from_spec(spec)  # checked before anything opens
    except (ValueError, TypeError, AttributeError) as error:
        reason = error.template if isinstance(error, ConfigError) else f"does not read as JSON ({error})"
        if isinstance(error, (TypeError, AttributeError)):
            reason = f"holds values no cell takes ({error})"
        raise ConfigError(f"cell spec {path} {reason}") from None
    run_spec(spec)
