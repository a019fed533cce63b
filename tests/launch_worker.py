"""Run by test_distributed under `accelerate launch` (DDP or FSDP2; and alone, as the reference): prunes a
model, trains it with the pipeline's loop, evaluates it, and saves what this process ended with to
<out>/rank<i>.pt (one launch runs it for each loss it is given)."""

import sys
from pathlib import Path

import torch
from loading import load_model_and_tokenizer

from pipeline.data import eval_tokens, load_corpus, training_blocks
from pipeline.distributed import process_index
from pipeline.perplexity import perplexity
from pipeline.pruning.magnitude import magnitude_prune_layerwise
from pipeline.pruning.masks import MaskKeeper, model_masks, prunable_linears, sparsity_of
from pipeline.training import TrainConfig, train_causal_lm


def train_and_record(model_dir: str, corpus_dir: str, out: Path, distill: str = "none") -> None:
    rank = process_index()
    model, tokenizer = load_model_and_tokenizer(model_dir)
    if rank > 0:  # a rank that starts from other weights prunes another mask: training must make it rank 0's
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(rank)) * 0.05)
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    corpus = load_corpus(f"text:{corpus_dir}")
    blocks = training_blocks(corpus, tokenizer, 64)
    keeper = MaskKeeper(linears)
    teacher, _ = load_model_and_tokenizer(model_dir)  # the dense model, the same on every rank
    start = {name: value.clone() for name, value in model.state_dict().items()}  # what training moves away from
    result = train_causal_lm(
        model,
        blocks,
        TrainConfig(lr=2e-3, batch_size=4, max_steps=6, log_every=2, distill=distill),
        mask_keeper=keeper,
        teacher=teacher,
        show_progress=False,
    )
    ppl = perplexity(model, eval_tokens(corpus, tokenizer, "test", 64), 64).perplexity
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "masks": model_masks(linears),
            "start": start,
            "state": model.state_dict(),
            "losses": result.epoch_losses,
            "tokens": result.tokens,
            "sparsity": sparsity_of(linears),
            "perplexity": ppl,
            "changed": keeper.changed_matrices(),
            "parallelism": result.parallelism,
            "held_parameters": result.held_parameters,
            "teacher_held_parameters": result.teacher_held_parameters,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":  # each recovery loss named in turn, in this one launch: <out>/<loss>/rank<i>.pt
    for loss in sys.argv[4].split(","):
        train_and_record(sys.argv[1], sys.argv[2], Path(sys.argv[3]) / loss, loss)
