"""The train job: mask-preserving fine-tuning of a (pruned) model, tracked in MLflow."""

from __future__ import annotations

import copy
from pathlib import Path

from ..adapters import check_lora
from ..config import TrainRunConfig
from ..distributed import check_launch
from ..errors import UserError, option
from ..models import load_model, training_dtype
from ..outputs import check_no_saved_model
from ..pruning.masks import prunable_linears, sparsity_of
from ..recovery import recover
from ..settings import flat_values
from ..training import NonFiniteLoss
from ..workload import check_inputs, check_teacher
from ..zeroshot import check_tasks
from . import finish_model, job_run

SPLIT = "validation"


def step_metrics(metrics: dict) -> dict:
    """What a training step's log holds: train_loss, lr, and the loss's parts (ce_loss, kd_loss, layer_loss)."""
    return {("train_loss" if key == "loss" else key): value for key, value in metrics.items()}


def checks(config: TrainRunConfig):
    check_no_saved_model(config.resolved("output_dir"), config.saved_model.overwrite)
    inputs = check_inputs(config.model, config.data, eval_split=SPLIT, training=True)
    if config.train.train_params == "lora":
        check_lora(prunable_linears(inputs.skeleton), config.train.lora_rank, config.train.lora_targets)
    if config.teacher:
        check_teacher(
            inputs.skeleton, config.teacher, config.train.distill, config.model.trust_remote_code, config.train.recovery
        )
    check_tasks(config.tasks)
    return inputs


def load_teacher(config: TrainRunConfig, model):
    """What `--distill` learns from or `--recovery reconstruct` fits to: `--teacher`, or (distilling) a copy of the
    model as loaded; None for neither."""
    if config.train.distill == "none" and config.train.recovery == "finetune":
        return None
    if not config.teacher:
        return copy.deepcopy(model)
    return load_model(
        config.teacher, training_dtype(config.model.dtype), config.model.device, config.model.trust_remote_code
    )


def train_logged(work, linears: dict, blocks, config: TrainRunConfig, tracker):
    """The recovery training, each logged step in the run; a loss gone nan or inf is one line, nothing saved."""
    teacher = load_teacher(config, work.model)
    log = lambda step, metrics: tracker.log_dict(step_metrics(metrics), step)  # noqa: E731
    try:
        return recover(work.model, linears, blocks, config.train, dense=teacher, on_log=log)
    except NonFiniteLoss as fault:
        raise UserError(
            f"training stopped: the loss became {fault.loss} at step {fault.step}; nothing "
            f"was saved: lower {option('lr')}"
        ) from None


def run_train(config: TrainRunConfig, tags: dict | None = None) -> dict:
    check_launch(config.train.batch_size)  # first, on every process alike, before the launcher stops them
    model_name, dataset = config.model.model, config.data.dataset
    output_dir = Path(config.resolved("output_dir"))
    with job_run(
        f"train {Path(model_name).name} {dataset}",
        params=flat_values(config),
        tags={"model": model_name, "dataset": dataset, **(tags or {})},
        tracking=config.tracking,
        output_dir=output_dir,
        checks=lambda: checks(config),
    ) as job:
        tracker = job.tracker
        work = job.workload(config, training=True)
        blocks = work.training_blocks()
        work.record_inputs(tracker, evaluation=SPLIT, training=blocks)
        linears = prunable_linears(work.model)
        sparsity = sparsity_of(linears)
        print(f"training {model_name} ({sparsity:.2%} sparse, mask kept) on {blocks.shape[0]} blocks of {work.seqlen}")
        result = train_logged(work, linears, blocks, config, tracker)
        for epoch, loss in enumerate(result.epoch_losses, start=1):
            tracker.log_dict({"epoch_loss": loss}, step=epoch)
        ppl = work.evaluate(SPLIT).perplexity
        tracker.log_dict(
            {
                "sparsity": sparsity_of(linears),
                "validation_perplexity": ppl,
                "train_seconds": result.seconds,
                "train_tokens": result.tokens,
                "train_steps": result.steps,
                "train_flops": result.flops,
                "trained_parameters": result.trained_parameters,
                "peak_memory_bytes": result.peak_memory_bytes,
            }
        )
        finish_model(
            tracker,
            work,
            config.tasks,
            config.saved_model,
            output_dir,
            {"sparsity": sparsity_of(linears), "perplexity": ppl},
        )
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s: average loss of the last epoch "
        f"{result.final_loss:.4f}, {SPLIT} perplexity {ppl:.2f}, sparsity {sparsity:.2%}; saved to {output_dir}"
    )
    return {"perplexity": ppl, "sparsity": sparsity, "epoch_losses": result.epoch_losses}
