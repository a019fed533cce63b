"""A random mask of the size a criterion would prune: the control that shows whether the criterion's choice of
weights carries information (the lottery-ticket experiments' random pruning)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architecture import matrix_of
from .masks import lowest_k_mask, lowest_n_of_m, of_matrix, zeros_to_reach

if TYPE_CHECKING:
    from ..config import PruneConfig
    from .sequential import LayerRecord


@torch.no_grad()
def random_prune(linears: dict, sparsity: float | dict, seed: int, n_m: tuple | None = None) -> None:
    """Every matrix to exactly round(sparsity * numel) zeros (or N of every M), the new ones drawn uniformly
    from its non-zeros.

    The draw depends on the seed, the matrix and how many zeros it already has, so each step of an iterative
    run draws anew and the same run draws the same.
    """
    for name, module in linears.items():
        weight = matrix_of(module)
        zeros = int((weight == 0).sum())
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{zeros}".encode()))
        scores = torch.rand(weight.shape, generator=generator).masked_fill(weight.cpu() == 0, -1.0)  # zeros stay
        if n_m:
            prune = lowest_n_of_m(scores, *n_m)
        else:
            prune = lowest_k_mask(scores, zeros + zeros_to_reach(weight.numel(), zeros, of_matrix(sparsity, name)))
        weight[prune.to(weight.device)] = 0


def prune_at_random(
    model: nn.Module,
    linears: dict[str, nn.Module],
    config: PruneConfig,
    windows: torch.Tensor | None,
    device: torch.device,
    progress: bool,
    sparsities: dict[str, float],
) -> list[LayerRecord]:
    """The registry's random control: the criterion's counts, drawn from `config.seed`."""
    random_prune(linears, sparsities, config.seed, config.n_m)
    return []
