"""The train job: mask-preserving fine-tuning of a (pruned) model, tracked in MLflow."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from ..config import TrainRunConfig
from ..distributed import check_launch, is_main_process
from ..errors import UserError, option, sigterm_as_interrupt
from ..models import load_model, model_skeleton, training_dtype
from ..outputs import check_writable_dir, owned_output_dir
from ..pruning.masks import prunable_linears, sparsity_of
from ..settings import flat_values
from ..tracking import tracked_run
from ..tracking.store import check_tracking_store
from ..training import NonFiniteLoss, train_keeping_masks
from ..workload import check_inputs, load_workload
from ..zeroshot import check_tasks
from . import finish_model

SPLIT = "validation"


def step_metrics(metrics: dict) -> dict:
    """What a training step's log holds: train_loss, lr, and the loss's parts (ce_loss, kd_loss, layer_loss)."""
    return {("train_loss" if key == "loss" else key): value for key, value in metrics.items()}


def output_dir_of(config: TrainRunConfig) -> Path:
    return Path(config.output_dir or Path("pruned_models") / f"{Path(config.model.model).name}-trained")


def run_train(config: TrainRunConfig, tags: dict | None = None) -> dict:
    check_launch(config.train.batch_size)
    model_name, dataset = config.model.model, config.data.dataset
    main = is_main_process()
    output_dir = check_writable_dir(output_dir_of(config)) if main else output_dir_of(config)
    check_tracking_store()
    inputs = check_inputs(config.model, config.data, eval_split=SPLIT, training=True)  # bad input opens no run
    if config.teacher:
        model_skeleton(config.teacher, config.model.trust_remote_code)
    check_tasks(config.tasks)
    params = {**flat_values(config), "output_dir": str(output_dir)}
    with sigterm_as_interrupt(), owned_output_dir(output_dir) if main else contextlib.nullcontext(), tracked_run(
            f"train {Path(model_name).name} {dataset}", params, {"model": model_name, "dataset": dataset, **(tags or {})},
            config.tracking.experiment, journal_dir=output_dir, system_metrics=config.tracking.system_metrics) as logger:
        work = load_workload(config.model, config.data, inputs, training=True)
        logger.set_tags(work.corpus.describe())
        blocks = work.training_blocks()
        work.record_inputs(logger, evaluation=SPLIT, training=blocks)
        linears = prunable_linears(work.model)
        sparsity = sparsity_of(linears)
        print(f"training {model_name} ({sparsity:.2%} sparse, mask kept) on {blocks.shape[0]} blocks of {work.seqlen}")
        teacher = None
        if config.train.distill != "none":  # the model as loaded, unless another is named
            teacher = (load_model(config.teacher, training_dtype(config.model.dtype), config.model.device,
                                  config.model.trust_remote_code) if config.teacher else copy.deepcopy(work.model))
        try:
            result = train_keeping_masks(work.model, linears, blocks, config.train, teacher=teacher,
                                         on_log=lambda step, metrics: logger.log_dict(step_metrics(metrics), step))
        except NonFiniteLoss as fault:
            raise UserError(f"training stopped: the loss became {fault.loss} at step {fault.step}; nothing "
                            f"was saved: lower {option('lr')}") from None
        for epoch, loss in enumerate(result.epoch_losses, start=1):
            logger.log_dict({"epoch_loss": loss}, step=epoch)
        ppl = work.evaluate(SPLIT).perplexity
        logger.log_dict({"sparsity": sparsity_of(linears), "validation_perplexity": ppl,
                         "train_seconds": result.seconds, "train_tokens": result.tokens, "train_steps": result.steps,
                         "train_flops": result.flops})
        finish_model(logger, work, config.tasks, config.registry, output_dir,
                     {"sparsity": sparsity_of(linears), "perplexity": ppl}, main)
    print(f"trained {result.steps} steps in {result.seconds:.0f}s: average loss of the last epoch "
          f"{result.final_loss:.4f}, {SPLIT} perplexity {ppl:.2f}, sparsity {sparsity:.2%}; saved to {output_dir}")
    return {"perplexity": ppl, "sparsity": sparsity, "epoch_losses": result.epoch_losses}
