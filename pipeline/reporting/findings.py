"""Sentences computed from the summary: nothing in them is written in advance, and either method can win.

The question a comparison answers is which schedule gives the better sparse model for the same
training, so the verdict at each sparsity compares the trained cells (iterative and one-shot + training,
all with one budget, each at its own learning rate selected on the validation split when the grid swept
them), and says whether the gap is larger than the spread over seeds: larger when the two ± 1 std ranges
do not overlap, unknown with one seed. Paired by seed, it gives the mean difference with its 95%
t-interval and on how many seeds the better method was better. The recipe check says whether training
the unpruned model as long (dense+ft) damages it.
"""

from __future__ import annotations

import math

import pandas as pd

from ..axes import ROW_AXES, cell_name, is_plain
from ..methods import methods_where
from .numbers import change_pct, tokens_text
from .paired import paired_difference
from .results import runs_of_row


def _ppl(row) -> str:
    if row["n"] > 1 and not math.isnan(row["perplexity_std"]):
        return f"{row['perplexity']:.2f} ± {row['perplexity_std']:.2f} (n={row['n']})"
    return f"{row['perplexity']:.2f}"


def spread_verdict(winner, runner) -> str:
    if min(winner["n"], runner["n"]) < 2:
        return "with one seed the spread over seeds is unknown, so this gap may not be real (use --seeds 0,1,2)"
    gap = runner["perplexity"] - winner["perplexity"]
    spread = winner["perplexity_std"] + runner["perplexity_std"]
    if gap > spread:
        return (
            f"the gap is larger than the spread over seeds (the ± 1 std ranges, {spread:.2f} together, do not overlap)"
        )
    return (
        f"the gap is within the spread over seeds (± 1 std ranges of {spread:.2f} together overlap), so the "
        "two are not told apart"
    )


def _name(row) -> str:
    return cell_name(row)


def _named(row) -> str:
    """The cell's name, with its learning rate when it has one."""
    return _name(row) + (f" at lr {row['lr']:g}" if "lr" in row and not pd.isna(row["lr"]) else "")


def paired_verdict(winner, runner, runs: pd.DataFrame) -> str:
    paired = paired_difference(runs_of_row(runs, winner), runs_of_row(runs, runner))
    if paired is None or paired.seeds < 2:
        return ""
    return (
        f" Paired by seed, {_name(runner)} minus {_name(winner)} is {paired.mean:+.2f} (95% t-interval "
        f"{paired.low:+.2f} to {paired.high:+.2f}); {_name(winner)} is better on {paired.better} of {paired.seeds} "
        "seeds."
    )


def recipe_check(control, base: float, target: float) -> str:
    """Whether training the unpruned model as long (dense+ft, the recipe's control) made it worse than the
    untouched model, beyond the spread over seeds."""
    rate = f" at lr {control['lr']:g}" if not pd.isna(control.get("lr", math.nan)) else ""
    if control["n"] < 2:
        return (
            f"With one seed, whether the recovery recipe{rate} damages the unpruned model at the {target:.0%} budget "
            "is unknown."
        )
    if control["perplexity"] - base > control["perplexity_std"]:
        return (
            f"The recovery recipe{rate} damages the unpruned model: trained as long (the {target:.0%} budget) it ends "
            f"at {_ppl(control)}, worse than the untouched {base:.2f} beyond the spread over seeds."
        )
    return (
        f"The recovery recipe{rate} does not damage the unpruned model beyond the spread over seeds: trained as long "
        f"(the {target:.0%} budget) it ends at {_ppl(control)} against the untouched {base:.2f}."
    )


def missing_from_sweep(trained: pd.DataFrame, planned: dict) -> list[str]:
    """What has not finished in a sweep: per cell, the lrs planned at its target it has no run at, and the lrs
    where fewer seeds finished than at its best-covered one."""
    gaps = []
    for _, group in trained.groupby(ROW_AXES, sort=False, dropna=False):
        row, tried = group.iloc[0], set(group["lr"].dropna())
        missing = [f"{lr:g}" for lr in planned.get(round(row["target_sparsity"], 4), []) if lr not in tried]
        thin = [
            f"{r['lr']:g} ({r['n']} of {group['n'].max()} seeds)"
            for _, r in group.iterrows()
            if r["n"] < group["n"].max()
        ]
        if missing or thin:
            where = f"{_name(row)} at {row['target_sparsity']:.0%}"
            gaps.append(
                where
                + (f" has no run at lr {', '.join(missing)}" if missing else "")
                + (f"{' and' if missing else ''} has fewer seeds at lr {', '.join(thin)}" if thin else "")
            )
    return gaps


def sweep_plan(every_trained: pd.DataFrame, asked: dict | None) -> tuple[dict, list]:
    """Per target, the lrs the grids planned there (`asked`, per target, None: at every one), and the rates that
    ran past that plan: rungs of the lr ladder (--extend-lrs), each run only by the rows whose selection sat at an
    edge, so the other rows have no run there by design, not because the sweep stopped short."""
    asked = asked or {}
    everywhere = set(asked.get(None, []))
    planned, rungs = {}, set()
    for target, rates in every_trained.groupby("target_sparsity")["lr"]:
        target, ran = round(target, 4), set(rates.dropna())
        # a target no grid names (cells a grid did not plan): what ran there is all a report can measure it by
        planned[target] = sorted(set(asked.get(target, [])) | everywhere or ran)
        rungs |= ran - set(planned[target])
    return planned, sorted(rungs)


def listed(rates) -> str:
    """Learning rates as a report writes them."""
    return ", ".join(f"{lr:g}" for lr in rates)


def sweep_text(planned: dict, rungs: list) -> str:
    """The sweep as planned, and the ladder's rungs past it."""
    counts = sorted({len(rates) for rates in planned.values()})
    grid = (
        f"{counts[0]} per method, the same grid for each: {listed(planned[min(planned)])}"
        if len(set(map(tuple, planned.values()))) == 1
        else "per target: "
        + "; ".join(f"{target:.0%} {listed(rates)}" for target, rates in sorted(planned.items()))
        + "; at a target the same grid for each method"
    )
    if rungs:
        grid += (
            ", and past it, where a method's selection sat at an edge of the rates it tried, the next rungs of the "
            f"ladder for that method alone ({listed(rungs)})"
        )
    return grid


def tuning(summary: pd.DataFrame, planned: dict | None = None, every_lr: pd.DataFrame | None = None) -> list[str]:
    """What the learning rates were: one, not tuned; or a sweep (as planned, or as run), its cost, the
    selections at its edge, and what of it has not finished (its selection then is among what has).
    `summary`: the selected rows; `every_lr`: every row, at every lr (default: `summary`); `planned`: per target,
    the lrs the grids were asked to sweep there (None: at every target)."""
    every_lr = summary if every_lr is None else every_lr
    trained = summary[summary["kind"] == "trained"]
    if trained.empty:
        return []
    every_trained = every_lr[every_lr["kind"] == "trained"]
    planned, rungs = sweep_plan(every_trained, planned)
    every_rate = sorted(set(rungs).union(*planned.values()))
    if len(every_rate) <= 1:
        return [
            f"Every trained cell ran at one learning rate ({listed(every_rate) or 'its --lr'}), not tuned: "
            "a sweep (--lrs) gives each method its own, selected on the validation split."
        ]
    grid = sweep_text(planned, rungs)
    sentences = [
        f"Learning rates were swept ({grid}) and each method's selected on the mean validation perplexity over "
        "the seeds; tables and verdicts show the selected cells' test perplexity."
    ]
    gaps = missing_from_sweep(every_trained, planned)
    if gaps:
        sentences.append(
            "The sweep has not finished: " + "; ".join(gaps) + ". Those cells' lr is selected among the runs that "
            "finished, not over the whole sweep: run the grid's compare again to complete it."
        )
    for target, group in trained.groupby("target_sparsity", sort=True):
        cost = ", ".join(f"{_name(row)} {tokens_text(row['sweep_train_tokens'])}" for _, row in group.iterrows())
        budgets = sorted(group["train_tokens"].unique())  # several under --budgets: each cell trains its own
        each = (
            f"{tokens_text(budgets[0])} each"
            if len(budgets) == 1
            else "each its budget (" + ", ".join(tokens_text(b) for b in budgets) + ")"
        )
        sentences.append(
            f"At {target:.0%} the sweep spent, over every lr and seed: {cost} training tokens; the selected cells "
            f"{each}."
        )
        for _, row in group[group["lr_at_edge"]].iterrows():
            sentences.append(
                f"At {target:.0%} the lr selected for {_name(row)}, {row['lr']:g}, is at the edge of the grid: its "
                "optimum may lie outside it."
            )
    return sentences


def findings(
    summary: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    planned: dict | None = None,
    every_lr: pd.DataFrame | None = None,
) -> list[str]:
    """Sentences over the selected cells of `summary` (one row per cell) and their runs (for the paired
    reading; without them, none); `planned`: per target, the lrs the grids were asked to sweep; `every_lr`: the
    summary at every lr, before the selection (what a sweep's completeness is read from)."""
    runs = runs if runs is not None else summary.iloc[0:0]
    sentences = []
    dense = summary[summary["kind"] == "dense"]
    base = float(dense["perplexity"].iloc[0]) if len(dense) else math.nan
    if len(dense):
        sentences.append(f"The unpruned model's perplexity is {base:.2f}.")
    if "lrs_tried" in summary:
        sentences += tuning(summary, planned, every_lr)
    # one budget per group: a grid swept over --budgets compares its trained cells budget by budget
    for (target, pattern, _), group in summary[summary["kind"] != "dense"].groupby(
        ["target_sparsity", "pattern", "budget"], sort=True, dropna=False
    ):
        amount = f"{target:.0%}" if pattern == "unstructured" else pattern
        one_shot = group[group["kind"] == "one-shot"].sort_values("perplexity")
        if len(one_shot):
            best = one_shot.iloc[0]
            sentences.append(
                f"At {amount} without training, the best one-shot method is {_name(best)} "
                f"with {_ppl(best)} ({best['vs_dense_pct']:+.1f}% vs dense)."
            )
        trained = group[group["kind"] == "trained"]
        prunes = pd.Series(methods_where(trained["method"], "prunes"), index=trained.index, dtype=bool)
        sparse = trained[prunes].sort_values("perplexity")
        if len(sparse):
            winner = sparse.iloc[0]
            budget = f"{tokens_text(winner['train_tokens'])} training tokens"
            if len(sparse) > 1:
                runner = sparse.iloc[1]
                sentences.append(
                    f"At {target:.0%} with equal training ({budget} each), {_named(winner)} is best with "
                    f"{_ppl(winner)}; the next, {_named(runner)}, reaches {_ppl(runner)} "
                    f"({change_pct(runner['perplexity'], winner['perplexity']):+.1f}%): "
                    f"{spread_verdict(winner, runner)}.{paired_verdict(winner, runner, runs)}"
                )
            else:
                sentences.append(f"At {target:.0%} with {budget}, {_named(winner)} reaches {_ppl(winner)}.")
            plain = pd.Series([is_plain(row) for _, row in trained.iterrows()], index=trained.index, dtype=bool)
            control = trained[~prunes & plain]  # the unpruned model, trained as long
            if len(control):
                dft = control.iloc[0]
                sentences.append(
                    f"Trained as long without pruning ({_named(dft)}), the unpruned model reaches {_ppl(dft)} "
                    f"({change_pct(dft['perplexity'], base):+.1f}% vs the untouched model): at {target:.0%} the best "
                    f"pruned model is {change_pct(winner['perplexity'], dft['perplexity']):+.1f}% against it."
                )
                if len(dense):
                    sentences.append(recipe_check(dft, base, target))
    return sentences
