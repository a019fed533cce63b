"""The one-shot pruning job: dense and pruned perplexity, the sparsity report, the saved model."""

from __future__ import annotations

from pathlib import Path

import mlflow

from ..config import PruneRunConfig
from ..dense_cache import dense_perplexity
from ..distributed import sync_from_main
from ..logged_models import model_name, model_record
from ..methods import one_shot_method_of
from ..outputs import check_no_saved_model
from ..pruning.masks import prunable_linears, sparsity_report
from ..pruning.owl import layer_sparsity_csv, layer_sparsity_metrics
from ..pruning.sequential import layer_table_csv
from ..reporting.numbers import change_pct
from ..settings import flat_values
from ..shared_pruning import prune_starting_model
from ..tracking.store import experiment_identity
from ..workload import check_inputs
from ..zeroshot import check_tasks
from . import finish_model, job_run

SPLIT = "test"


def checks(config: PruneRunConfig):
    check_no_saved_model(config.resolved("output_dir"), config.saved_model.overwrite)
    inputs = check_inputs(config.model, config.data, eval_split=SPLIT, prune=config.prune)
    check_tasks(config.tasks)
    return inputs


def log_pruned_model(tracker, config: PruneRunConfig, work, tags: dict, output_dir: Path) -> str | None:
    """The pruned model as a LoggedModel of the run (its weights: the model this job saves in `output_dir`)."""
    if config.saved_model.log_models == "none":
        return None
    prune = config.prune
    method = tags.get("cell_method") or one_shot_method_of(prune.method, prune.sparsity_profile)
    name = model_name(method, prune.fraction)
    made_by = {
        "method": method,
        "target_sparsity": f"{prune.fraction:.4f}",
        "pattern": prune.pattern,
        "seed": prune.seed,
    }
    linears = prunable_linears(work.model, prune.include, prune.exclude)
    tracker.log_model(name, *model_record(linears, output_dir, made_by))
    return name


def log_pruning(tracker, report: dict, result, pruned: float, dense: float, model=None, dataset=(None, None)):
    """The pruned model's numbers (linked to its LoggedModel `model`, if any, and the evaluation `dataset`), its
    per-matrix and per-layer sparsity, and the calibrated layers' table."""
    tracker.log_dict(
        {
            "sparsity": report["prunable"],
            "sparsity_all_parameters": report["all_parameters"],
            "perplexity": pruned,
            "dense_perplexity": dense,
            "prune_seconds": result.seconds,
            "vs_dense_pct": change_pct(pruned, dense),
        },
        model=model,
        dataset=dataset,
    )
    tracker.log_dict_artifact(report, "sparsity_report.json")
    tracker.log_dict(layer_sparsity_metrics(report["layers"]))
    tracker.log_text(layer_sparsity_csv(report["layers"], result.profile), "layer_sparsity.csv")
    if result.layers:
        tracker.log_text(layer_table_csv(result.layers), "layers.csv")


def print_pruning(label: str, report: dict, result, pruned: float, dense: float, output_dir: Path) -> None:
    for layer in result.profile:
        print(
            f"  layer {layer.layer}: outlier ratio {layer.outlier_ratio:.3f}%, sparsity "
            f"{report['layers'][str(layer.layer)]:.4f} (OWL's formula {layer.owl_sparsity:.4f}, bounded "
            f"{layer.bounded_sparsity:.4f})"
        )
    print(
        f"{label}: sparsity {report['prunable']:.4f} of prunable weights "
        f"({report['all_parameters']:.4f} of all), perplexity {pruned:.4f} (dense {dense:.4f}, "
        f"{change_pct(pruned, dense):+.1f}%), {result.seconds:.1f}s; saved to {output_dir}"
    )


def run_prune(config: PruneRunConfig, tags: dict | None = None, shared_pruning: Path | None = None) -> dict:
    """Under `accelerate launch` (a `compare` grid) every process prunes; the main one saves. `shared_pruning`:
    a directory where the pruning is shared with other runs that would prune the same (shared_pruning.py)."""
    model_name, dataset, prune = config.model.model, config.data.dataset, config.prune
    output_dir = Path(config.resolved("output_dir"))
    with job_run(
        f"prune {prune.label} {model_name} {dataset}",
        params={**flat_values(config), "split": SPLIT},
        tags={"model": model_name, "dataset": dataset, "method": prune.method, "kind": "one-shot", **(tags or {})},
        tracking=config.tracking,
        output_dir=output_dir,
        checks=lambda: checks(config),
    ) as job:
        tracker = job.tracker
        work = job.workload(config, keep_on_cpu=True)
        scope = experiment_identity(mlflow.get_run(tracker.run_id).info.experiment_id) if tracker.run_id else ""
        dense, cached = dense_perplexity(work, SPLIT, scope)
        print(f"dense perplexity: {dense:.4f}" + (" (cached)" if cached else ""))
        windows, calibration = work.calibration(prune)
        work.record_inputs(tracker, evaluation=SPLIT, calibration=(windows, calibration))
        if calibration is not None:
            tracker.set_tags({"calibration_digest": calibration.digest[:16]})
        print(f"pruning {model_name} with {prune.label} ...", flush=True)
        result, loaded = prune_starting_model(
            work.model, model_name, prune, windows, work.device, shared_pruning, progress=True
        )
        if shared_pruning is not None:
            tracker.set_tags({"pruning_shared": "read" if loaded else "computed"})
        if loaded:
            print(f"read the same pruning from {shared_pruning}")
        sync_from_main(work.model)  # one mask on every process, whatever each one's calibration gave
        pruned = work.evaluate(SPLIT).perplexity
        report = sparsity_report(work.model, prunable_linears(work.model, prune.include, prune.exclude))
        model = log_pruned_model(tracker, config, work, tags or {}, output_dir)
        log_pruning(tracker, report, result, pruned, dense, model, work.dataset_of(SPLIT))
        finish_model(
            tracker,
            work,
            config.tasks,
            config.saved_model,
            output_dir,
            {"sparsity": report["prunable"], "perplexity": pruned, "method": prune.label},
            logged_model=model,
        )
    print_pruning(prune.label, report, result, pruned, dense, output_dir)
    return {
        "sparsity": report["prunable"],
        "perplexity": pruned,
        "dense_perplexity": dense,
        "prune_seconds": result.seconds,
        "layers": result.layers,
        "output_dir": output_dir,
    }
