"""Which parameters a recovery trains (`--train-params`): all of them, only the norms and biases, or low-rank
adapters kept inside the mask.

- `norms-biases` (Zimmer et al., "PERP"): LayerNorm/RMSNorm weights and biases and every bias; every
  matrix (the prunable ones, embeddings, lm_head) stays frozen, bit for bit, and needs no optimizer state.
- `lora`, masked (PERP's "MaskLoRA"): each chosen prunable matrix W gets a low-rank update whose effective
  weight is W + (alpha / r) (B A) ⊙ M, M the matrix's mask (W != 0). The update is masked at every step, so
  the model is sparse while it trains, not only after a merge; at the end of a training phase it is merged
  into W, and the merged weight has exactly the mask's zeros. A is drawn as nn.Linear's weights are, B
  starts at zero (the model starts where it was). Only A and B train.

The adapter is a `torch.nn.utils.parametrize` parametrization of the weight, not peft's LoRA layer: peft adds
B A to the layer's output, which cannot apply a mask to the update (a merge then fills the pruned weights:
the sparsity loss reported for Wanda's LoRA recipe), while a parametrization computes the masked effective
weight itself, for Linear and GPT-2's Conv1D alike.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from .architecture import matrix_of, norm_modules
from .errors import ConfigError, option


class MaskedLoRA(nn.Module):
    """weight -> weight + scale * (B @ A) * mask, B @ A shaped as the stored weight."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        rows, columns = weight.shape
        self.register_buffer("mask", weight.detach() != 0, persistent=False)  # bool: a byte per weight
        self.A = nn.Parameter(torch.empty(rank, columns, dtype=weight.dtype, device=weight.device))
        self.B = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear draws its weights, and LoRA its A
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A) * self.scale * self.mask


def lora_targets(linears: dict, targets: str | None) -> dict:
    """The prunable matrices that get an adapter: all, or those whose name the regex `targets` matches."""
    return {name: m for name, m in linears.items() if not targets or re.search(targets, name)}


def check_lora(linears: dict, rank: int, targets: str | None) -> None:
    """Refuses, before any work, a `--lora-targets` that matches none of the prunable matrices (naming what
    they are called) and a `--lora-rank` that is no low-rank update of some target (at least its smaller
    side; naming the largest rank every target takes)."""
    chosen = lora_targets(linears, targets)
    if not chosen:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
        example = next(iter(linears), "")
        raise ConfigError(
            f"{option('lora_targets')} '{targets}' matches none of the prunable matrices: they are named like "
            f"{example} (kinds: {', '.join(kinds)}); give a regex of those, e.g. {'|'.join(kinds[:2])}"
        )
    name, smallest = min(((n, min(matrix_of(m).shape)) for n, m in chosen.items()), key=lambda item: item[1])
    if rank >= smallest:
        raise ConfigError(
            f"{option('lora_rank')} {rank} is no low-rank update of {name}, whose smaller side is {smallest}: "
            f"give at most {smallest - 1} (or narrow {option('lora_targets')})"
        )


def attach_lora(linears: dict, rank: int, alpha: float, targets: str | None = None) -> list:
    """Adapters on the chosen matrices; returns their parameters (A and B of each)."""
    adapters = []
    for module in lora_targets(linears, targets).values():
        parametrize.register_parametrization(module, "weight", MaskedLoRA(module.weight, rank, alpha))
        adapter = module.parametrizations.weight[0]
        adapters += [adapter.A, adapter.B]
    return adapters


@torch.no_grad()
def merge_lora(linears: dict) -> None:
    """Every adapter folded into its weight (W + scale (B A) ⊙ M), the parametrization removed; pruned weights
    set to +0.0 (a masked negative update would leave -0.0 there)."""
    for module in linears.values():
        if parametrize.is_parametrized(module, "weight"):
            mask = module.parametrizations.weight[0].mask
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.masked_fill_(~mask, 0.0)


def norm_and_bias_parameters(model: nn.Module) -> list:
    """The norms' weights and biases, and every bias."""
    chosen = {id(p): p for m in norm_modules(model) for p in m.parameters(recurse=False)}
    chosen.update({id(p): p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"})
    return list(chosen.values())


@contextlib.contextmanager
def trained_parameters(model: nn.Module, linears: dict, mode: str, rank: int = 8, alpha: float = 16.0, targets=None):
    """Within the block only the parameters `mode` trains require gradients (so only they get optimizer
    state); yields them. On leaving: lora's adapters merged, every parameter requiring gradients again."""
    if mode == "all":
        yield [p for p in model.parameters() if p.requires_grad]
        return
    model.requires_grad_(False)
    try:
        chosen = attach_lora(linears, rank, alpha, targets) if mode == "lora" else norm_and_bias_parameters(model)
        for parameter in chosen:
            parameter.requires_grad_(True)
        yield chosen
    finally:
        merge_lora(linears)
        model.requires_grad_(True)
