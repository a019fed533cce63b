"""The comparison grid for one model and dataset, each cell one MLflow run, a finished cell reused.

Cells: the dense baseline; one-shot SparseGPT, magnitude and Wanda at every target sparsity; iterative
pruning at every target. Each cell's config is composed from the grid's (the model, data, training and
calibration settings are the grid's own objects, not copies), and a cell is identified by a hash of
everything that determines its result (the `cell_key` tag): a FINISHED run with the same key is
reused, not rerun, unless `force`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pandas as pd

from .checkpoint import load_checkpoint
from .config import CompareConfig, EvaluateConfig, IterativeConfig, PruneRunConfig
from .data import load_corpus
from .jobs.evaluate import run_evaluate
from .jobs.iterative import run_iterative
from .jobs.prune import run_prune
from .models import resolve_model_source
from .report import collect_results, markdown_table, publish_report
from .settings import flat_values
from .tracking import tracked_run
from .tracking.store import finished_cell_runs

# Settings that change where or how a cell runs, not its result.
NOT_IDENTITY = {"experiment", "output_dir", "resume", "device", "log_every", "save_model"}


@dataclass
class Cell:
    kind: str          # dense | one-shot | iterative
    method: str
    target: float
    config: object     # the job's config: EvaluateConfig, PruneRunConfig or IterativeConfig
    corpus: str        # digest of the corpus, part of the identity

    @property
    def key(self) -> str:
        identity = {k: v for k, v in flat_values(self.config).items() if k not in NOT_IDENTITY}
        identity.update(kind=self.kind, corpus=self.corpus)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.method} {self.target:.2f}"

    @property
    def tags(self) -> dict:
        return {"cell_key": self.key, "cell_kind": self.kind, "cell_method": self.method,
                "cell_target": f"{self.target:.4f}"}


def plan_cells(config: CompareConfig, corpus_digest: str) -> list[Cell]:
    shared = {"model": config.model, "data": config.data}
    cells = [Cell("dense", "dense", 0.0, EvaluateConfig(**shared, split="test"), corpus_digest)]
    for target in config.grid.sparsities:
        for method in config.grid.methods:
            if method != "iterative":
                prune = replace(config.prune, method=method, sparsity=target)
                cells.append(Cell("one-shot", method, target, PruneRunConfig(**shared, prune=prune), corpus_digest))
    if "iterative" in config.grid.methods:
        for target in config.grid.sparsities:
            iterative = IterativeConfig(**shared, schedule=replace(config.schedule, target_sparsity=target),
                                        train=config.train, prune=config.prune)
            cells.append(Cell("iterative", "iterative", target, iterative, corpus_digest))
    return cells


def run_cell(cell: Cell, grid_run_id: str) -> None:
    tags = {**cell.tags, "grid": grid_run_id}
    if cell.kind == "dense":
        run_evaluate(cell.config, tags)
    elif cell.kind == "one-shot":
        run_prune(replace(cell.config, output_dir=f"pruned_models/compare-{cell.key}"), tags)
    else:
        out = f"checkpoints/compare-{cell.key}"
        # a killed iterative cell resumes from its last completed iteration
        run_iterative(replace(cell.config, output_dir=out, resume=load_checkpoint(Path(out)) is not None), tags)


def run_grid(config: CompareConfig) -> pd.DataFrame:
    """Runs every cell that has no finished run yet, then writes compare.csv/.md (and the report)."""
    resolve_model_source(config.model.model)
    corpus = load_corpus(config.data.dataset)
    cells = plan_cells(config, corpus.digest[:16])
    name = f"compare {Path(config.model.model).name} {config.data.dataset}"
    with tracked_run(name, flat_values(config), {"model": config.model.model, "dataset": config.data.dataset,
                                                 "kind": "compare"}, config.tracking.experiment) as logger:
        experiment_id = mlflow.get_run(logger.run_id).info.experiment_id
        done = {} if config.grid.force else finished_cell_runs(experiment_id)
        for number, cell in enumerate(cells, start=1):
            if cell.key in done:
                print(f"[{number}/{len(cells)}] {cell.label}: reusing finished run {done[cell.key].info.run_id}")
                continue
            print(f"\n[{number}/{len(cells)}] {cell.label}: running", flush=True)
            run_cell(cell, logger.run_id)
        keys = {cell.key for cell in cells}
        table = collect_results(experiment_id, keys)
        out = Path(config.grid.output_dir or Path("reports") / mlflow.get_experiment(experiment_id).name)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "compare.csv", index=False)
        (out / "compare.md").write_text(markdown_table(table) + "\n")
        logger.log_artifact(out / "compare.csv")
        logger.log_artifact(out / "compare.md")
        print("\n" + markdown_table(table))
        if config.grid.report:
            print(f"\nreport: {publish_report(experiment_id, out, keys)}")
    return table
