"""Where pruning step by step pays: the crossover map over sparsity and training budget.

For each target sparsity and budget of a grid swept over `--budgets`, the best one-shot method + training is
set against the best step-by-step method (over its criteria and step sizes), each chosen on the validation
split (mean over seeds, at the lr the sweep selected for it), never on the test split. A step size that reaches
the target in one step (0.5 at 50%) is not step by step: that cell prunes once and then trains, the one-shot +
training cell of its criterion under another name (their numbers are equal), so it is not a candidate. The
map's number is their paired difference of test perplexity over the seeds, one-shot + training minus
iterative: positive where iterating pays, with its 95% t-interval and on how many seeds iterative was the
better. Where the interval holds 0 the two are not told apart: a tie.

The same map per criterion (`criterion_maps`) sets each criterion at once + training against that criterion
step by step (magnitude+ft against iterative, sparsegpt+ft against iterative-sparsegpt): it separates what
pruning step by step is worth from what a better criterion is worth, which the map above mixes.
"""

from __future__ import annotations

import math

import pandas as pd

from ..axes import ROW_AXES, cell_name
from ..methods import CRITERION_NAMES, METHODS, criterion, criterion_of
from ..schedules import iterations_to_reach
from .numbers import tokens_text
from .paired import paired_difference
from .results import runs_of_row

ONE_SHOT, ITERATIVE = "one-shot + ft", "iterative"
COLUMNS = [
    "target_sparsity",
    "budget",
    "one_shot",
    "iterative",
    "step",
    "difference",
    "low",
    "high",
    "iterative_better",
    "seeds",
    "verdict",
]
# a map cell is one place on every row axis but these: the methods and step sizes it chooses among
CHOSEN_AMONG = {"method", "kind", "prune_percentage"}


def family(method: str) -> str | None:
    """ITERATIVE for a method that prunes step by step, ONE_SHOT for one that prunes once and then trains; None
    for the rest (dense+ft, the untrained cells, the random control)."""
    entry = METHODS.get(method)
    if entry is None or entry.kind != "trained" or not entry.prunes or entry.control:
        return None
    return ITERATIVE if entry.prunes_step_by_step else ONE_SHOT


def _in_one_step(row) -> bool:
    """A step-by-step cell whose step size reaches its target in one step (nan: a grid with one step size,
    checked when it was planned)."""
    step = row["prune_percentage"]
    return not pd.isna(step) and iterations_to_reach(row["target_sparsity"], step) <= 1


def verdict(paired) -> str:
    """Which side the interval is on: iterative, one-shot + ft, a tie (it holds 0), or unknown with one seed."""
    if paired.seeds < 2:
        return "unknown (one seed)"
    if paired.low > 0:
        return ITERATIVE
    if paired.high < 0:
        return ONE_SHOT
    return "tie"


def _best(rows: pd.DataFrame):
    """The row with the lowest mean validation perplexity (None if any is unmeasured: never the test split)."""
    if rows.empty or rows["val_perplexity"].isna().any():
        return None
    return rows.loc[rows["val_perplexity"].idxmin()]


def crossover_map(summary: pd.DataFrame, runs: pd.DataFrame, by_criterion: str | None = None) -> pd.DataFrame:
    """One row per (target, budget) of the selected summary (`summary`: one row per cell at its selected lr) and
    the runs of those cells: COLUMNS, ordered by budget then target. With `by_criterion`, only the methods that
    prune by that criterion take part."""
    if "budget" not in summary:
        return pd.DataFrame(columns=COLUMNS)
    trained = summary[(summary["kind"] == "trained") & summary["budget"].notna()]
    if by_criterion is not None:
        trained = trained[trained["method"].map(criterion_of) == by_criterion]
    trained = trained.assign(_family=trained["method"].map(family))
    trained = trained[(trained["_family"] != ITERATIVE) | ~trained.apply(_in_one_step, axis=1)]
    place = [name for name in ROW_AXES if name not in CHOSEN_AMONG]
    rows = []
    for _, group in trained.groupby(place, sort=False, dropna=False):
        one_shot, iterative = (_best(group[group["_family"] == side]) for side in (ONE_SHOT, ITERATIVE))
        if one_shot is None or iterative is None:
            continue
        paired = paired_difference(runs_of_row(runs, iterative), runs_of_row(runs, one_shot))
        if paired is None:
            continue
        rows.append(
            {
                "target_sparsity": iterative["target_sparsity"],
                "budget": int(iterative["budget"]),
                "one_shot": cell_name(one_shot.drop(["budget"])),
                "iterative": cell_name(iterative.drop(["budget", "prune_percentage"])),
                "step": iterative["prune_percentage"],
                "difference": paired.mean,
                "low": paired.low,
                "high": paired.high,
                "iterative_better": paired.better,
                "seeds": paired.seeds,
                "verdict": verdict(paired),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["budget", "target_sparsity"]).reset_index(drop=True)


def criterion_maps(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The map once per criterion that the grid ran both at once + training and step by step: COLUMNS after a
    `criterion` column, in the registry's order of criteria."""
    maps = [crossover_map(summary, runs, name).assign(criterion=name) for name in CRITERION_NAMES]
    maps = [table for table in maps if not table.empty]
    if not maps:
        return pd.DataFrame(columns=["criterion", *COLUMNS])
    return pd.concat(maps, ignore_index=True)[["criterion", *COLUMNS]]


def _side(difference: float) -> str:
    return ITERATIVE if difference > 0 else ONE_SHOT


def _percents(targets) -> str:
    return ", ".join(f"{t:.0%}" for t in targets)


def _verdicts(rows: pd.DataFrame) -> str:
    """What the intervals say along the sparsities, neighbours with one verdict together: "one-shot + ft is ahead
    at 50%, 70%, the two tie at 80%, iterative is ahead at 90%"."""
    groups: list[tuple[str, list]] = []
    for target, said in zip(rows["target_sparsity"], rows["verdict"]):
        if groups and groups[-1][0] == said:
            groups[-1][1].append(target)
        else:
            groups.append((said, [target]))
    phrases = {ITERATIVE: f"{ITERATIVE} is ahead at", ONE_SHOT: f"{ONE_SHOT} is ahead at", "tie": "the two tie at"}
    return ", ".join(f"{phrases.get(said, said + ' at')} {_percents(targets)}" for said, targets in groups)


def crossover_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per budget: where each side is ahead and where the two tie by the 95% intervals, then between
    which sparsities the sign of the mean difference changes (from which side to which), or that it does not
    change in the measured range. A tie is never called a lead."""
    sentences = []
    for budget, rows in table.groupby("budget", sort=True):
        rows = rows.sort_values("target_sparsity")
        targets, sides = list(rows["target_sparsity"]), [_side(d) for d in rows["difference"]]
        said = f"At {tokens_text(budget)} training tokens per cell, by the 95% intervals {_verdicts(rows)}"
        changes = [k for k in range(1, len(sides)) if sides[k] != sides[k - 1]]
        if not changes:
            where = (
                f"at the one measured sparsity ({targets[0]:.0%})"
                if len(targets) == 1
                else f"at every measured sparsity ({targets[0]:.0%} to {targets[-1]:.0%})"
            )
            sentences.append(
                f"{said}; by the means {sides[0]} is ahead {where}: the sign does not change in the measured range."
            )
            continue
        flips = [f"between {targets[k - 1]:.0%} and {targets[k]:.0%} (to {sides[k]})" for k in changes]
        sentences.append(f"{said}; by the means the sign changes {', '.join(flips)}.")
    return sentences


def criterion_sentences(table: pd.DataFrame) -> list[str]:
    """crossover_sentences for each criterion of `criterion_maps`, each under its criterion's name."""
    return [
        f"{criterion(name).display}: {sentence[0].lower()}{sentence[1:]}"
        for name, rows in table.groupby("criterion", sort=False)
        for sentence in crossover_sentences(rows)
    ]


def map_table(table: pd.DataFrame) -> pd.DataFrame:
    """The map as the report prints it (a map per criterion with its criterion first)."""

    def interval(row) -> str:
        return "-" if math.isnan(row["low"]) else f"{row['low']:+.2f} to {row['high']:+.2f}"

    named = {"Criterion": [criterion(name).display for name in table["criterion"]]} if "criterion" in table else {}
    return pd.DataFrame(
        {
            **named,
            "Budget": [tokens_text(b) for b in table["budget"]],
            "Sparsity": [f"{t:.0%}" for t in table["target_sparsity"]],
            "One-shot + FT (best)": list(table["one_shot"]),
            "Iterative (best)": list(table["iterative"]),
            "Step": [f"{s:g}" for s in table["step"]],
            "One-shot minus iterative": [f"{d:+.2f}" for d in table["difference"]],
            "95% interval": [interval(row) for _, row in table.iterrows()],
            "Iterative better": [f"{b} of {n}" for b, n in zip(table["iterative_better"], table["seeds"])],
            "Verdict": list(table["verdict"]),
        }
    )
