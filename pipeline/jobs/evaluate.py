"""The evaluate job: a model's perplexity on a dataset (and zero-shot tasks), recorded in MLflow."""

from __future__ import annotations

from ..config import EvaluateConfig
from ..perplexity import PerplexityResult
from ..settings import flat_values
from ..tracking import tracked_run
from ..workload import check_inputs, load_workload
from ..zeroshot import check_tasks, log_tasks


def run_evaluate(config: EvaluateConfig, tags: dict | None = None) -> PerplexityResult:
    model_name, dataset = config.model.model, config.data.dataset
    inputs = check_inputs(config.model, config.data, eval_split=config.split)  # bad input opens no run
    check_tasks(config.tasks)
    with tracked_run(f"evaluate {model_name} {dataset}", flat_values(config),
                     {"model": model_name, "dataset": dataset, **(tags or {})}, config.tracking.experiment,
                     system_metrics=config.tracking.system_metrics) as logger:
        work = load_workload(config.model, config.data, inputs)
        logger.set_tags(work.corpus.describe())
        logger.log_params({"resolved_seqlen": work.seqlen, "resolved_dtype": str(next(work.model.parameters()).dtype)})
        work.record_inputs(logger, evaluation=config.split)
        result = work.evaluate(config.split, config.batch_size)
        logger.log_dict(result.metrics())
        print(f"{model_name} on {dataset} ({config.split}, {result.windows} windows of {work.seqlen} tokens): "
              f"perplexity {result.perplexity:.4f}")
        if config.tasks.tasks:
            log_tasks(logger, work.model, work.tokenizer, config.tasks)
    return result
