"""Sentences computed from the summary: nothing in them is written in advance, and either method can win.

The question a comparison answers is which schedule gives the better sparse model for the same
training, so the verdict at each sparsity compares the trained cells (iterative and one-shot + training,
all with one budget), and says whether the gap is larger than the spread over seeds: larger when the
two ± 1 std ranges do not overlap, unknown with one seed.
"""

from __future__ import annotations

import math

import pandas as pd

from ..methods import cell_name, methods_where
from ..perplexity import change_pct


def _ppl(row) -> str:
    if row["n"] > 1 and not math.isnan(row["perplexity_std"]):
        return f"{row['perplexity']:.2f} ± {row['perplexity_std']:.2f} (n={row['n']})"
    return f"{row['perplexity']:.2f}"


def tokens_text(tokens: float) -> str:
    if tokens >= 1e9:
        return f"{tokens / 1e9:.2f} G"
    if tokens >= 1e6:
        return f"{tokens / 1e6:.2f} M"
    if tokens >= 1e3:
        return f"{tokens / 1e3:.1f} k"
    return f"{tokens:.0f}"


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
    return cell_name(row["method"], row["distill"])


def findings(summary: pd.DataFrame) -> list[str]:
    sentences = []
    dense = summary[summary["kind"] == "dense"]
    base = float(dense["perplexity"].iloc[0]) if len(dense) else math.nan
    if len(dense):
        sentences.append(f"The unpruned model's perplexity is {base:.2f}.")
    for (target, pattern), group in summary[summary["kind"] != "dense"].groupby(
        ["target_sparsity", "pattern"], sort=True
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
        prunes = pd.Series(methods_where(trained["method"], "prunes"), index=trained.index)
        sparse = trained[prunes].sort_values("perplexity")
        if len(sparse):
            winner = sparse.iloc[0]
            budget = f"{tokens_text(winner['train_tokens'])} training tokens"
            if len(sparse) > 1:
                runner = sparse.iloc[1]
                sentences.append(
                    f"At {target:.0%} with equal training ({budget} each), {_name(winner)} is best with "
                    f"{_ppl(winner)}; the next, {_name(runner)}, reaches {_ppl(runner)} "
                    f"({change_pct(runner['perplexity'], winner['perplexity']):+.1f}%): "
                    f"{spread_verdict(winner, runner)}."
                )
            else:
                sentences.append(f"At {target:.0%} with {budget}, {_name(winner)} reaches {_ppl(winner)}.")
            control = trained[~prunes & (trained["distill"] == "none")]  # the unpruned model, trained as long
            if len(control):
                dft = control.iloc[0]
                sentences.append(
                    f"Trained as long without pruning ({_name(dft)}), the unpruned model reaches {_ppl(dft)} "
                    f"({change_pct(dft['perplexity'], base):+.1f}% vs the untouched model): at {target:.0%} the best "
                    f"pruned model is {change_pct(winner['perplexity'], dft['perplexity']):+.1f}% against it."
                )
    return sentences
