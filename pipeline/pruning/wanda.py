"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architecture import matrix_of, set_matrix
from .masks import allocate_exactly, lowest_n_of_m, zeros_to_reach
from .sequential import InputStatistics, LayerRecord, prune_sequentially

if TYPE_CHECKING:
    from ..config import PruneConfig


def _lowest_per_row(scores: torch.Tensor, k_per_row: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k_per_row[r] lowest scores of each row r; ties go to the lower column."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks_pruned = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < k_per_row.unsqueeze(1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, ranks_pruned)


def lowest_per_row(scores: torch.Tensor, kept: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0):
    """Bool mask (True = prune) of the lowest `scores` compared within each output row, to `sparsity` of the whole
    matrix in exact counts (the new zeros spread over the rows by their surviving weights) or N of every M; the
    weights not `kept` (already zero) stay pruned and count toward their row's share."""
    scores = scores.masked_fill(~kept, float("-inf"))
    if prune_n:
        return lowest_n_of_m(scores, prune_n, prune_m) | ~kept
    new_zeros = zeros_to_reach(scores.numel(), int((~kept).sum()), sparsity)
    per_row = (~kept).sum(dim=1) + allocate_exactly(new_zeros, kept.sum(dim=1).cpu()).to(scores.device)
    return _lowest_per_row(scores, per_row)


def wanda_scores(weight: torch.Tensor, column_norm_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2."""
    return weight.detach().float().abs() * column_norm_sq.sqrt().reshape(1, -1)


@torch.no_grad()
def wanda_prune_matrix(
    weight: torch.Tensor, column_norm_sq: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Returns the pruned weight. Already-zero weights stay zero and count toward each row's share."""
    prune = lowest_per_row(wanda_scores(weight, column_norm_sq), weight != 0, sparsity, prune_n, prune_m)
    return weight.detach().masked_fill(prune, 0)


def prune_by_input_norms(
    prune_matrix_with, model, linears, config: PruneConfig, windows, device, progress, sparsities
) -> list[LayerRecord]:
    """Decoder layer by decoder layer, each matrix pruned by `prune_matrix_with(weight, column_norm_sq, sparsity,
    n, m)` from its inputs' squared column norms (Wanda's and RIA's statistics)."""
    n, m = config.n_m or (0, 0)

    def prune_matrix(name: str, module: nn.Module, stats: InputStatistics, seconds: dict):
        started = time.perf_counter()
        set_matrix(module, prune_matrix_with(matrix_of(module), stats.sum, sparsities[name], n, m))
        seconds["select"] = seconds.get("select", 0.0) + time.perf_counter() - started

    return prune_sequentially(
        model, linears, windows, device, False, prune_matrix, config.calibration_batch_size, progress
    )


def prune_with_wanda(
    model: nn.Module,
    linears: dict[str, nn.Module],
    config: PruneConfig,
    windows: torch.Tensor | None,
    device: torch.device,
    progress: bool,
    sparsities: dict[str, float],
) -> list[LayerRecord]:
    """The registry's Wanda: decoder layer by decoder layer, each matrix scored by its inputs' norms."""
    return prune_by_input_norms(wanda_prune_matrix, model, linears, config, windows, device, progress, sparsities)
