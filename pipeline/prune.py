"""`prune`: one-shot pruning of a model, evaluated against its dense perplexity and tracked in MLflow."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

from .pruning import PruneConfig, prune_model
from .pruning.masks import prunable_linears, sparsity_report


def default_calibration_dataset(model: str, dataset: str) -> str:
    """Hub models calibrate on C4, as the reference; the embedded model on pydocs, the corpus it knows;
    a local directory on the evaluation dataset's train split (it may not know C4 either)."""
    import os

    from .models import EMBEDDED_MODEL

    if model == EMBEDDED_MODEL:
        return "pydocs"
    return dataset if os.path.isdir(model) else "c4"


def layer_table_csv(records) -> str:
    phases = sorted({phase for r in records for phase in r.seconds})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["layer", *[f"{p}_seconds" for p in phases], "total_seconds", "relative_output_error"])
    for r in records:
        writer.writerow([r.layer, *[f"{r.seconds.get(p, 0.0):.4f}" for p in phases],
                         f"{sum(r.seconds.values()):.4f}", f"{r.relative_output_error:.6g}"])
    return out.getvalue()


def dense_perplexity(model, tokenizer, corpus, model_name: str, split: str, seqlen: int, dtype: str,
                     device) -> tuple[float, bool]:
    """(perplexity, came_from_cache)."""
    from .dense_cache import cached_dense_perplexity, dense_key, remember_dense_perplexity
    from .evaluation import evaluate_on
    from .models import resolve_model_source

    key = dense_key(resolve_model_source(model_name), corpus.digest, split, seqlen, dtype)
    cached = cached_dense_perplexity(key)
    if cached is not None:
        return cached, True
    value = evaluate_on(model, tokenizer, corpus, split, seqlen, device).perplexity
    remember_dense_perplexity(key, value)
    return value, False


def prune_command(*, model: str, dataset: str, dtype: str, device: str, seqlen: int | None,
                  experiment: str | None, trust_remote_code: bool, config: PruneConfig,
                  calibration_dataset: str | None, seed: int, output_dir: Path | None, split: str = "test"):
    from .data import calibration_windows, load_corpus
    from .evaluation import evaluate_on, resolve_seqlen
    from .models import load_model_and_tokenizer, resolve_device, resolve_model_source
    from .tracking import tracked_run

    resolve_model_source(model)
    calibration_dataset = calibration_dataset or default_calibration_dataset(model, dataset)
    output_dir = output_dir or Path("pruned_models") / f"{Path(model).name}-{config.label}"
    params = {"model": model, "dataset": dataset, "dtype": dtype, "device": device, "seqlen": seqlen,
              "calibration_dataset": calibration_dataset, "seed": seed, "output_dir": str(output_dir),
              "split": split, **asdict(config)}
    run_name = f"prune {config.label} {model} {dataset}"
    with tracked_run(run_name, params, {"model": model, "dataset": dataset, "method": config.method,
                                        "kind": "one-shot"}, experiment) as logger:
        target = resolve_device(device)
        lm, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                                 keep_on_cpu=True)
        window = resolve_seqlen(lm, seqlen)
        corpus = load_corpus(dataset)
        logger.set_tags(corpus.describe())
        dense, cached = dense_perplexity(lm, tokenizer, corpus, model, split, window, dtype, target)
        print(f"dense perplexity: {dense:.4f}" + (" (cached)" if cached else ""))
        windows = None
        if config.method in ("sparsegpt", "wanda"):
            calibration = corpus if calibration_dataset == dataset else load_corpus(calibration_dataset)
            windows = calibration_windows(calibration, tokenizer, config.nsamples, window, seed)
            logger.set_tags({"calibration_digest": calibration.digest[:16]})
        print(f"pruning {model} with {config.label} ...", flush=True)
        result = prune_model(lm, config, windows, target, progress=True)
        pruned = evaluate_on(lm, tokenizer, corpus, split, window, target).perplexity
        report = sparsity_report(lm, prunable_linears(lm, config.include, config.exclude))
        logger.log_dict({"sparsity": report["prunable"], "sparsity_all_parameters": report["all_parameters"],
                         "perplexity": pruned, "dense_perplexity": dense, "prune_seconds": result.seconds,
                         "vs_dense_pct": 100.0 * (pruned - dense) / dense})
        logger.log_dict_artifact(report, "sparsity_report.json")
        if result.layers:
            logger.log_text(layer_table_csv(result.layers), "layers.csv")
        lm.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    print(f"{config.label}: sparsity {report['prunable']:.4f} of prunable weights "
          f"({report['all_parameters']:.4f} of all), perplexity {pruned:.4f} (dense {dense:.4f}, "
          f"{100.0 * (pruned - dense) / dense:+.1f}%), {result.seconds:.1f}s; saved to {output_dir}")
    return {"sparsity": report["prunable"], "perplexity": pruned, "dense_perplexity": dense,
            "prune_seconds": result.seconds, "layers": result.layers, "output_dir": output_dir}
