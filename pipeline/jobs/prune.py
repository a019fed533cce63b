"""The one-shot pruning job: dense and pruned perplexity, the sparsity report, the saved model."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import PruneRunConfig
from ..dense_cache import dense_perplexity
from ..distributed import is_main_process, sync_from_main
from ..outputs import check_writable_dir, owned_output_dir
from ..perplexity import change_pct
from ..pruning import prune_model
from ..pruning.masks import prunable_linears, sparsity_report
from ..pruning.sequential import layer_table_csv
from ..settings import flat_values
from ..tracking import tracked_run
from ..tracking.store import check_tracking_store
from ..workload import check_inputs, load_workload
from ..zeroshot import check_tasks
from . import finish_model

SPLIT = "test"


def output_dir_of(config: PruneRunConfig) -> Path:
    return Path(config.output_dir or Path("pruned_models") / f"{Path(config.model.model).name}-{config.prune.label}")


def run_prune(config: PruneRunConfig, tags: dict | None = None) -> dict:
    model_name, dataset, prune = config.model.model, config.data.dataset, config.prune
    main = is_main_process()  # under `accelerate launch` (a `compare` grid) every process prunes; one saves
    output_dir = check_writable_dir(output_dir_of(config)) if main else output_dir_of(config)
    check_tracking_store()
    inputs = check_inputs(config.model, config.data, eval_split=SPLIT, prune=prune)  # bad input opens no run
    check_tasks(config.tasks)
    params = {**flat_values(config), "output_dir": str(output_dir), "split": SPLIT}
    with owned_output_dir(output_dir) if main else contextlib.nullcontext(), tracked_run(
            f"prune {prune.label} {model_name} {dataset}", params,
            {"model": model_name, "dataset": dataset, "method": prune.method, "kind": "one-shot", **(tags or {})},
            config.tracking.experiment, system_metrics=config.tracking.system_metrics) as logger:
        work = load_workload(config.model, config.data, inputs, keep_on_cpu=True)
        logger.set_tags(work.corpus.describe())
        dense, cached = dense_perplexity(work, SPLIT)
        print(f"dense perplexity: {dense:.4f}" + (" (cached)" if cached else ""))
        windows, calibration = work.calibration(prune)
        work.record_inputs(logger, evaluation=SPLIT, calibration=(windows, calibration))
        if calibration is not None:
            logger.set_tags({"calibration_digest": calibration.digest[:16]})
        print(f"pruning {model_name} with {prune.label} ...", flush=True)
        result = prune_model(work.model, prune, windows, work.device, progress=True)
        sync_from_main(work.model)  # one mask on every process, whatever each one's calibration gave
        pruned = work.evaluate(SPLIT).perplexity
        report = sparsity_report(work.model, prunable_linears(work.model, prune.include, prune.exclude))
        logger.log_dict({"sparsity": report["prunable"], "sparsity_all_parameters": report["all_parameters"],
                         "perplexity": pruned, "dense_perplexity": dense, "prune_seconds": result.seconds,
                         "vs_dense_pct": change_pct(pruned, dense)})
        logger.log_dict_artifact(report, "sparsity_report.json")
        if result.layers:
            logger.log_text(layer_table_csv(result.layers), "layers.csv")
        finish_model(logger, work, config.tasks, config.registry, output_dir,
                     {"sparsity": report["prunable"], "perplexity": pruned, "method": prune.label}, main)
    print(f"{prune.label}: sparsity {report['prunable']:.4f} of prunable weights "
          f"({report['all_parameters']:.4f} of all), perplexity {pruned:.4f} (dense {dense:.4f}, "
          f"{change_pct(pruned, dense):+.1f}%), {result.seconds:.1f}s; saved to {output_dir}")
    return {"sparsity": report["prunable"], "perplexity": pruned, "dense_perplexity": dense,
            "prune_seconds": result.seconds, "layers": result.layers, "output_dir": output_dir}
