"""How a pruned model recovers (--recovery): fine-tuning the parameters --train-params names on the language-
model loss, or reconstructing its decoder blocks against the dense model's; either way with every pruned weight
kept at zero, and the phase's peak memory measured into its result."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig
from .peak_memory import peak_memory
from .reconstruction import reconstruct_blocks
from .training import TrainResult, train_keeping_masks


def recover(
    model: nn.Module,
    linears: dict,
    blocks: torch.Tensor,
    config: TrainConfig,
    *,
    dense: nn.Module | None = None,
    steps: int | None = None,
    desc: str = "Training",
    on_log: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """`model` recovered in place on `blocks` as `config.recovery` says: `dense` is the unpruned model that
    reconstruction fits each block to and distillation learns from (unused otherwise); `on_log` gets fine-
    tuning's logged steps (a reconstruction's per-block losses are not the model's loss: not logged)."""
    with peak_memory(next(model.parameters()).device) as peak:
        if config.recovery == "reconstruct":
            result = reconstruct_blocks(model, dense, linears, blocks, config, steps)
        else:
            teacher = dense if config.distill != "none" else None
            result = train_keeping_masks(
                model, linears, blocks, config, steps=steps, teacher=teacher, desc=desc, on_log=on_log
            )
    result.peak_memory_bytes = peak.bytes
    return result
