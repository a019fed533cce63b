"""The runs of a comparison grid as a table, one row per run, and summarized over seeds."""

from __future__ import annotations

import math

import pandas as pd

from ..config import DISTILL_MODES, TRAIN_PARAMS
from ..methods import BASELINE, KINDS, METHODS
from ..tracking.store import finished_cell_runs
from .numbers import change_pct

RUN_COLUMNS = [
    "method",
    "kind",
    "target_sparsity",
    "pattern",
    "distill",
    "train_params",
    "lr",
    "seed",
    "sparsity",
    "perplexity",
    "val_perplexity",
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


def _lr(run, kind: str) -> float:
    """A trained cell's learning rate (its tag; before the tag, its `lr` parameter); nan for the others."""
    if kind != "trained":
        return math.nan
    value = run.data.tags.get("cell_lr") or run.data.params.get("lr")
    return float(value) if value else math.nan


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
        "train_params": tags.get("cell_train_params", "all"),  # runs made before the tag trained everything
        "lr": _lr(run, kind),
        "target_sparsity": float(tags["cell_target"]),
        "pattern": tags.get("cell_pattern", "unstructured"),
        "seed": int(seed) if seed else None,
        "sparsity": sparsity,
        "perplexity": ppl,
        "val_perplexity": metrics.get("final_val_perplexity", math.nan),
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
        _trains=table["train_params"].map(lambda t: TRAIN_PARAMS.index(t) if t in TRAIN_PARAMS else 9),
    )
    by = ["_pattern", "target_sparsity", "pattern", "_kind", "_distill", "_trains", "_method", "lr"] + (
        ["seed"] if "seed" in table else []
    )
    helpers = ["_kind", "_method", "_pattern", "_distill", "_trains"]
    return keys.sort_values(by).drop(columns=helpers).reset_index(drop=True)


def collect_runs(experiment_id: str, keys: set | None = None) -> pd.DataFrame:
    """One row per finished cell run of the experiment (of the cells in `keys`, if given)."""
    rows = [_row(run) for run in finished_cell_runs(experiment_id, keys).values()]
    tasks = sorted({key for row in rows for key in row if key.startswith("acc:")})
    table = pd.DataFrame(rows, columns=RUN_COLUMNS + tasks)
    return table if table.empty else _ordered(table)


def task_columns(table: pd.DataFrame) -> list:
    return [column for column in table.columns if column.startswith("acc:")]


# a table row: a cell over its seeds and lrs
CELL = ["method", "kind", "target_sparsity", "pattern", "distill", "train_params"]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method, target and learning rate: perplexity (test and validation) mean, std over seeds
    (nan for one run) and n; the budget; the mean wall time; the change against the dense model's
    perplexity; and which lr is selected (select_lrs)."""
    if runs.empty:
        return runs.assign(perplexity_std=[], n=[], vs_dense_pct=[], selected=[])
    # an untrained cell has no lr: a key groupby keeps (nan would drop it)
    runs = runs.assign(lr=runs["lr"].fillna(0.0))
    grouped = runs.groupby([*CELL, "lr"], sort=False)
    summary = grouped.agg(
        sparsity=("sparsity", "mean"),
        perplexity=("perplexity", "mean"),
        perplexity_std=("perplexity", "std"),
        val_perplexity=("val_perplexity", "mean"),
        val_perplexity_std=("val_perplexity", "std"),
        n=("perplexity", "size"),
        train_tokens=("train_tokens", "mean"),
        train_flops=("train_flops", "mean"),
        seconds=("seconds", "mean"),
        **{column: (column, "mean") for column in task_columns(runs)},
    ).reset_index()
    summary["lr"] = summary["lr"].replace(0.0, math.nan)
    if task_columns(runs):
        summary["accuracy"] = summary[task_columns(runs)].mean(axis=1)  # over tasks, as the papers average
    dense = summary.loc[summary["kind"] == "dense", "perplexity"]
    base = float(dense.iloc[0]) if len(dense) else math.nan
    summary["vs_dense_pct"] = change_pct(summary["perplexity"], base)
    return _ordered(select_lrs(summary))


def select_lrs(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method, target and recovery loss, the learning rate with the lowest mean validation perplexity over
    the seeds is `selected` (never the test split's); with one lr it is the one. Also per row: `lrs_tried`, and
    `lr_at_edge` when the selected lr is the smallest or largest of several (the optimum may lie outside), and
    `sweep_train_tokens`, the tokens the whole sweep spent on the cell (every lr, every seed)."""
    summary = summary.assign(selected=True, lrs_tried=1, lr_at_edge=False)
    summary["sweep_train_tokens"] = summary["train_tokens"] * summary["n"]
    trained = summary["kind"] == "trained"
    for _, group in summary[trained].groupby(CELL, sort=False):
        rates = sorted(group["lr"].dropna())
        summary.loc[group.index, "lrs_tried"] = len(rates)
        summary.loc[group.index, "sweep_train_tokens"] = float((group["train_tokens"] * group["n"]).sum())
        if len(group) < 2:
            continue
        best = group["val_perplexity"].idxmin() if group["val_perplexity"].notna().all() else None
        summary.loc[group.index, "selected"] = group.index == best
        if best is not None and summary.loc[best, "lr"] in (rates[0], rates[-1]):
            summary.loc[best, "lr_at_edge"] = True
    return summary
