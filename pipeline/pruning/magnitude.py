"""Magnitude pruning: per matrix (the SparseGPT paper's baseline) or one global threshold (open_lth)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architecture import in_features, matrix_of, set_matrix
from .masks import lowest_k_mask, of_matrix, zeros_to_reach
from .wanda import wanda_prune_matrix

if TYPE_CHECKING:
    from ..config import PruneConfig
    from .sequential import LayerRecord


@torch.no_grad()
def magnitude_prune_layerwise(linears: dict, sparsity: float | dict) -> None:
    """Every matrix to exactly round(sparsity * numel) zeros (never fewer than it already has); `sparsity` one
    fraction for all, or name -> each matrix's own."""
    for name, module in linears.items():
        weight = matrix_of(module)  # [out, in], so ties break in the same order for Linear and Conv1D
        zeros = int((weight == 0).sum())
        k = zeros + zeros_to_reach(weight.numel(), zeros, of_matrix(sparsity, name))
        weight[lowest_k_mask(weight.abs(), k)] = 0


@torch.no_grad()
def magnitude_prune_global(linears: dict, sparsity: float) -> None:
    """One threshold over all matrices: exactly round(sparsity * total) zeros in the whole set."""
    weights = [matrix_of(m) for m in linears.values()]
    scores = torch.cat([w.detach().abs().reshape(-1).float().cpu() for w in weights])
    zeros = int((scores == 0).sum())
    k = zeros + zeros_to_reach(scores.numel(), zeros, sparsity)
    prune = lowest_k_mask(scores, k)
    offset = 0
    for weight in weights:
        n = weight.numel()
        weight[prune[offset : offset + n].view_as(weight).to(weight.device)] = 0
        offset += n


def prune_by_magnitude(
    model: nn.Module,
    linears: dict[str, nn.Module],
    config: PruneConfig,
    windows: torch.Tensor | None,
    device: torch.device,
    progress: bool,
    sparsities: dict[str, float],
) -> list[LayerRecord]:
    """The registry's magnitude criterion: per matrix, one global threshold (`scope`), or N:M."""
    if config.n_m:  # N:M by magnitude is Wanda's selection with unit input norms
        for module in linears.values():
            ones = torch.ones(in_features(module), device=module.weight.device)
            set_matrix(module, wanda_prune_matrix(matrix_of(module), ones, 0.0, *config.n_m))
    elif config.scope == "global":
        magnitude_prune_global(linears, config.fraction)
    else:
        magnitude_prune_layerwise(linears, sparsities)
    return []
