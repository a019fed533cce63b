"""The train job: mask-preserving fine-tuning of a (pruned) model, tracked in MLflow."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import TrainRunConfig
from ..distributed import check_launch, is_main_process
from ..errors import UserError, option, sigterm_as_interrupt
from ..models import save_model
from ..outputs import check_writable_dir, owned_output_dir
from ..pruning.masks import prunable_linears, sparsity_of
from ..settings import flat_values
from ..tracking import tracked_run
from ..tracking.store import check_tracking_store
from ..training import NonFiniteLoss, train_keeping_masks
from ..workload import check_inputs, load_workload

SPLIT = "validation"


def output_dir_of(config: TrainRunConfig) -> Path:
    return Path(config.output_dir or Path("pruned_models") / f"{Path(config.model.model).name}-trained")


def run_train(config: TrainRunConfig, tags: dict | None = None) -> dict:
    check_launch(config.train.batch_size)
    model_name, dataset = config.model.model, config.data.dataset
    main = is_main_process()
    output_dir = check_writable_dir(output_dir_of(config)) if main else output_dir_of(config)
    check_tracking_store()
    inputs = check_inputs(config.model, config.data, eval_split=SPLIT, training=True)  # bad input opens no run
    params = {**flat_values(config), "output_dir": str(output_dir)}
    with sigterm_as_interrupt(), owned_output_dir(output_dir) if main else contextlib.nullcontext(), tracked_run(
            f"train {Path(model_name).name} {dataset}", params, {"model": model_name, "dataset": dataset, **(tags or {})},
            config.tracking.experiment, journal_dir=output_dir) as logger:
        work = load_workload(config.model, config.data, inputs, training=True)
        logger.set_tags(work.corpus.describe())
        blocks = work.training_blocks()
        linears = prunable_linears(work.model)
        sparsity = sparsity_of(linears)
        print(f"training {model_name} ({sparsity:.2%} sparse, mask kept) on {blocks.shape[0]} blocks of {work.seqlen}")
        try:
            result = train_keeping_masks(work.model, linears, blocks, config.train,
                                         on_log=lambda step, loss, lr: logger.log_dict({"train_loss": loss, "lr": lr},
                                                                                        step))
        except NonFiniteLoss as fault:
            raise UserError(f"training stopped: the loss became {fault.loss} at step {fault.step}; nothing "
                            f"was saved: lower {option('lr')}") from None
        for epoch, loss in enumerate(result.epoch_losses, start=1):
            logger.log_dict({"epoch_loss": loss}, step=epoch)
        ppl = work.evaluate(SPLIT).perplexity
        logger.log_dict({"sparsity": sparsity_of(linears), "validation_perplexity": ppl,
                         "train_seconds": result.seconds, "train_tokens": result.tokens})
        if main:
            save_model(work.model, work.tokenizer, output_dir)
    print(f"trained {result.steps} steps in {result.seconds:.0f}s: average loss of the last epoch "
          f"{result.final_loss:.4f}, {SPLIT} perplexity {ppl:.2f}, sparsity {sparsity:.2%}; saved to {output_dir}")
    return {"perplexity": ppl, "sparsity": sparsity, "epoch_losses": result.epoch_losses}
