"""The report as Markdown with PNGs and as one self-contained HTML page, and its MLflow run."""

from __future__ import annotations

import base64
import html
import math
import os
import platform
import re
from pathlib import Path

import mlflow
import pandas as pd
import torch
import transformers

from .. import __version__
from ..axes import ROW_AXES, SELECTION_AXES, display_name, is_plain
from ..errors import UserError
from ..machine import cpu_model
from ..methods import methods_where
from ..tracking.models import logged_models
from .crossover import criterion_maps, criterion_sentences, crossover_map, crossover_sentences, map_table
from .findings import findings
from .numbers import markdown_table, tokens_text
from .plots import (
    accuracy_vs_sparsity,
    budget_curves,
    crossover_heatmap,
    iterative_curves,
    layer_sparsities,
    lr_sensitivity,
    perplexity_vs_budget,
    perplexity_vs_sparsity,
)
from .recovery_modes import MODES_READING, modes_sentences, modes_table, recovery_modes
from .results import collect_runs, planned_lrs, runs_of_row, save_tables, summarize


def _labels(rows: pd.DataFrame) -> list:
    """Each row's method as the tables show it: `SparseGPT + FT [logits]`."""
    return [display_name(row) for _, row in rows.iterrows()]


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


def model_links(summary: pd.DataFrame, runs: pd.DataFrame, experiment_id: str) -> dict:
    """A "Model" column: for each row, a link to the logged model of each of its runs (the final one of a
    run that logged several); none when no run logged one (a store of an older version, --log-models none)."""
    models = logged_models(experiment_id)
    if models.empty:
        return {}
    iteration = pd.to_numeric(models["iteration"], errors="coerce").fillna(0)
    final = models.assign(_iteration=iteration).sort_values("_iteration").groupby("run_id")["model_id"].last()
    links = []
    for _, row in summary.iterrows():
        found = [final[r] for r in runs_of_row(runs, row)["run_id"] if r in final.index]
        links.append(" ".join(f"[{m[:10]}](models:/{m})" for m in found) or "-")
    return {"Model": links}


def main_table(summary: pd.DataFrame, models: dict | None = None) -> pd.DataFrame:
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
            **(models or {}),
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

    def keys(table: pd.DataFrame) -> list:
        # an axis a cell is not on is nan (no lr, no budget), and nan equals nothing: -1 stands for it
        return list(zip(*[table[c].fillna(-1) for c in ROW_AXES + SELECTION_AXES]))

    chosen_keys = set(keys(chosen))
    keep = [key in chosen_keys for key in keys(runs)]
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


def trained_budgets(summary: pd.DataFrame, target: float) -> list:
    """The budgets of the trained cells at a target: [nan] for a grid without --budgets (one budget then)."""
    rows = summary[(summary["kind"] == "trained") & (summary["target_sparsity"] == target)]
    given = sorted(rows["budget"].dropna().unique())
    return given + ([math.nan] if rows["budget"].isna().any() else [])


def _budget_words(budget: float) -> str:
    return "" if pd.isna(budget) else f", {tokens_text(budget)} training tokens per cell"


def _budget_id(target: float, budget: float) -> str:
    return f"budget-{round(target * 100)}" + ("" if pd.isna(budget) else f"-{int(budget)}")


def crossover_blocks(summary: pd.DataFrame, runs: pd.DataFrame, out: Path) -> list:
    """Where a grid swept budgets: the crossover map (crossover.csv beside the report), its reading per budget,
    the map as a figure and perplexity against the budget; then the map per criterion (crossover_by_criterion.csv)
    where the grid ran a criterion both at once + training and step by step."""
    table = crossover_map(summary, runs)
    if table.empty:
        return []
    table.to_csv(out / "crossover.csv", index=False)
    blocks = [
        ("h2", "Where iterating pays: best one-shot + FT minus best iterative"),
        ("p", CROSSOVER_READING),
        ("table", (map_table(table), "crossover")),
        ("list", crossover_sentences(table)),
        ("images", [*crossover_heatmap(table, out), *perplexity_vs_budget(summary, out)]),
    ]
    by_criterion = criterion_maps(summary, runs)
    if by_criterion.empty:
        return blocks
    by_criterion.to_csv(out / "crossover_by_criterion.csv", index=False)
    return [
        *blocks,
        ("h2", "The same criterion at once or step by step: X + FT minus iterative X"),
        ("p", CRITERION_READING),
        ("table", (map_table(by_criterion), "crossover-by-criterion")),
        ("list", criterion_sentences(by_criterion)),
    ]


def recovery_mode_blocks(summary: pd.DataFrame, runs: pd.DataFrame, out: Path) -> list:
    """Where a grid ran more than one way of recovering: every mode against the plain one (recovery_modes.csv
    beside the report) and its reading."""
    table = recovery_modes(summary, runs)
    if table.empty:
        return []
    table.to_csv(out / "recovery_modes.csv", index=False)
    return [
        ("h2", "Recovery modes, each at its own learning rate, paired against training every parameter"),
        ("p", MODES_READING),
        ("table", (modes_table(table), "recovery-modes")),
        ("list", modes_sentences(table)),
    ]


CROSSOVER_READING = (
    "At each sparsity and budget, the best one-shot method + training and the best step-by-step method (over its "
    "criteria and step sizes), each chosen on the mean validation perplexity at its selected lr; the number is "
    "their paired difference of test perplexity over the seeds, one-shot + FT minus iterative: positive where "
    "iterating pays. Where the 95% t-interval holds 0 the two are a tie. A step size that reaches the target in "
    "one step (0.5 at 50%) is no candidate: that cell prunes once and trains, the one-shot + FT cell of its "
    "criterion."
)

CRITERION_READING = (
    "The map again, each criterion against itself: the best cell that prunes by it once and then trains against "
    "the best that prunes by it step by step (over the step sizes), chosen on validation as above. Where the map "
    "above sets a calibrated criterion step by step against another at once, this separates what iterating is "
    "worth from what the criterion is worth."
)


def equal_budget_table(summary: pd.DataFrame, target: float, budget: float = math.nan) -> pd.DataFrame:
    """The trained cells at one sparsity and one budget, so their perplexities compare."""
    rows = summary[(summary["kind"] == "trained") & (summary["target_sparsity"] == target)]
    rows = rows[rows["budget"].isna() if pd.isna(budget) else rows["budget"] == budget]
    prunes = pd.Series(methods_where(rows["method"], "prunes"), index=rows.index, dtype=bool)
    plain = pd.Series([is_plain(row) for _, row in rows.iterrows()], index=rows.index, dtype=bool)
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


MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _html_cell(value) -> str:
    """A table cell's text, its Markdown links (a logged model's) as HTML links."""
    escaped = html.escape(str(value))
    return MARKDOWN_LINK.sub(lambda link: f'<a href="{link[2]}">{link[1]}</a>', escaped)


def _html_table(frame: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)
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


# The report is one list of blocks, written twice: as Markdown beside its PNGs and as one HTML page that
# embeds them. A block is (kind, content): ("h1" | "h2" | "p", text), ("list", sentences),
# ("table", (frame, its HTML id)) or ("images", paths).


def _markdown(kind: str, content) -> str:
    if kind == "table":
        return markdown_table(content[0])
    if kind == "images":
        return "\n".join(f"![{path.stem}]({path.name})" for path in content)
    if kind == "list":
        return "\n".join(f"- {sentence}" for sentence in content)
    return {"h1": "# ", "h2": "## ", "p": ""}[kind] + content


def _html(kind: str, content) -> str:
    if kind == "table":
        return _html_table(*content)
    if kind == "images":
        return "".join(
            f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
            for path in content
        )
    if kind == "list":
        return "<ul>" + "".join(f"<li>{html.escape(sentence)}</li>" for sentence in content) + "</ul>"
    return f"<{kind}>{html.escape(content)}</{kind}>"


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.3em .8em;text-align:right}} img{{max-width:100%;display:block;margin:1em 0}}</style>
</head><body>
{body}
</body></html>
"""


def report_blocks(experiment_id: str, out: Path, keys: set | None = None) -> list:
    """The report's blocks, its figures drawn into `out`: the main table and the sentences, one equal-budget
    section per target, the learning rates of a sweep, the overview figures and the footer."""
    runs = collect_runs(experiment_id, keys)
    if runs.empty:
        raise UserError("this experiment holds no finished comparison runs: run `python -m pipeline compare` first")
    every_lr, every_cell = summarize(runs), runs
    save_tables(runs, every_lr, out)  # the report's numbers beside it, whichever grids made them
    wall_seconds = runs["seconds"].sum()  # every cell the grid ran, at every lr, not only the selected ones
    summary, runs = selected(runs, every_lr)  # a sweep's selected cells; every cell of a grid without one
    targets = sorted(summary.loc[summary["kind"] == "trained", "target_sparsity"].unique())
    budgets = dict(zip(targets, budget_curves(runs, summary, out)))
    sensitivity = lr_sensitivity(every_lr, out)
    overview = [perplexity_vs_sparsity(summary, out), *accuracy_vs_sparsity(summary, out)]
    overview += [*iterative_curves(runs, out), *layer_sparsities(runs, out)]
    blocks = [
        ("h1", f"Pruning comparison: {mlflow.get_experiment(experiment_id).name}"),
        ("table", (main_table(summary, model_links(summary, runs, experiment_id)), "results")),
        ("list", findings(summary, runs, planned_lrs(experiment_id), every_lr)),
        *crossover_blocks(summary, runs, out),
        *recovery_mode_blocks(summary, runs, out),
    ]
    for target in targets:
        for budget in trained_budgets(summary, target):
            blocks += [
                ("h2", f"Equal training budget at {target:.0%} sparsity{_budget_words(budget)}"),
                ("table", (equal_budget_table(summary, target, budget), _budget_id(target, budget))),
            ]
        blocks += [("images", [budgets[target]])]
    if sensitivity:
        blocks += [
            ("h2", "Learning rates (selected on the validation split)"),
            ("table", (tuning_table(every_lr), "learning-rates")),
            ("images", sensitivity),
        ]
    footer = _footer(wall_seconds, len(every_cell), summary["lr_at_edge"].any())
    return blocks + [("images", overview), ("p", footer)]


def _footer(wall_seconds: float, cells: int, lr_at_edge: bool) -> str:
    return (
        f"Measured on {_environment()}. Wall time of all {cells} cells: {_duration(wall_seconds)}. "
        "Perplexity as the SparseGPT reference computes it; ± is one standard deviation over seeds; "
        "train tokens are those that went into optimizer steps; Time is each cell's own wall time (a cell stopped "
        "and resumed: its processes' time, not the time between)."
        + (" lr*: the selected learning rate is at the edge of the swept grid." if lr_at_edge else "")
    )


def write_report(experiment_id: str, out: Path, keys: set | None = None) -> Path:
    """`report.md` (beside its figures) and a self-contained `report.html` in `out`, from the same blocks."""
    blocks = report_blocks(experiment_id, out, keys)
    (out / "report.md").write_text("\n\n".join(_markdown(*block) for block in blocks) + "\n")
    page = PAGE.format(title=html.escape(blocks[0][1]), body="\n".join(_html(*block) for block in blocks))
    (out / "report.html").write_text(page)
    return out / "report.md"
