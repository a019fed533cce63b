"""The report as Markdown with PNGs and as one self-contained HTML page, and its MLflow run."""

from __future__ import annotations

import base64
import html
import os
import platform
from pathlib import Path

import mlflow
import pandas as pd
import torch
import transformers

from .. import __version__
from ..errors import UserError
from ..machine import cpu_model
from ..methods import label, methods_where
from .findings import findings
from .numbers import tokens_text
from .plots import (
    accuracy_vs_sparsity,
    budget_curves,
    iterative_curves,
    layer_sparsities,
    lr_sensitivity,
    perplexity_vs_sparsity,
)
from .results import CELL, collect_runs, summarize


def _labels(rows: pd.DataFrame) -> list:
    """Each row's method as the tables show it: `SparseGPT + FT [logits]`."""
    return [label(m, d, t) for m, d, t in zip(rows["method"], rows["distill"], rows["train_params"])]


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _perplexity(row) -> str:
    return f"{row['perplexity']:.2f}" + (f" ± {row['perplexity_std']:.2f}" if row["n"] > 1 else "")


def main_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every method at every sparsity: perplexity, n, the change against dense, the budget, the time, the accuracy; with n and the training budget."""
    dense = [k == "dense" for k in summary["kind"]]
    return pd.DataFrame(
        {
            "Method": _labels(summary),
            "Sparsity": [
                f"{s:.0%}" if p == "unstructured" else p for s, p in zip(summary["sparsity"], summary["pattern"])
            ],
            "Perplexity": [_perplexity(row) for _, row in summary.iterrows()],
            "n": list(summary["n"]),
            "vs dense": ["-" if d else f"{v:+.1f}%" for d, v in zip(dense, summary["vs_dense_pct"])],
            "Train tokens": [tokens_text(t) for t in summary["train_tokens"]],
            **_lr_column(summary),
            "Time": ["-" if d else _duration(t) for d, t in zip(dense, summary["seconds"])],
            **_accuracy_columns(summary),
        }
    )


def _lr_column(summary: pd.DataFrame) -> dict:
    """The trained cells' learning rate (the selected one, * at the edge of a sweep's grid)."""
    if "lr" not in summary or summary["lr"].isna().all():
        return {}
    return {
        "lr": [
            "-" if pd.isna(lr) else f"{lr:g}" + ("*" if edge else "")
            for lr, edge in zip(summary["lr"], summary.get("lr_at_edge", [False] * len(summary)))
        ]
    }


def selected(runs: pd.DataFrame, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary's selected rows, and the runs of those cells (an untrained cell is always selected)."""
    chosen = summary[summary["selected"]].reset_index(drop=True)
    keys = set(zip(*[chosen[c] for c in CELL], chosen["lr"].fillna(0.0)))
    keep = [key in keys for key in zip(*[runs[c] for c in CELL], runs["lr"].fillna(0.0))]
    return chosen, runs[keep].reset_index(drop=True)


def tuning_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every trained cell of a sweep at every lr: validation and test perplexity, which lr was selected."""
    rows = summary[(summary["kind"] == "trained") & (summary["lrs_tried"] > 1)]
    return pd.DataFrame(
        {
            "Method": _labels(rows),
            "Sparsity": [f"{t:.0%}" for t in rows["target_sparsity"]],
            "lr": [f"{lr:g}" for lr in rows["lr"]],
            "Validation": [
                f"{v:.2f}" + (f" ± {sd:.2f}" if n > 1 else "")
                for v, sd, n in zip(rows["val_perplexity"], rows["val_perplexity_std"], rows["n"])
            ],
            "Test": [_perplexity(row) for _, row in rows.iterrows()],
            "n": list(rows["n"]),
            "Selected": ["yes" if chosen else "" for chosen in rows["selected"]],
        }
    )


def _accuracy_columns(summary: pd.DataFrame) -> dict:
    """The mean zero-shot accuracy over tasks, then each task's, when the cells ran tasks."""
    if "accuracy" not in summary:
        return {}
    columns = {"Accuracy": [_percent(v) for v in summary["accuracy"]]}
    tasks = [c for c in summary.columns if c.startswith("acc:")]
    if len(tasks) > 1:
        columns.update({c.split(":", 1)[1]: [_percent(v) for v in summary[c]] for c in tasks})
    return columns


def _percent(value) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.1f}%"


def equal_budget_table(summary: pd.DataFrame, target: float) -> pd.DataFrame:
    """The trained cells at one sparsity: one budget, so their perplexities compare."""
    rows = summary[(summary["kind"] == "trained") & (summary["target_sparsity"] == target)]
    prunes = pd.Series(methods_where(rows["method"], "prunes"), index=rows.index, dtype=bool)
    plain = (rows["distill"] == "none") & (rows["train_params"] == "all")
    control = rows.loc[~prunes & plain, "perplexity"]  # the unpruned model, trained as long
    return pd.DataFrame(
        {
            "Method": _labels(rows),
            "Sparsity": [f"{s:.0%}" for s in rows["sparsity"]],
            "Perplexity": [_perplexity(row) for _, row in rows.iterrows()],
            "n": list(rows["n"]),
            "vs dense": [f"{v:+.1f}%" for v in rows["vs_dense_pct"]],
            "vs dense+ft": (
                [f"{100 * (p - control.iloc[0]) / control.iloc[0]:+.1f}%" for p in rows["perplexity"]]
                if len(control)
                else ["-"] * len(rows)
            ),
            "Train tokens": [tokens_text(t) for t in rows["train_tokens"]],
            **_lr_column(rows),
            **_accuracy_columns(rows),
        }
    )


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown would add the tabulate dependency for this)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _environment() -> str:
    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu_model()}, {os.cpu_count()} cores)"
    )
    return (
        f"{device}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, mlflow {mlflow.__version__}, pipeline {__version__}"
    )


def write_report(experiment_id: str, out: Path, keys: set | None = None) -> Path:
    runs = collect_runs(experiment_id, keys)
    if runs.empty:
        raise UserError("this experiment holds no finished comparison runs: run `python -m pipeline compare` first")
    out.mkdir(parents=True, exist_ok=True)
    every_lr = summarize(runs)
    wall_seconds = runs["seconds"].sum()  # every cell the grid ran, at every lr, not only the selected ones
    summary, runs = selected(runs, every_lr)  # a sweep's selected cells; every cell of a grid without one
    sentences = findings(summary, runs)
    targets = sorted(summary.loc[summary["kind"] == "trained", "target_sparsity"].unique())
    overview = [
        perplexity_vs_sparsity(summary, out),
        *accuracy_vs_sparsity(summary, out),
        *iterative_curves(runs, out),
        *layer_sparsities(runs, out),
    ]
    budgets = dict(zip(targets, budget_curves(runs, summary, out)))
    sensitivity = lr_sensitivity(every_lr, out)
    tuned = tuning_table(every_lr)
    name = mlflow.get_experiment(experiment_id).name
    footer = (
        f"Measured on {_environment()}. Wall time of all cells: {_duration(wall_seconds)}. "
        "Perplexity as the SparseGPT reference computes it; ± is one standard deviation over seeds; "
        "train tokens are those that went into optimizer steps; Time is each run's wall time."
        + (" lr*: the selected learning rate is at the edge of the swept grid." if summary["lr_at_edge"].any() else "")
    )

    md = [
        f"# Pruning comparison: {name}",
        "",
        markdown_table(main_table(summary)),
        "",
        *[f"- {s}" for s in sentences],
        "",
    ]
    for target in targets:
        md += [
            f"## Equal training budget at {target:.0%} sparsity",
            "",
            markdown_table(equal_budget_table(summary, target)),
            "",
            f"![{budgets[target].stem}]({budgets[target].name})",
            "",
        ]
    if sensitivity:
        md += [
            "## Learning rates (selected on the validation split)",
            "",
            markdown_table(tuned),
            "",
            *[f"![{p.stem}]({p.name})" for p in sensitivity],
            "",
        ]
    md += [*[f"![{p.stem}]({p.name})" for p in overview], "", footer]
    (out / "report.md").write_text("\n".join(md) + "\n")

    def image(path: Path) -> str:
        return f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'

    sections = "".join(
        f"<h2>Equal training budget at {target:.0%} sparsity</h2>"
        f"{_html_table(equal_budget_table(summary, target), f'budget-{round(target * 100)}')}"
        f"{image(budgets[target])}"
        for target in targets
    )
    if sensitivity:
        sections += (
            f"<h2>Learning rates (selected on the validation split)</h2>{_html_table(tuned, 'learning-rates')}"
            + "".join(image(p) for p in sensitivity)
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Pruning comparison: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.3em .8em;text-align:right}} img{{max-width:100%;display:block;margin:1em 0}}</style>
</head><body><h1>Pruning comparison: {html.escape(name)}</h1>
{_html_table(main_table(summary), "results")}
<ul>{"".join(f"<li>{html.escape(s)}</li>" for s in sentences)}</ul>
{sections}
{"".join(image(p) for p in overview)}
<p>{html.escape(footer)}</p>
</body></html>
"""
    (out / "report.html").write_text(page)
    return out / "report.md"
