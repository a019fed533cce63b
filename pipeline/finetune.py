"""`train`: mask-preserving causal-LM fine-tuning of a (pruned) model, tracked in MLflow."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .errors import UserError, sigterm_as_interrupt
from .training import NonFiniteLoss, TrainConfig


def train_command(*, model: str, dataset: str, dtype: str, device: str, seqlen: int | None,
                  experiment: str | None, trust_remote_code: bool, config: TrainConfig,
                  output_dir: Path | None, split: str = "validation") -> dict:
    from .data import load_corpus, training_blocks
    from .distributed import is_main_process
    from .evaluation import evaluate_on, resolve_seqlen
    from .models import load_model_and_tokenizer, resolve_device, resolve_model_source, training_dtype
    from .pruning.masks import MaskKeeper, prunable_linears, sparsity_of
    from .tracking import tracked_run

    resolve_model_source(model)
    output_dir = output_dir or Path("pruned_models") / f"{Path(model).name}-trained"
    params = {"model": model, "dataset": dataset, "dtype": dtype, "device": device, "seqlen": seqlen,
              "output_dir": str(output_dir), **asdict(config)}
    with sigterm_as_interrupt():
        with tracked_run(f"train {Path(model).name} {dataset}", params, {"model": model, "dataset": dataset},
                         experiment, journal_dir=output_dir) as logger:
            lm, tokenizer = load_model_and_tokenizer(model, training_dtype(dtype), device, trust_remote_code)
            corpus = load_corpus(dataset)
            logger.set_tags(corpus.describe())
            window = resolve_seqlen(lm, seqlen)
            blocks = training_blocks(corpus, tokenizer, window)
            linears = prunable_linears(lm)
            keeper = MaskKeeper(linears)
            sparsity = sparsity_of(linears)
            print(f"training {model} ({sparsity:.2%} sparse, mask kept) on {blocks.shape[0]} blocks of {window}")
            try:
                result = train_causal_lm_logged(lm, blocks, config, keeper, logger)
            except NonFiniteLoss as fault:
                raise UserError(f"training stopped: the loss became {fault.loss} at step {fault.step}; nothing "
                                "was saved: lower --lr") from None
            changed = keeper.changed_matrices()
            if changed:
                raise RuntimeError(f"the mask changed during training in {changed[:3]}: a bug, please report it")
            ppl = evaluate_on(lm, tokenizer, corpus, split, window, resolve_device(device)).perplexity
            logger.log_dict({"sparsity": sparsity_of(linears), "validation_perplexity": ppl,
                             "train_seconds": result.seconds, "train_tokens": result.tokens})
            if is_main_process():
                lm.save_pretrained(output_dir)
                tokenizer.save_pretrained(output_dir)
    print(f"trained {result.steps} steps in {result.seconds:.0f}s: average loss of the last epoch "
          f"{result.final_loss:.4f}, {split} perplexity {ppl:.2f}, sparsity {sparsity:.2%}; saved to {output_dir}")
    return {"perplexity": ppl, "sparsity": sparsity, "epoch_losses": result.epoch_losses}


def train_causal_lm_logged(model, blocks, config: TrainConfig, keeper, logger, desc: str = "Training"):
    """train_causal_lm with train_loss/lr every log_every steps and each epoch's average loss in MLflow."""
    from .training import train_causal_lm

    result = train_causal_lm(model, blocks, config, mask_keeper=keeper, desc=desc,
                             on_log=lambda step, loss, lr: logger.log_dict({"train_loss": loss, "lr": lr}, step))
    for epoch, loss in enumerate(result.epoch_losses, start=1):
        logger.log_dict({"epoch_loss": loss}, step=epoch)
    return result
