"""The evaluate job: a model's perplexity on a dataset (and zero-shot tasks), recorded in MLflow."""

from __future__ import annotations

from ..config import EvaluateConfig
from ..perplexity import PerplexityResult
from ..settings import flat_values
from ..workload import check_inputs
from ..zeroshot import check_tasks, log_tasks
from . import job_run


def checks(config: EvaluateConfig):
    inputs = check_inputs(config.model, config.data, eval_split=config.split)
    check_tasks(config.tasks)
    return inputs


def run_evaluate(config: EvaluateConfig, tags: dict | None = None) -> PerplexityResult:
    model_name, dataset = config.model.model, config.data.dataset
    with job_run(
        f"evaluate {model_name} {dataset}",
        params=flat_values(config),
        tags={"model": model_name, "dataset": dataset, **(tags or {})},
        tracking=config.tracking,
        checks=lambda: checks(config),
    ) as job:
        work = job.workload(config)
        job.tracker.log_params(
            {"resolved_seqlen": work.seqlen, "resolved_dtype": str(next(work.model.parameters()).dtype)}
        )
        work.record_inputs(job.tracker, evaluation=config.split)
        batch = config.resolved("eval_batch_size", work.model, work.seqlen, work.device)
        result = work.evaluate(config.split, batch)
        job.tracker.log_dict(result.metrics())
        print(
            f"{model_name} on {dataset} ({config.split}, {result.windows} windows of {work.seqlen} tokens): "
            f"perplexity {result.perplexity:.4f}"
        )
        if config.tasks.tasks:
            log_tasks(job.tracker, work.model, work.tokenizer, config.tasks)
    return result
