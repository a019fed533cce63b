"""The runs of a comparison grid as a table, one row per run, and summarized over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from ..axes import AXES, COLUMNS, ROW_AXES, SELECTION_AXES, sort_keys
from ..methods import BASELINE, METHODS
from ..tracking.store import finished_cell_runs
from .numbers import change_pct

MEASURES = [
    "sparsity",
    "perplexity",
    "val_perplexity",
    "train_tokens",
    "train_flops",
    "trained_parameters",
    "peak_memory_bytes",
    "seconds",
    "run_id",
]
RUN_COLUMNS = COLUMNS + MEASURES  # a cell's place on every axis, then what it measured


def _row(run) -> dict:
    """The run's place on every axis and its numbers; `acc:<task>` for every zero-shot task it ran."""
    values = {axis.name: axis.read(run) for axis in AXES}
    metrics = run.data.metrics
    if values["kind"] == "dense":
        values["method"] = BASELINE
        sparsity, ppl = 0.0, metrics["perplexity"]
    elif values["kind"] == "trained":
        sparsity, ppl = metrics["final_sparsity"], metrics["final_perplexity"]
    else:
        sparsity, ppl = metrics["sparsity"], metrics["perplexity"]
    return {
        **values,
        "sparsity": sparsity,
        "perplexity": ppl,
        "val_perplexity": metrics.get("final_val_perplexity", math.nan),
        "train_tokens": int(metrics.get("train_tokens", 0)),
        "train_flops": metrics.get("train_flops", 0.0),
        # what the recovery trained and its peak memory (runs of older versions did not log the peak)
        "trained_parameters": metrics.get("trained_parameters", math.nan),
        "peak_memory_bytes": metrics.get("peak_memory_bytes", math.nan),
        # a trained cell's own seconds (a stopped and resumed one's wall time holds the stop); else the wall time
        "seconds": metrics.get("cell_seconds", (run.info.end_time - run.info.start_time) / 1000.0),
        "run_id": run.info.run_id,
        **{
            f"acc:{key.split('/')[1]}": value
            for key, value in metrics.items()
            if key.startswith("task/") and key.endswith("/acc")
        },
    }


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """The report's order: by each axis in its rank (pattern, target, kind, recovery, method, lr, seed)."""
    by, helpers = sort_keys(table)
    return table.assign(**helpers).sort_values(by).drop(columns=list(helpers)).reset_index(drop=True)


def collect_runs(experiment_id: str, keys: set | None = None) -> pd.DataFrame:
    """One row per finished cell run of the experiment (of the cells in `keys`, if given)."""
    rows = [_row(run) for run in finished_cell_runs(experiment_id, keys).values()]
    tasks = sorted({key for row in rows for key in row if key.startswith("acc:")})
    table = pd.DataFrame(rows, columns=RUN_COLUMNS + tasks)
    return table if table.empty else _ordered(_unpruned_at_every_target(table))


def _unpruned_at_every_target(table: pd.DataFrame) -> pd.DataFrame:
    """Under a budget a trained cell that prunes nothing (dense+ft) is one cell whatever the target (the grid
    plans it once), so its run is read at every target the pruned trained cells have at that budget: a row
    for each, with its run id, where that target has no run of its own at that place on the other axes."""
    trained = (table["kind"] == "trained") & table["budget"].notna()
    unpruned = trained & ~table["method"].map(lambda name: METHODS[name].prunes if name in METHODS else True)
    if not unpruned.any():
        return table
    targets = table[trained & ~unpruned].groupby("budget")["target_sparsity"].unique()
    axes = [name for name in ROW_AXES + SELECTION_AXES + ["seed"] if name != "target_sparsity"]

    def place(row, target) -> tuple:
        return (target, *(None if pd.isna(row[name]) else row[name] for name in axes))

    taken = {place(row, row["target_sparsity"]) for _, row in table[unpruned].iterrows()}
    copies = [
        row.to_frame().T.assign(target_sparsity=target)
        for _, row in table[unpruned].iterrows()
        for target in targets.get(row["budget"], [])
        if place(row, target) not in taken
    ]
    return pd.concat([table, *copies], ignore_index=True).astype(table.dtypes.to_dict()) if copies else table


def save_tables(runs: pd.DataFrame, summary: pd.DataFrame, out: Path) -> None:
    """compare.csv (one row per run) and summary.csv (over seeds, every lr) into `out`: the numbers a report
    is made from, beside it."""
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "compare.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)


def _floats(text: str | None) -> list[float] | None:
    """A list parameter as a run logged it, `[0.5, 0.9]` by the grid or `0.5,0.9` by `mlflow run`'s own -P; None
    when absent or not numbers (`none`)."""
    if not text:
        return None
    try:
        return [float(part) for part in text.strip("[]()").split(",") if part.strip()]
    except ValueError:
        return None


def planned_lrs(experiment_id: str) -> dict:
    """Per target sparsity, every learning rate the experiment's grids were asked to sweep there (their compare
    runs' `lrs` at their `sparsities`): what a report of cells that have not all finished (a shard, a failed
    cell) measures its sweep against. A grid extended at one target by another lr plans it at that target only;
    a run that names no targets plans its lrs at every one (None)."""
    planned: dict = {}
    for run in MlflowClient().search_runs([experiment_id], "tags.kind = 'compare'", max_results=1000):
        rates = set(_floats(run.data.params.get("lrs")) or [])
        for target in _floats(run.data.params.get("sparsities")) or [None]:
            planned.setdefault(None if target is None else round(target, 4), set()).update(rates)
    return {target: sorted(rates) for target, rates in planned.items()}


def runs_of_row(runs: pd.DataFrame, row) -> pd.DataFrame:
    """The runs of a summary row's cell: the same place on every axis of a row and the selection (none where the
    row has none: an untrained cell has no lr, a cell outside a budget sweep no budget)."""
    same = pd.Series(True, index=runs.index)
    for name in ROW_AXES + SELECTION_AXES:
        if name in row:
            same &= runs[name].isna() if pd.isna(row[name]) else runs[name] == row[name]
    return runs[same]


def task_columns(table: pd.DataFrame) -> list:
    return [column for column in table.columns if column.startswith("acc:")]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method, target and learning rate: perplexity (test and validation) mean, std over seeds
    (nan for one run) and n; the budget; the mean wall time; the change against the dense model's
    perplexity; and which lr is selected (select_lrs)."""
    if runs.empty:
        return runs.assign(perplexity_std=[], n=[], vs_dense_pct=[], selected=[])
    # an untrained cell has no lr: a key groupby keeps (nan would drop it)
    runs = runs.assign(lr=runs["lr"].fillna(0.0))
    grouped = runs.groupby([*ROW_AXES, *SELECTION_AXES], sort=False, dropna=False)
    summary = grouped.agg(
        sparsity=("sparsity", "mean"),
        perplexity=("perplexity", "mean"),
        perplexity_std=("perplexity", "std"),
        val_perplexity=("val_perplexity", "mean"),
        val_perplexity_std=("val_perplexity", "std"),
        n=("perplexity", "size"),
        train_tokens=("train_tokens", "mean"),
        train_flops=("train_flops", "mean"),
        trained_parameters=("trained_parameters", "mean"),
        peak_memory_bytes=("peak_memory_bytes", "mean"),
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
    for _, group in summary[trained].groupby(ROW_AXES, sort=False, dropna=False):
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
