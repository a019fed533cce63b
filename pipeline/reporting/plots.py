"""The report's figures: perplexity vs sparsity, perplexity vs training tokens per target (equal budget),
and the iterative runs' per-iteration curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
from mlflow.tracking import MlflowClient

from ..axes import NAMED_AXES, cell_name, cell_style
from ..methods import METHODS, methods_where
from .crossover import ITERATIVE, ONE_SHOT
from .numbers import tokens_text

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_method(frame: pd.DataFrame):
    """(name as the grid says it, style, rows) per method and named recovery (pipeline/axes.py: a criterion's
    colour, a recovery loss's marker, a train-params mode's fill), in the frame's order."""
    columns = ["method", *[axis.name for axis in NAMED_AXES if axis.name in frame]]
    for values, group in frame.groupby(columns, sort=False, dropna=False):
        named = dict(zip(columns, values))
        yield cell_name(named), cell_style(named), group


def perplexity_vs_sparsity(summary: pd.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    unstructured = summary[summary["pattern"] == "unstructured"]
    for name, style, group in _by_method(unstructured[unstructured["kind"] != "dense"]):
        group = group.sort_values("sparsity")
        ax.errorbar(
            group["sparsity"] * 100,
            group["perplexity"],
            yerr=group["perplexity_std"].fillna(0),
            capsize=3,
            label=name,
            **style,
            linestyle="--" if group["kind"].iloc[0] == "one-shot" else "-",
        )
    for _, row in summary[summary["pattern"] != "unstructured"].iterrows():
        ax.scatter(
            [row["sparsity"] * 100],
            [row["perplexity"]],
            marker="s",
            color=cell_style(row)["color"],
            label=f"{row['method']} {row['pattern']}",
        )
    dense = summary[summary["kind"] == "dense"]
    if len(dense):
        ax.axhline(dense["perplexity"].iloc[0], color="gray", linestyle=":", label="unpruned")
    ax.set(
        xlabel="sparsity (%)",
        ylabel="perplexity (log scale)",
        yscale="log",
        title="Perplexity vs sparsity (dashed: no training)",
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "perplexity_vs_sparsity.png")


def accuracy_vs_sparsity(summary: pd.DataFrame, out: Path) -> list[Path]:
    """The mean zero-shot accuracy of each method against sparsity, when the cells ran tasks."""
    if "accuracy" not in summary:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    unstructured = summary[summary["pattern"] == "unstructured"]
    for name, style, group in _by_method(unstructured[unstructured["kind"] != "dense"]):
        group = group.sort_values("sparsity")
        ax.plot(
            group["sparsity"] * 100,
            group["accuracy"] * 100,
            label=name,
            **style,
            linestyle="--" if group["kind"].iloc[0] == "one-shot" else "-",
        )
    dense = summary[summary["kind"] == "dense"]
    if len(dense):
        ax.axhline(dense["accuracy"].iloc[0] * 100, color="gray", linestyle=":", label="unpruned")
    tasks = ", ".join(c.split(":", 1)[1] for c in summary.columns if c.startswith("acc:"))
    ax.set(xlabel="sparsity (%)", ylabel="accuracy (%)", title=f"Zero-shot accuracy vs sparsity ({tasks})")
    ax.legend(fontsize=8)
    return [_save(fig, out / "accuracy_vs_sparsity.png")]


def _curve(client: MlflowClient, run_ids: list) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(tokens, mean perplexity, std) over the runs' ppl_at_tokens histories (one budget: the same steps)."""
    histories = (
        pd.DataFrame(
            {
                run_id: pd.Series({m.step: m.value for m in client.get_metric_history(run_id, "ppl_at_tokens")})
                for run_id in run_ids
            }
        )
        .sort_index()
        .dropna()
    )
    return pd.Series(histories.index, dtype=float), histories.mean(axis=1), histories.std(axis=1).fillna(0.0)


def budget_curves(runs: pd.DataFrame, summary: pd.DataFrame, out: Path) -> list[Path]:
    """Per target: perplexity vs training tokens of every trained method (mean ± std over seeds), with the
    untrained one-shot results at 0 tokens and the unpruned model for reference."""
    client = MlflowClient()
    dense = summary[summary["kind"] == "dense"]
    paths = []
    for target, group in runs[runs["kind"] == "trained"].groupby("target_sparsity", sort=True):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, style, cells in _by_method(group):
            tokens, mean, std = _curve(client, list(cells["run_id"]))
            prunes = methods_where(cells["method"].iloc[:1], "prunes")[0]
            ax.errorbar(
                tokens.values / 1e6,
                mean.values,
                yerr=std.values,
                markersize=3,
                capsize=2,
                label=name,
                **style,
                linestyle="-" if prunes else ":",
            )
        untrained = summary[
            (summary["kind"] == "one-shot")
            & (summary["target_sparsity"] == target)
            & (summary["pattern"] == "unstructured")
        ]
        for _, row in untrained.iterrows():
            ax.scatter(
                [0],
                [row["perplexity"]],
                marker="x",
                s=40,
                color=cell_style(row)["color"],
                label=f"{row['method']} (no training)",
            )
        if len(dense):
            ax.axhline(dense["perplexity"].iloc[0], color="gray", linestyle=":", label="unpruned")
        ax.set(
            xlabel="training tokens (millions)",
            ylabel="perplexity (log scale)",
            yscale="log",
            title=f"Equal budget at {target:.0%} sparsity",
        )
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"budget_{round(target * 100)}.png"))
    return paths


def iterative_curves(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Perplexity after pruning and after training per iteration, and the recovery, of the iterative runs
    (the first seed of each target)."""
    iterative = runs[methods_where(runs["method"], "prunes_step_by_step")].drop_duplicates("target_sparsity")
    if iterative.empty:
        return []
    client = MlflowClient()
    fig, (curve, recovery) = plt.subplots(1, 2, figsize=(11, 4.2))
    for number, (_, row) in enumerate(iterative.iterrows()):
        color = f"C{number}"
        history = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], key))
            for key in ("sparsity", "ppl_after_prune", "ppl_after_train", "recovery_pct")
        }
        sparsity = dict(history["sparsity"])  # every iteration's; the perplexities of those measured (--eval-every)
        label = f"to {row['target_sparsity']:.0%}"
        curve.plot(
            [sparsity[k] * 100 for k, _ in history["ppl_after_prune"]],
            [v for _, v in history["ppl_after_prune"]],
            marker="v",
            linestyle=":",
            color=color,
            label=f"{label}, after prune",
        )
        curve.plot(
            [sparsity[k] * 100 for k, _ in history["ppl_after_train"]],
            [v for _, v in history["ppl_after_train"]],
            marker="o",
            color=color,
            label=f"{label}, after train",
        )
        recovery.plot(
            [s for s, _ in history["recovery_pct"]][1:],
            [v for _, v in history["recovery_pct"]][1:],
            marker="o",
            color=color,
            label=label,
        )
    curve.set(
        xlabel="sparsity (%)", ylabel="perplexity (log scale)", yscale="log", title="Iterative pruning, per iteration"
    )
    recovery.set(xlabel="iteration", ylabel="recovery (%)", title="Recovery by training")
    recovery.xaxis.get_major_locator().set_params(integer=True)
    curve.legend(fontsize=8)
    recovery.legend(fontsize=8)
    return [_save(fig, out / "iterative_curves.png")]


def lr_sensitivity(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Validation perplexity against the learning rate, one line per trained method, one panel per target
    (error bars: ± 1 std over seeds), when the grid swept learning rates."""
    swept = summary[(summary["kind"] == "trained") & (summary["lrs_tried"] > 1)]
    if swept.empty:
        return []
    targets = sorted(swept["target_sparsity"].unique())
    fig, axes = plt.subplots(1, len(targets), figsize=(4.4 * len(targets), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for name, style, group in _by_method(swept[swept["target_sparsity"] == target]):
            group = group.sort_values("lr")
            ax.errorbar(
                group["lr"],
                group["val_perplexity"],
                yerr=group["val_perplexity_std"].fillna(0),
                capsize=3,
                label=name,
                **style,
            )
            chosen = group[group["selected"]]
            ax.scatter(chosen["lr"], chosen["val_perplexity"], s=140, facecolors="none", edgecolors=style["color"])
        ax.set(xscale="log", xlabel="learning rate", ylabel="validation perplexity", title=f"{target:.0%} sparsity")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Learning-rate sensitivity (circled: selected on validation)", fontsize=10)
    return [_save(fig, out / "lr_sensitivity.png")]


def layer_sparsities(runs: pd.DataFrame, out: Path) -> list[Path]:
    """The sparsity of each decoder layer in the OWL cells (their first seed), one panel per target, the
    target as a line: how OWL spread it."""
    profiles = [METHODS[m].profile if m in METHODS else "uniform" for m in runs["method"]]
    owl = runs[[p == "owl" for p in profiles]].drop_duplicates(["method", "target_sparsity"])
    if owl.empty:
        return []
    client = MlflowClient()
    targets = sorted(owl["target_sparsity"].unique())
    fig, axes = plt.subplots(1, len(targets), figsize=(4.4 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        cells = owl[owl["target_sparsity"] == target]
        width = 0.8 / len(cells)
        for number, (_, row) in enumerate(cells.iterrows()):
            metrics = client.get_run(row["run_id"]).data.metrics
            layers = sorted((int(k.split("/")[1]), v) for k, v in metrics.items() if k.startswith("layer_sparsity/"))
            ax.bar(
                [layer + (number - (len(cells) - 1) / 2) * width for layer, _ in layers],
                [v * 100 for _, v in layers],
                width=width,
                label=METHODS[row["method"]].display,
                color=cell_style(row)["color"],
                alpha=0.4 + 0.6 * (number + 1) / len(cells),
            )
        ax.axhline(target * 100, color="gray", linestyle=":")
        ax.set(xlabel="decoder layer", ylabel="sparsity (%)", title=f"OWL at {target:.0%}")
        ax.set_ylim(target * 100 - 25, min(100, target * 100 + 25))
    axes[0][0].legend(fontsize=7)
    return [_save(fig, out / "layer_sparsity.png")]


def crossover_heatmap(table: pd.DataFrame, out: Path) -> list[Path]:
    """The crossover map: sparsity down, budget across, one-shot + training minus iterative in a diverging
    colour (blue: iterating pays, red: one-shot + training does) on a log scale of its size, since the gaps
    grow a hundredfold with sparsity and a linear scale would wash out all but the largest; a cell whose
    interval holds 0 grey (a tie); each cell with its difference, interval and the winning step size."""
    if table.empty:
        return []
    targets, budgets = sorted(table["target_sparsity"].unique()), sorted(table["budget"].unique())
    cells = table.set_index(["target_sparsity", "budget"])
    reach = max(float(table["difference"].abs().max()), 1e-9)
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(budgets), 1.2 + 0.75 * len(targets)))
    colours = plt.get_cmap("RdBu")
    for i, target in enumerate(targets):
        for j, budget in enumerate(budgets):
            if (target, budget) not in cells.index:
                continue
            cell = cells.loc[(target, budget)]
            tie = cell["verdict"] not in (ITERATIVE, ONE_SHOT)
            shade = math.copysign(math.log1p(abs(cell["difference"])) / math.log1p(reach), cell["difference"])
            face = "lightgrey" if tie else colours(0.5 + 0.5 * shade)
            ax.add_patch(
                plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, edgecolor="white", hatch="//" if tie else None)
            )
            interval = "" if math.isnan(cell["low"]) else f"\n[{cell['low']:+.2f}, {cell['high']:+.2f}]"
            ax.text(
                j,
                i,
                f"{cell['difference']:+.2f}{interval}\nstep {cell['step']:g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if not tie and abs(shade) > 0.6 else "black",  # legible on the dark ends
            )
    ax.set_xlim(-0.5, len(budgets) - 0.5)
    ax.set_ylim(len(targets) - 0.5, -0.5)
    ax.set_xticks(range(len(budgets)), [f"{tokens_text(b)}" for b in budgets])
    ax.set_yticks(range(len(targets)), [f"{t:.0%}" for t in targets])
    ax.set(xlabel="training tokens per cell", ylabel="target sparsity")
    ax.set_title(
        "One-shot + FT minus iterative, test perplexity\n"
        "(blue: iterating pays; red: one-shot + FT does; grey, hatched: a tie; shade: log of the size)",
        fontsize=9,
    )
    return [_save(fig, out / "crossover_map.png")]


def perplexity_vs_budget(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Test perplexity against the budget (log), one panel per target, one line per trained method and step size
    (each at its selected lr; error bars: ± 1 std over seeds)."""
    trained = summary[(summary["kind"] == "trained") & summary.get("budget", pd.Series(dtype=float)).notna()]
    if trained.empty or trained["budget"].nunique() < 2:
        return []
    targets = sorted(trained["target_sparsity"].unique())
    fig, axes = plt.subplots(1, len(targets), figsize=(4.0 * len(targets), 3.8), squeeze=False, sharey=False)
    for ax, target in zip(axes[0], targets):
        rows = trained[trained["target_sparsity"] == target]
        for (method, step), line in rows.groupby(["method", "prune_percentage"], sort=False, dropna=False):
            line = line.sort_values("budget")
            name = method if pd.isna(step) else f"{method} step {step:g}"
            style = cell_style({"method": method})
            calibrated = METHODS[method].prunes_step_by_step and METHODS[method].criterion is not None
            ax.errorbar(
                line["budget"],
                line["perplexity"],
                yerr=line["perplexity_std"].fillna(0),
                capsize=2,
                markersize=4,
                marker="s" if calibrated else "o",  # iterative-sparsegpt apart from iterative, in its colour
                label=name,
                color=style["color"],
                linestyle={0.1: "-", 0.3: "--", 0.5: ":"}.get(step, "-."),
            )
        ax.set(xscale="log", yscale="log", xlabel="training tokens per cell", ylabel="test perplexity")
        budgets = sorted(trained["budget"].unique())
        ax.set_xticks(budgets, [tokens_text(budget) for budget in budgets])  # the grid's budgets, as the tables
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        # 90 as it is written, not 9.0 x 10^1
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_title(f"{target:.0%} sparsity", fontsize=9)
    axes[0][0].legend(fontsize=6)
    return [_save(fig, out / "perplexity_vs_budget.png")]
