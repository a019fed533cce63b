"""Perplexity exactly as the SparseGPT reference computes it (see the README, "What is computed").

The token stream is cut into non-overlapping windows of `seqlen` tokens, the last partial window is
dropped, and ppl = exp(mean over windows of each window's mean next-token NLL). Unlike the reference,
several windows go through the model per forward, and the loss is taken in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import windows_per_forward
from .data import Corpus, eval_tokens
from .distributed import gather_window_nlls, num_processes, process_index


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    tokens: int
    seconds: float

    def metrics(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "eval_tokens": self.tokens,
            "eval_windows": self.windows,
            "eval_seconds": self.seconds,
        }


def window_nlls(model: nn.Module, input_ids: torch.Tensor, seqlen: int, batch_size: int | None = None) -> torch.Tensor:
    """Mean next-token NLL of each full window, float64 on CPU, shape [n_windows]. Under a multi-process
    launch each process takes every num_processes-th window and the results are gathered."""
    n_windows = input_ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"{input_ids.numel()} tokens make no window of {seqlen}")
    device = next(model.parameters()).device
    windows = input_ids.reshape(-1)[: n_windows * seqlen].view(n_windows, seqlen)
    batch_size = batch_size or windows_per_forward(seqlen, model.config.vocab_size, device)
    was_training = model.training
    model.eval()
    nlls = []
    mine = torch.arange(n_windows)[process_index() :: num_processes()]
    with torch.inference_mode():
        for start in range(0, len(mine), batch_size):
            batch = windows[mine[start : start + batch_size]].to(device)
            logits = model(batch, use_cache=False).logits[:, :-1, :]
            token_nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            )
            nlls.append(token_nll.view(batch.shape[0], -1).mean(dim=1).double().cpu())
    model.train(was_training)
    return gather_window_nlls(mine, torch.cat(nlls) if nlls else torch.empty(0, dtype=torch.float64), n_windows)


def perplexity(
    model: nn.Module, input_ids: torch.Tensor, seqlen: int, batch_size: int | None = None
) -> PerplexityResult:
    started = time.perf_counter()
    nlls = window_nlls(model, input_ids, seqlen, batch_size)
    return PerplexityResult(
        perplexity=math.exp(nlls.mean().item()),
        windows=nlls.numel(),
        tokens=nlls.numel() * seqlen,
        seconds=time.perf_counter() - started,
    )


def evaluate_on(
    model: nn.Module, tokenizer, corpus: Corpus, split: str, seqlen: int, device, batch_size: int | None = None
) -> PerplexityResult:
    """Perplexity of `split`, with the whole model on `device` for the evaluation and back where it was after."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        return perplexity(model, eval_tokens(corpus, tokenizer, split, seqlen), seqlen, batch_size)
    finally:
        model.to(home)
