"""`evaluate`: load, tokenize once, compute perplexity, record it."""

from __future__ import annotations

from .errors import UserError


def resolve_seqlen(model, seqlen: int | None) -> int:
    from .models import max_positions

    limit = max_positions(model)
    if seqlen is None:
        return limit
    if seqlen > limit:
        raise UserError(f"--seqlen {seqlen} is above the model's {limit} positions; use at most {limit}",
                        exit_code=2)
    return seqlen


def load_for_evaluation(model_name: str, dataset: str, dtype: str, device: str, seqlen: int | None,
                        trust_remote_code: bool = False):
    """(model, tokenizer, corpus, seqlen): the inputs every command starts from."""
    from .data import load_corpus
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype, device=device,
                                                trust_remote_code=trust_remote_code)
    window = resolve_seqlen(model, seqlen)  # a bad --seqlen fails before the corpus is built
    return model, tokenizer, load_corpus(dataset), window


def evaluate_on(model, tokenizer, corpus, split: str, seqlen: int, device, batch_size: int | None = None):
    """PerplexityResult with the whole model on `device` for the evaluation, back where it was after."""
    from .data import eval_tokens
    from .perplexity import perplexity

    home = next(model.parameters()).device
    model.to(device)
    try:
        return perplexity(model, eval_tokens(corpus, tokenizer, split, seqlen), seqlen, batch_size)
    finally:
        model.to(home)


def evaluate_command(*, model: str, dataset: str, dtype: str, device: str, seqlen: int | None,
                     experiment: str | None, trust_remote_code: bool, split: str, batch_size: int | None):
    from .models import resolve_model_source
    from .tracking import tracked_run

    resolve_model_source(model)  # a misspelt name fails before a run is opened
    params = {"model": model, "dataset": dataset, "dtype": dtype, "device": device, "seqlen": seqlen,
              "split": split, "batch_size": batch_size}
    with tracked_run(f"evaluate {model} {dataset}", params, {"model": model, "dataset": dataset},
                     experiment) as logger:
        lm, tokenizer, corpus, window = load_for_evaluation(model, dataset, dtype, device, seqlen,
                                                            trust_remote_code)
        logger.set_tags(corpus.describe())
        logger.log_params({"resolved_seqlen": window, "resolved_dtype": str(next(lm.parameters()).dtype)})
        result = evaluate_on(lm, tokenizer, corpus, split, window, next(lm.parameters()).device, batch_size)
        logger.log_dict(result.metrics())
    print(f"{model} on {dataset} ({split}, {result.windows} windows of {window} tokens): "
          f"perplexity {result.perplexity:.4f}")
    return result
