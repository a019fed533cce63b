"""Recovery modes side by side: how a pruned model recovers, each way at its own learning rate, paired against
training every parameter.

A recovery mode is a trained cell's place on the plain-valued recovery axes (`--train-params`, `--recovery`,
`--distill`). For each method, sparsity and budget where a grid ran more than one mode, every mode at the lr the
sweep selected for it on the validation split is set against the plain mode (every parameter, language-model
loss): their paired difference of test perplexity over the seeds, the mode minus the plain one (negative: the
mode is better), its 95% t-interval and on how many seeds the mode was the better. Beside each: what the
optimizer trained (parameter elements) and the recovery's peak memory.
"""

from __future__ import annotations

import math

import pandas as pd

from ..axes import PLAIN_AXES, ROW_AXES, display_name, is_plain, recovery
from .numbers import tokens_text
from .paired import paired_difference
from .results import runs_of_row

MODE_AXES = [axis.name for axis in PLAIN_AXES]
COLUMNS = [
    "target_sparsity",
    "budget",
    "method",
    "mode",
    "lr",
    "lr_at_edge",
    "perplexity",
    "perplexity_std",
    "n",
    "trained_parameters",
    "peak_memory_bytes",
    "difference",
    "low",
    "high",
    "mode_better",
    "seeds",
    "verdict",
]
PLAIN = "plain"  # the mode column's word for training every parameter on the language-model loss


def verdict(paired) -> str:
    """Which side the interval is on: better or worse than the plain mode, or a tie (it holds 0)."""
    if paired is None:
        return "plain mode"
    if paired.seeds < 2:
        return "unknown (one seed)"
    if paired.high < 0:
        return "better"
    if paired.low > 0:
        return "worse"
    return "tie"


def recovery_modes(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """COLUMNS, one row per mode of every (method, place) that ran the plain mode and at least one other, from
    the selected summary (one row per cell at its selected lr) and the runs of those cells."""
    trained = summary[summary["kind"] == "trained"]
    place = [name for name in ROW_AXES if name not in MODE_AXES]
    rows = []
    for _, group in trained.groupby(place, sort=False, dropna=False):
        plain = group[[is_plain(row) for _, row in group.iterrows()]]
        if len(plain) != 1 or len(group) < 2:
            continue
        reference = runs_of_row(runs, plain.iloc[0])
        for _, row in group.iterrows():
            paired = None if is_plain(row) else paired_difference(reference, runs_of_row(runs, row))
            rows.append(
                {
                    "target_sparsity": row["target_sparsity"],
                    "budget": row["budget"],
                    "method": row["method"],
                    "mode": recovery({name: row[name] for name in MODE_AXES}).strip(" []") or PLAIN,
                    "lr": row["lr"],
                    "lr_at_edge": bool(row.get("lr_at_edge", False)),
                    "perplexity": row["perplexity"],
                    "perplexity_std": row["perplexity_std"],
                    "n": row["n"],
                    "trained_parameters": row["trained_parameters"],
                    "peak_memory_bytes": row["peak_memory_bytes"],
                    "difference": math.nan if paired is None else paired.mean,
                    "low": math.nan if paired is None else paired.low,
                    "high": math.nan if paired is None else paired.high,
                    # on how many seeds the mode's test perplexity was the lower
                    "mode_better": math.nan if paired is None else paired.seeds - paired.better,
                    "seeds": math.nan if paired is None else paired.seeds,
                    "verdict": verdict(paired),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _mib(value: float) -> str:
    return "-" if pd.isna(value) else f"{value / 2**20:,.0f} MiB"


def _elements(value: float) -> str:
    return "-" if pd.isna(value) else f"{value / 1e6:.3g} M" if value >= 1e6 else f"{value / 1e3:.3g} k"


def _lr(row) -> str:
    return f"{row['lr']:g}" + ("*" if row["lr_at_edge"] else "")


def _paired_text(row) -> str:
    if row["verdict"] == "plain mode":
        return "-"
    interval = "" if math.isnan(row["low"]) else f" ({row['low']:+.2f} to {row['high']:+.2f})"
    return f"{row['difference']:+.2f}{interval}"


def modes_table(table: pd.DataFrame) -> pd.DataFrame:
    """The modes as the report prints them."""
    return pd.DataFrame(
        {
            "Sparsity": [f"{t:.0%}" for t in table["target_sparsity"]],
            "Budget": ["-" if pd.isna(b) else tokens_text(b) for b in table["budget"]],
            "Method": [display_name({"method": m}) for m in table["method"]],
            "Recovery": list(table["mode"]),
            "lr": [_lr(row) for _, row in table.iterrows()],
            "Perplexity": [
                f"{p:.2f}" + (f" ± {sd:.2f}" if n > 1 else "")
                for p, sd, n in zip(table["perplexity"], table["perplexity_std"], table["n"])
            ],
            "Trained parameters": [_elements(v) for v in table["trained_parameters"]],
            "Peak memory": [_mib(v) for v in table["peak_memory_bytes"]],
            "Minus plain (95% interval)": [_paired_text(row) for _, row in table.iterrows()],
            "Better than plain": [
                "-" if row["verdict"] == "plain mode" else f"{row['mode_better']:.0f} of {row['seeds']:.0f}"
                for _, row in table.iterrows()
            ],
            "Verdict": list(table["verdict"]),
        }
    )


def modes_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per method, sparsity and budget: the plain mode, then each other mode's paired verdict, its
    trained parameters and peak memory against the plain mode's."""
    sentences = []
    for (target, budget, method), rows in table.groupby(
        ["target_sparsity", "budget", "method"], sort=True, dropna=False
    ):
        plain = rows[rows["verdict"] == "plain mode"].iloc[0]
        where = f"At {target:.0%}" + ("" if pd.isna(budget) else f" and {tokens_text(budget)} training tokens")
        parts = []
        for _, row in rows[rows["verdict"] != "plain mode"].iterrows():
            verdict_words = {
                "better": "better",
                "worse": "worse",
                "tie": "not told apart from it",
            }.get(row["verdict"], row["verdict"])
            memory = (
                ""
                if pd.isna(row["peak_memory_bytes"]) or pd.isna(plain["peak_memory_bytes"])
                else f", peak memory {_mib(row['peak_memory_bytes'])} vs {_mib(plain['peak_memory_bytes'])}"
            )
            parts.append(
                f"{row['mode']} (lr {_lr(row)}) reaches {row['perplexity']:.2f} and is {verdict_words} "
                f"({_paired_text(row)}, better on {row['mode_better']:.0f} of {row['seeds']:.0f} seeds; "
                f"{_elements(row['trained_parameters'])} trained parameters{memory})"
            )
        sentences.append(
            f"{where}, {display_name({'method': method})} trained in full (lr {_lr(plain)}) reaches "
            f"{plain['perplexity']:.2f} with {_elements(plain['trained_parameters'])} trained parameters; "
            + "; ".join(parts)
            + "."
        )
    return sentences


MODES_READING = (
    "Each way of recovering at the learning rate selected for it on the validation split, at the same training "
    "tokens, paired by seed against training every parameter on the language-model loss (the plain mode): the "
    "difference is the mode's test perplexity minus the plain mode's (negative: the mode is better); where the "
    "95% t-interval holds 0 the two are a tie. Trained parameters are the elements the optimizer updated; peak "
    "memory is the recovery's peak of live allocated bytes, the model and its data included (on a GPU the "
    "allocator's; on a CPU the C library's heap, the libraries' own included: compare rows with each other). "
    "lr*: the selected lr is at the edge of the swept grid."
)
