"""The comparison grid for one model and dataset, each cell one MLflow run, a finished cell reused.

Cells, at every target sparsity: the untrained one-shot methods (SparseGPT, magnitude, Wanda); iterative
pruning; and its equal-budget controls, which run the same IMP loop with the same training per
iteration (steps, batch, window, lr, seed) and so the same training tokens: `X+ft` prunes one-shot with
X at the first iteration and then only trains, `dense+ft` never prunes. Plus the dense baseline. A
stochastic cell (a calibration draw, a data order) is repeated for every seed.

Each cell's config is composed from the grid's (the model, data, training and calibration settings
are the grid's own objects, not copies), and a cell is identified by a hash of everything that
determines its result (the `cell_key` tag): a FINISHED run with the same key is reused, not rerun,
unless `force`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pandas as pd

from .checkpoint import load_checkpoint
from .config import (ONE_SHOT_METHODS, SEEDED_METHODS, CompareConfig, EvaluateConfig, IterativeConfig,
                     PruneRunConfig, parse_pattern)
from .data import load_corpus
from .distributed import from_main, is_main_process
from .jobs.evaluate import run_evaluate
from .jobs.iterative import run_iterative
from .jobs.prune import run_prune
from .models import resolve_model_source
from .reporting import collect_runs, markdown_table, publish_report, summarize
from .reporting.render import main_table
from .settings import flat_values
from .tracking import tracked_run
from .tracking.store import finished_cell_runs

# Settings that change where or how a cell runs, not its result.
NOT_IDENTITY = {"experiment", "system_metrics", "output_dir", "resume", "device", "log_every", "save_model", "model_dir",
                "tasks_batch_size"}


@dataclass
class Cell:
    kind: str          # dense | one-shot | trained (iterative, X+ft, dense+ft: the IMP loop)
    method: str
    target: float
    seed: int | None   # None: nothing in the cell is random
    config: object     # the job's config: EvaluateConfig, PruneRunConfig or IterativeConfig
    corpus: str        # digest of the corpus, part of the identity
    pattern: str = "unstructured"  # or N:M (one-shot cells)
    recovery: str = "ce"           # the trained cells' loss: ce, logits or squarehead

    @property
    def key(self) -> str:
        identity = {k: v for k, v in flat_values(self.config).items() if k not in NOT_IDENTITY}
        identity.update(kind=self.kind, corpus=self.corpus)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        amount = f"{self.target:.2f}" if self.pattern == "unstructured" else self.pattern
        recovery = f" [{self.recovery}]" if self.recovery != "ce" else ""
        return f"{self.method}{recovery} {amount}" + (f" seed {self.seed}" if self.seed is not None else "")

    @property
    def tags(self) -> dict:
        return {"cell_key": self.key, "cell_kind": self.kind, "cell_method": self.method,
                "cell_target": f"{self.target:.4f}", "cell_seed": "" if self.seed is None else str(self.seed),
                "cell_pattern": self.pattern, "cell_recovery": self.recovery}


def trained_cell_config(config: CompareConfig, method: str, target: float, seed: int,
                        recovery: str = "ce") -> IterativeConfig:
    """The IMP loop of one trained cell: the grid's schedule (iterative), one-shot with X (X+ft) or none
    (dense+ft), always the grid's training, so every trained cell at a target has one budget."""
    if method == "iterative":
        schedule, prune_method = config.schedule.schedule, config.prune.method
    elif method == "dense+ft":
        schedule, prune_method = "dense", config.prune.method
    else:
        schedule, prune_method = "one-shot", method.removesuffix("+ft")
    return IterativeConfig(model=config.model, data=config.data, tracking=config.tracking, tasks=config.tasks,
                           eval_tasks_every=0,  # the cell's accuracy is its final model's
                           schedule=replace(config.schedule, target_sparsity=target, schedule=schedule),
                           train=replace(config.train, seed=seed, distill="none" if recovery == "ce" else recovery),
                           prune=replace(config.prune, method=prune_method, seed=seed))


def plan_cells(config: CompareConfig, corpus_digest: str) -> list[Cell]:
    shared = {"model": config.model, "data": config.data, "tracking": config.tracking, "tasks": config.tasks}
    methods, seeds = config.grid.methods, config.grid.seeds
    cells = [Cell("dense", "dense", 0.0, None, EvaluateConfig(**shared, split="test"), corpus_digest)]
    amounts = [(target, "unstructured") for target in config.grid.sparsities]
    amounts += [(n / m, pattern) for pattern in config.grid.patterns for n, m in [parse_pattern(pattern)]]
    for target, pattern in amounts:
        for method in (m for m in methods if m in ONE_SHOT_METHODS):
            for seed in seeds if method in SEEDED_METHODS else [None]:  # magnitude draws nothing
                prune = replace(config.prune, method=method, sparsity=None if pattern != "unstructured" else target,
                                pattern=pattern, seed=config.prune.seed if seed is None else seed)
                cells.append(Cell("one-shot", method, target, seed, PruneRunConfig(**shared, prune=prune),
                                  corpus_digest, pattern))
    for target in config.grid.sparsities:
        for recovery in config.grid.recoveries:
            for method in (m for m in methods if m not in ONE_SHOT_METHODS):
                for seed in seeds:
                    cells.append(Cell("trained", method, target, seed,
                                      trained_cell_config(config, method, target, seed, recovery), corpus_digest,
                                      recovery=recovery))
    return cells


def run_cell(cell: Cell, grid_run_id: str) -> None:
    tags = {**cell.tags, "grid": grid_run_id}
    if cell.kind == "dense":
        run_evaluate(cell.config, tags)
    elif cell.kind == "one-shot":
        run_prune(replace(cell.config, output_dir=f"pruned_models/compare-{cell.key}"), tags)
    else:  # trained: the IMP loop; a killed cell resumes from its last completed iteration
        out = f"checkpoints/compare-{cell.key}"
        run_iterative(replace(cell.config, output_dir=out, model_dir=f"pruned_models/compare-{cell.key}",
                              resume=load_checkpoint(Path(out)) is not None), tags)


def run_grid(config: CompareConfig) -> pd.DataFrame | None:
    """Runs every cell that has no finished run yet, then writes compare.csv (one row per run), summary.csv
    and compare.md (over seeds), and the report; returns the runs' table. Under `accelerate launch` every
    cell uses all processes: the main one decides which cells are done and writes the results (and
    returns the table; the others return None)."""
    resolve_model_source(config.model.model)
    corpus = load_corpus(config.data.dataset)
    cells = plan_cells(config, corpus.digest[:16])
    name = f"compare {Path(config.model.model).name} {config.data.dataset}"
    with tracked_run(name, flat_values(config), {"model": config.model.model, "dataset": config.data.dataset,
                                                 "kind": "compare"}, config.tracking.experiment,
                     system_metrics=config.tracking.system_metrics) as logger:
        main = is_main_process()
        experiment_id = mlflow.get_run(logger.run_id).info.experiment_id if main else None
        done = from_main({key: run.info.run_id for key, run in finished_cell_runs(experiment_id).items()}
                         if main and not config.grid.force else {})
        for number, cell in enumerate(cells, start=1):
            if cell.key in done:
                print(f"[{number}/{len(cells)}] {cell.label}: reusing finished run {done[cell.key]}")
                continue
            print(f"\n[{number}/{len(cells)}] {cell.label}: running", flush=True)
            run_cell(cell, logger.run_id)
        if not main:
            return None
        keys = {cell.key for cell in cells}
        table = collect_runs(experiment_id, keys)
        summary = summarize(table)
        out = Path(config.grid.output_dir or Path("reports") / mlflow.get_experiment(experiment_id).name)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "compare.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        (out / "compare.md").write_text(markdown_table(main_table(summary)) + "\n")
        for name in ("compare.csv", "summary.csv", "compare.md"):
            logger.log_artifact(out / name)
        print("\n" + markdown_table(main_table(summary)))
        if config.grid.report:
            print(f"\nreport: {publish_report(experiment_id, out, keys)}")
    return table
