"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance and activations.

A weight's score is its share of its row's and of its column's total magnitude, times its input's activation
norm to the power a = 0.5 (the published default):

    RIA_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ 0.5

compared within each output row, as Wanda is (the reference's unstructured and N:M selection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .sequential import LayerRecord
from .wanda import lowest_per_row, prune_by_input_norms

if TYPE_CHECKING:
    from ..config import PruneConfig

ACTIVATION_POWER = 0.5  # the paper's a


def ria_scores(weight: torch.Tensor, column_norm_sq: torch.Tensor, power: float = ACTIVATION_POWER) -> torch.Tensor:
    """The RIA score of every weight of `weight` [out, in], `column_norm_sq` the squared norms of its inputs."""
    magnitude = weight.detach().float().abs()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column has no share to give: its scores stay 0
    relative = magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
    relative = relative + magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
    return relative * column_norm_sq.float().sqrt().pow(power).reshape(1, -1)


@torch.no_grad()
def ria_prune_matrix(
    weight: torch.Tensor, column_norm_sq: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Returns the pruned weight. Already-zero weights stay zero and count toward each row's share."""
    prune = lowest_per_row(ria_scores(weight, column_norm_sq), weight != 0, sparsity, prune_n, prune_m)
    return weight.detach().masked_fill(prune, 0)


def prune_with_ria(
    model: nn.Module,
    linears: dict[str, nn.Module],
    config: PruneConfig,
    windows: torch.Tensor | None,
    device: torch.device,
    progress: bool,
    sparsities: dict[str, float],
) -> list[LayerRecord]:
    """The registry's RIA: decoder layer by decoder layer, each matrix scored by its weights' relative importance
    and its inputs' norms."""
    return prune_by_input_norms(ria_prune_matrix, model, linears, config, windows, device, progress, sparsities)
