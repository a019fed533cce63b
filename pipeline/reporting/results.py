"""The runs of a comparison grid as a table, one row per run, and summarized over seeds."""

from __future__ import annotations

import math

import pandas as pd

from ..config import DISTILL_MODES
from ..methods import BASELINE, KINDS, METHODS
from ..perplexity import change_pct
from ..tracking.store import finished_cell_runs

RUN_COLUMNS = [
    "method",
    "kind",
    "target_sparsity",
    "pattern",
    "distill",
    "seed",
    "sparsity",
    "perplexity",
    "train_tokens",
    "train_flops",
    "seconds",
    "run_id",
]
LEGACY_KIND = {"iterative": "trained"}  # runs made before the +ft cells
LEGACY_DISTILL = {"ce": "none"}  # runs made before the grid's recovery loss took --distill's values


def _distill(tags: dict) -> str:
    if "cell_distill" in tags:
        return tags["cell_distill"]
    legacy = tags.get("cell_recovery", "none")
    return LEGACY_DISTILL.get(legacy, legacy)


def _row(run) -> dict:
    """The run's numbers; `acc:<task>` for every zero-shot task it ran."""
    tags, metrics = run.data.tags, run.data.metrics
    kind = LEGACY_KIND.get(tags["cell_kind"], tags["cell_kind"])
    if kind == "dense":
        sparsity, ppl = 0.0, metrics["perplexity"]
    elif kind == "trained":
        sparsity, ppl = metrics["final_sparsity"], metrics["final_perplexity"]
    else:
        sparsity, ppl = metrics["sparsity"], metrics["perplexity"]
    seed = tags.get("cell_seed", "")
    method = BASELINE if kind == "dense" else tags["cell_method"]
    return {
        "method": method,
        "kind": kind,
        "distill": _distill(tags),
        "target_sparsity": float(tags["cell_target"]),
        "pattern": tags.get("cell_pattern", "unstructured"),
        "seed": int(seed) if seed else None,
        "sparsity": sparsity,
        "perplexity": ppl,
        "train_tokens": int(metrics.get("train_tokens", 0)),
        "train_flops": metrics.get("train_flops", 0.0),
        "seconds": (run.info.end_time - run.info.start_time) / 1000.0,
        "run_id": run.info.run_id,
        **{
            f"acc:{key.split('/')[1]}": value
            for key, value in metrics.items()
            if key.startswith("task/") and key.endswith("/acc")
        },
    }


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    keys = table.assign(
        _kind=table["kind"].map(KINDS.index),
        _method=table["method"].map(lambda m: METHODS[m].order if m in METHODS else 99),
        _pattern=table["pattern"] != "unstructured",
        _distill=table["distill"].map(lambda d: DISTILL_MODES.index(d) if d in DISTILL_MODES else 9),
    )
    by = ["_pattern", "target_sparsity", "pattern", "_kind", "_distill", "_method"] + (
        ["seed"] if "seed" in table else []
    )
    return keys.sort_values(by).drop(columns=["_kind", "_method", "_pattern", "_distill"]).reset_index(drop=True)


def collect_runs(experiment_id: str, keys: set | None = None) -> pd.DataFrame:
    """One row per finished cell run of the experiment (of the cells in `keys`, if given)."""
    rows = [_row(run) for run in finished_cell_runs(experiment_id, keys).values()]
    tasks = sorted({key for row in rows for key in row if key.startswith("acc:")})
    table = pd.DataFrame(rows, columns=RUN_COLUMNS + tasks)
    return table if table.empty else _ordered(table)


def task_columns(table: pd.DataFrame) -> list:
    return [column for column in table.columns if column.startswith("acc:")]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method and target: perplexity mean, std over seeds (nan for one run) and n; the budget;
    the mean wall time; and the change against the dense model's perplexity."""
    if runs.empty:
        return runs.assign(perplexity_std=[], n=[], vs_dense_pct=[])
    grouped = runs.groupby(["method", "kind", "target_sparsity", "pattern", "distill"], sort=False)
    summary = grouped.agg(
        sparsity=("sparsity", "mean"),
        perplexity=("perplexity", "mean"),
        perplexity_std=("perplexity", "std"),
        n=("perplexity", "size"),
        train_tokens=("train_tokens", "mean"),
        train_flops=("train_flops", "mean"),
        seconds=("seconds", "mean"),
        **{column: (column, "mean") for column in task_columns(runs)},
    ).reset_index()
    if task_columns(runs):
        summary["accuracy"] = summary[task_columns(runs)].mean(axis=1)  # over tasks, as the papers average
    dense = summary.loc[summary["kind"] == "dense", "perplexity"]
    base = float(dense.iloc[0]) if len(dense) else math.nan
    summary["vs_dense_pct"] = change_pct(summary["perplexity"], base)
    return _ordered(summary)
