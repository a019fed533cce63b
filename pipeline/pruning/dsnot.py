"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): training-free prune-and-grow on a Wanda mask.

Each output row i of a matrix loses, on average over the calibration windows, the output

    e_i = sum over its pruned weights j of W_ij * s_j        (s_j: input j summed over a window's tokens)

DSnoT starts from Wanda's mask and then, cycle by cycle and row by row, swaps one pruned weight for one kept
one so that e_i moves toward 0: where e_i > 0 it revives the pruned weight with the largest W_ij s_j / Var(x_j)
and prunes the kept weight of negative W_ij s_j with the lowest Wanda score; where e_i < 0 the mirror image.
The queues are ordered once, from the starting mask: a revived weight is not pruned again, nor a pruned one
revived. A row stops when |e_i| <= 0.1 or when it has no candidate left; every row stops after 50 cycles (the
published defaults and usage: the reference's optional same-sign rule is off in them, so a swap may carry e_i
past 0). Each swap revives one weight and prunes one in the same row: the sparsity is exact after every cycle.
Weights that were zero before (an earlier pruning step) are never revived.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architecture import matrix_of, set_matrix
from .sequential import InputStatistics, LayerRecord, prune_sequentially
from .wanda import lowest_per_row, wanda_scores

if TYPE_CHECKING:
    from ..config import PruneConfig

MAX_CYCLES = 50
UPDATE_THRESHOLD = 0.1  # on |e_i|
VARIANCE_POWER = 1.0  # the revival score's division by the input's variance


def _ordered(scores: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the columns of `members` in ascending order of `scores` (the rest after them), and how many."""
    order = torch.sort(scores.masked_fill(~members, float("inf")), dim=1, stable=True).indices
    return order, members.sum(dim=1)


def row_errors(weight: torch.Tensor, window_sum: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """e_i: the output each row loses to its pruned weights, on average over the windows."""
    return (weight.float() * window_sum.reshape(1, -1) * prune).sum(dim=1)


@torch.no_grad()
def dsnot_mask(
    weight: torch.Tensor,
    column_norm_sq: torch.Tensor,
    window_sum: torch.Tensor,
    variance: torch.Tensor,
    sparsity: float,
    max_cycles: int = MAX_CYCLES,
    threshold: float = UPDATE_THRESHOLD,
) -> torch.Tensor:
    """The mask (True = prune) of `weight` [out, in] after at most `max_cycles` cycles of DSnoT on Wanda's mask at
    `sparsity`; `column_norm_sq`, `window_sum` and `variance` are its inputs' statistics per column."""
    W = weight.detach().float()
    wanda = wanda_scores(W, column_norm_sq)
    prune = lowest_per_row(wanda, W != 0, sparsity)
    contribution = W * window_sum.float().reshape(1, -1)
    revival = contribution / variance.float().clamp_min(1e-12).pow(VARIANCE_POWER).reshape(1, -1)
    revivable, kept = prune & (W != 0), ~prune
    # four queues per row: what to revive (most positive, most negative first) and what to prune (lowest Wanda
    # score first, among the kept weights of negative and of positive contribution)
    queues = [
        _ordered(-revival, revivable & (contribution > 0)),
        _ordered(revival, revivable & (contribution < 0)),
        _ordered(wanda, kept & (contribution < 0)),
        _ordered(wanda, kept & (contribution > 0)),
    ]
    orders, counts = [order for order, _ in queues], torch.stack([count for _, count in queues], 1)
    taken = torch.zeros((W.shape[0], 4), dtype=torch.long, device=W.device)
    error = row_errors(W, window_sum.float(), prune)
    active = torch.ones_like(error, dtype=torch.bool)
    rows = torch.arange(W.shape[0], device=W.device)
    for _ in range(max_cycles):
        high = error > 0  # revive a positive contribution and prune a negative one; low rows the mirror image
        grow_queue, prune_queue = torch.where(high, 0, 1), torch.where(high, 2, 3)
        left = counts - taken
        available = (left[rows, grow_queue] > 0) & (left[rows, prune_queue] > 0)
        position = taken.clamp_max(W.shape[1] - 1)
        picks = torch.stack([order.gather(1, position[:, k : k + 1]).squeeze(1) for k, order in enumerate(orders)], 1)
        grow, cut = picks[rows, grow_queue], picks[rows, prune_queue]
        after = error - contribution[rows, grow] + contribution[rows, cut]
        active &= available & (error.abs() > threshold)
        if not active.any():
            break
        live = rows[active]
        prune[live, grow[active]] = False
        prune[live, cut[active]] = True
        error = torch.where(active, after, error)
        taken[live, grow_queue[active]] += 1
        taken[live, prune_queue[active]] += 1
    return prune


def prune_with_dsnot(
    model: nn.Module,
    linears: dict[str, nn.Module],
    config: PruneConfig,
    windows: torch.Tensor | None,
    device: torch.device,
    progress: bool,
    sparsities: dict[str, float],
) -> list[LayerRecord]:
    """The registry's DSnoT: decoder layer by decoder layer, each matrix's Wanda mask then its prune-and-grow
    cycles, from its inputs' norms, sums and variances."""

    def prune_matrix(name: str, module: nn.Module, stats: InputStatistics, seconds: dict):
        started = time.perf_counter()
        weight = matrix_of(module)
        mask = dsnot_mask(weight, stats.sum, stats.window_sum, stats.variance, sparsities[name])
        set_matrix(module, weight.detach().masked_fill(mask, 0))
        seconds["select"] = seconds.get("select", 0.0) + time.perf_counter() - started

    return prune_sequentially(
        model, linears, windows, device, False, prune_matrix, config.calibration_batch_size, progress, moments=True
    )
