"""`report`: the comparison table, plots and a few computed sentences, built from MLflow alone.

Works on any past experiment: it reads the runs that `compare` tagged with a `cell_key` (the newest
FINISHED run per cell) and the per-iteration metric history of the iterative ones.
"""

from __future__ import annotations

import base64
import html
import os
import platform
from pathlib import Path

import matplotlib
import mlflow
import pandas as pd
import torch
import transformers
from mlflow.tracking import MlflowClient

from . import __version__
from .config import ReportConfig
from .errors import UserError
from .perplexity import change_pct
from .tracking import tracked_run
from .tracking.store import experiment_id_named, finished_cell_runs, use_tracking_store

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

COLUMNS = ["method", "kind", "target_sparsity", "sparsity", "perplexity", "vs_dense_pct", "seconds", "run_id"]


def collect_results(experiment_id: str, keys: set | None = None) -> pd.DataFrame:
    rows = []
    for run in finished_cell_runs(experiment_id, keys).values():
        tags, metrics = run.data.tags, run.data.metrics
        kind = tags["cell_kind"]
        if kind == "dense":
            sparsity, ppl = 0.0, metrics["perplexity"]
        elif kind == "iterative":
            sparsity, ppl = metrics["final_sparsity"], metrics["final_perplexity"]
        else:
            sparsity, ppl = metrics["sparsity"], metrics["perplexity"]
        rows.append({"method": "unpruned" if kind == "dense" else tags["cell_method"], "kind": kind,
                     "target_sparsity": float(tags["cell_target"]), "sparsity": sparsity, "perplexity": ppl,
                     "seconds": (run.info.end_time - run.info.start_time) / 1000.0, "run_id": run.info.run_id})
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    dense = table.loc[table["kind"] == "dense", "perplexity"]
    base = float(dense.iloc[0]) if len(dense) else float("nan")
    table["vs_dense_pct"] = change_pct(table["perplexity"], base)
    order = {"dense": 0, "one-shot": 1, "iterative": 2}
    return (table.assign(_o=table["kind"].map(order)).sort_values(["target_sparsity", "_o", "method"])
            .drop(columns="_o").reset_index(drop=True))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def spec_table(table: pd.DataFrame) -> pd.DataFrame:
    """The user's table: Method | Sparsity | Perplexity | vs dense | Time."""
    return pd.DataFrame({
        "Method": [("Unpruned" if m == "unpruned" else {"sparsegpt": "SparseGPT", "wanda": "Wanda",
                    "magnitude": "Magnitude", "iterative": "Iterative"}.get(m, m)) for m in table["method"]],
        "Sparsity": [f"{s:.0%}" for s in table["sparsity"]],
        "Perplexity": [f"{p:.2f}" for p in table["perplexity"]],
        "vs dense": ["-" if k == "dense" else f"{v:+.1f}%" for k, v in zip(table["kind"], table["vs_dense_pct"])],
        "Time": ["-" if k == "dense" else _duration(t) for k, t in zip(table["kind"], table["seconds"])],
    })


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown would add the tabulate dependency for this)."""
    frame = spec_table(table) if "kind" in table else table
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def findings(table: pd.DataFrame) -> list[str]:
    """A few sentences computed from the numbers: who wins at each sparsity, and by how much."""
    sentences = []
    dense = table[table["kind"] == "dense"]
    if len(dense):
        sentences.append(f"The unpruned model's perplexity is {dense['perplexity'].iloc[0]:.2f}.")
    for target, group in table[table["kind"] != "dense"].groupby("target_sparsity"):
        ranked = group.sort_values("perplexity")
        best, rest = ranked.iloc[0], ranked.iloc[1:]
        sentence = (f"At {target:.0%} sparsity {best['method']} is best with perplexity {best['perplexity']:.2f} "
                    f"({best['vs_dense_pct']:+.1f}% vs dense)")
        if len(rest):
            runner = rest.iloc[0]
            sentence += (f"; the next, {runner['method']}, reaches {runner['perplexity']:.2f} "
                         f"({runner['perplexity'] / best['perplexity']:.2f}x)")
        iterative = group[group["method"] == "iterative"]
        sparsegpt = group[group["method"] == "sparsegpt"]
        if len(iterative) and len(sparsegpt) and best["method"] not in ("iterative", "sparsegpt"):
            ratio = sparsegpt["perplexity"].iloc[0] / iterative["perplexity"].iloc[0]
            sentence += f"; iterative vs one-shot SparseGPT: {ratio:.2f}x lower perplexity"
        sentences.append(sentence + ".")
    below_dense = table[(table["kind"] == "iterative") & (table["vs_dense_pct"] < 0)]
    for _, row in below_dense.iterrows():
        sentences.append(f"Iterative at {row['target_sparsity']:.0%} ends below the unpruned perplexity: its recovery "
                         "training also trains the model further on the train split, so part of that gain would "
                         "come to a dense model fine-tuned as long; read it as 'pruning cost nothing', not as "
                         "'pruning helped'.")
    return sentences


def _plots(experiment_id: str, table: pd.DataFrame, out: Path) -> list[Path]:
    client = MlflowClient()
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, group in table[table["kind"] != "dense"].groupby("method"):
        group = group.sort_values("sparsity")
        ax.plot(group["sparsity"] * 100, group["perplexity"], marker="o", label=method)
    dense = table[table["kind"] == "dense"]
    if len(dense):
        ax.axhline(dense["perplexity"].iloc[0], color="gray", linestyle="--", label="unpruned")
    ax.set(xlabel="sparsity (%)", ylabel="perplexity (log scale)", yscale="log", title="Perplexity vs sparsity")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "perplexity_vs_sparsity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    iterative = table[table["kind"] == "iterative"]
    if len(iterative):
        fig, (curve, recovery) = plt.subplots(1, 2, figsize=(11, 4.2))
        for number, (_, row) in enumerate(iterative.iterrows()):
            color = f"C{number}"
            history = {key: sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], key))
                       for key in ("sparsity", "ppl_after_prune", "ppl_after_train", "recovery_pct")}
            sparsity = [v * 100 for _, v in history["sparsity"]]
            label = f"to {row['target_sparsity']:.0%}"
            curve.plot(sparsity, [v for _, v in history["ppl_after_prune"]], marker="v", linestyle=":",
                       color=color, label=f"{label}, after prune")
            curve.plot(sparsity, [v for _, v in history["ppl_after_train"]], marker="o", color=color,
                       label=f"{label}, after train")
            recovery.plot([s for s, _ in history["recovery_pct"]][1:], [v for _, v in history["recovery_pct"]][1:],
                          marker="o", color=color, label=label)
        curve.set(xlabel="sparsity (%)", ylabel="perplexity (log scale)", yscale="log",
                  title="Iterative pruning, per iteration")
        recovery.set(xlabel="iteration", ylabel="recovery (%)", title="Recovery by training")
        recovery.xaxis.get_major_locator().set_params(integer=True)
        curve.legend(fontsize=8)
        recovery.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "iterative_curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _environment() -> str:
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, mlflow {mlflow.__version__}, pipeline {__version__}")


def write_report(experiment_id: str, out: Path, keys: set | None = None) -> Path:
    table = collect_results(experiment_id, keys)
    if table.empty:
        raise UserError("this experiment holds no finished comparison runs: run `python -m pipeline compare` first")
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(experiment_id, table, out)
    sentences = findings(table)
    name = mlflow.get_experiment(experiment_id).name
    total = table["seconds"].sum()
    environment = _environment()
    md = [f"# Pruning comparison: {name}", "", markdown_table(table), "", *[f"- {s}" for s in sentences], "",
          *[f"![{p.stem}]({p.name})" for p in plots], "",
          f"Measured on {environment}. Wall time of all cells: {_duration(total)}.",
          "Perplexity as the SparseGPT reference computes it (README, \"What is computed\"); Time is each "
          "run's wall time (evaluation included)."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    images = "\n".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                       for p in plots)
    rows = spec_table(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                   for r in rows.itertuples(index=False))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Pruning comparison: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.3em .8em;text-align:right}} img{{max-width:100%;display:block;margin:1em 0}}</style>
</head><body><h1>Pruning comparison: {html.escape(name)}</h1>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{''.join(f'<li>{html.escape(s)}</li>' for s in sentences)}</ul>
{images}
<p>Measured on {html.escape(environment)}. Wall time of all cells: {_duration(total)}.</p>
</body></html>
"""
    (out / "report.html").write_text(page)
    return out / "report.md"


def publish_report(experiment_id: str | None, out: Path | None, keys: set | None = None,
                   experiment: str | None = None) -> Path:
    """write_report inside a `report` MLflow run (a child run when called from `compare`).

    experiment_id None: the experiment the report run itself goes to (under `mlflow run`, the injected
    run's); out None: reports/<experiment name>.
    """
    with tracked_run("report", {"experiment": experiment, "output_dir": str(out) if out else None},
                     {"kind": "report"}, experiment) as logger:
        experiment_id = experiment_id or mlflow.get_run(logger.run_id).info.experiment_id
        out = out or Path("reports") / mlflow.get_experiment(experiment_id).name
        path = write_report(experiment_id, out, keys)
        logger.log_artifacts(out, "report")
    return path


def run_report(config: ReportConfig) -> Path:
    """Reports on `config.experiment` (default: the one the report run goes to, e.g. under `mlflow run`)."""
    use_tracking_store()
    experiment_id = experiment_id_named(config.experiment) if config.experiment else None
    path = publish_report(experiment_id, Path(config.output_dir) if config.output_dir else None,
                          experiment=config.experiment)
    print(f"report: {path} and {path.with_suffix('.html')}")
    return path
