"""SparseGPT (Frantar & Alistarh, 2023), algorithmically the reference `fasterprune`.

Per matrix: dampen H, handle dead inputs, take the upper Cholesky factor of H^-1, then sweep the
columns in blocks. In each block the mask is chosen jointly over all rows by w^2 / d^2 (d = the
factor's diagonal), and each pruned weight's error is pushed onto the not-yet-visited columns (the
OBS update), lazily batched per block. The one departure: the reference thresholds each block at
sorted[int(s * numel)], which can overshoot on ties; here each block gets an exact share of the
matrix's zeros, so the matrix lands on exactly round(s * numel). Already-zero weights stay zero.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architecture import matrix_of, set_matrix
from ..errors import UserError, option
from .masks import allocate_exactly, lowest_k_mask, zeros_to_reach
from .sequential import InputStatistics, LayerRecord, prune_sequentially

if TYPE_CHECKING:
    from ..config import PruneConfig


class SingularHessian(ValueError):
    """The dampened Hessian has no Cholesky factor: too little damping for too few calibration tokens."""


# Orders above which, on a CPU, the factorization recurses on halves (blocked right-looking Cholesky, blocked
# triangular inverse): at 1024 and above, LAPACK's own Cholesky and triangular solve ran at 20-60% of the
# matrix product's FLOP rate on 2 Xeon cores, and the halves' products run at its full rate (3072: 0.28 s ->
# 0.16 s). At and below 768 (every matrix of the embedded models) LAPACK is called as it is, on every device.
_LAPACK_ORDER = 768


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor L of a symmetric positive definite `matrix` (L L^T = matrix)."""
    order = matrix.shape[0]
    if order <= _LAPACK_ORDER or matrix.device.type != "cpu":
        return torch.linalg.cholesky(matrix)
    half = order // 2
    top = _cholesky(matrix[:half, :half])
    # [[A, B^T], [B, C]] = [[T, 0], [S, D]] [[T^T, S^T], [0, D^T]]: S = B T^-T, D D^T = C - S S^T
    side = torch.linalg.solve_triangular(top.T, matrix[half:, :half], upper=True, left=False)
    factor = torch.zeros_like(matrix)
    factor[:half, :half] = top
    factor[half:, :half] = side
    factor[half:, half:] = _cholesky(torch.addmm(matrix[half:, half:], side, side.T, alpha=-1))
    return factor


def _lower_triangular_inverse(factor: torch.Tensor) -> torch.Tensor:
    """L^-1 for a lower triangular L with a non-zero diagonal."""
    order = factor.shape[0]
    if order <= _LAPACK_ORDER or factor.device.type != "cpu":
        identity = torch.eye(order, dtype=factor.dtype, device=factor.device)
        return torch.linalg.solve_triangular(factor, identity, upper=False)
    half = order // 2
    inverse = torch.zeros_like(factor)
    inverse[:half, :half] = top = _lower_triangular_inverse(factor[:half, :half])
    inverse[half:, half:] = bottom = _lower_triangular_inverse(factor[half:, half:])
    # [[T, 0], [S, D]]^-1 = [[T^-1, 0], [-D^-1 S T^-1, D^-1]]
    inverse[half:, :half] = -(bottom @ (factor[half:, :half] @ top))
    return inverse


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U, upper triangular with a positive diagonal, such that H^-1 = U^T U (after dampening H in place).

    The reference takes a Cholesky factor of H, inverts H from it and factors the inverse again. The same U
    comes from one Cholesky factor and one triangular inverse: with J the order-reversing permutation,
    J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a positive
    diagonal, so it is H^-1's Cholesky factor (unique). Its least arithmetic is c^3/3 + c^3/3 against the
    reference's 4/3 c^3 (computed from halves, the products on triangular blocks spend some more, at GEMM rate)."""
    damp = percdamp * torch.mean(torch.diag(hessian))
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    hessian[diagonal, diagonal] += damp
    try:
        factor = _cholesky(hessian.flip(0, 1))
    except torch.linalg.LinAlgError:
        raise SingularHessian() from None
    inverse = _lower_triangular_inverse(factor)
    del factor  # at most three matrices of c^2 beside the Hessian at once, as before
    return inverse.flip(0, 1)


@torch.no_grad()
def _sweep_block(W, Hinv, kept, i1: int, i2: int, new_zeros: int, prune_n: int, prune_m: int) -> torch.Tensor:
    """Prunes columns i1:i2 of W in place, the OBS update carried to the rest of the block column by column and
    to the columns after it at once; returns each row's loss (w - q)^2 / d^2 / 2 over the block."""
    # The block transposed, so that a column of W is a contiguous row here.
    W1 = W[:, i1:i2].t().contiguous()
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    d = torch.diag(Hinv1)
    kept1 = kept[:, i1:i2].t()
    if not prune_n:  # chosen in W's own layout, where ties go to the lower flat index
        scores = (W[:, i1:i2] ** 2 / d.reshape(1, -1) ** 2).masked_fill(~kept[:, i1:i2], float("-inf"))
        mask1 = lowest_k_mask(scores, int((~kept1).sum()) + new_zeros).t()
    else:
        mask1 = ~kept1
    # The error a column's pruning makes is w * [pruned] / d: one factor per weight, known once the
    # mask is, so each column costs two operations (the sweep is a Python loop over the columns).
    scale1 = mask1 / d.reshape(-1, 1)
    for i in range(i2 - i1):
        if prune_n and i % prune_m == 0:
            group = slice(i, min(i + prune_m, i2 - i1))
            scores = (W1[group] ** 2 / d[group].reshape(-1, 1) ** 2).masked_fill(~kept1[group], float("-inf"))
            take = min(prune_n, scores.shape[0])
            lowest = torch.topk(scores, take, dim=0, largest=False).indices
            mask1[group] |= torch.zeros_like(scores, dtype=torch.bool).scatter_(0, lowest, True)
            scale1[group] = mask1[group] / d[group].reshape(-1, 1)
        err1 = torch.mul(W1[i], scale1[i], out=Err1[i])
        # OBS: the rest of the block absorbs the error; column i itself becomes w - (w - q) = q
        W1[i:].addr_(Hinv1[i, i:], err1, alpha=-1)
    # (w - q)^2 / d^2 is the squared error; the pruned weights are set to exact zeros (w - w d / d need not be)
    W[:, i1:i2] = W1.masked_fill_(mask1, 0).t()
    W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)
    return torch.sum(Err1**2, 0) / 2


def _synchronized_seconds(device: torch.device, started: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def sparsegpt_prune_matrix(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    timings: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pruned weight in weight's dtype, per-row loss sum of (w - q)^2 / d^2 / 2).

    `hessian` is consumed (modified in place). With prune_n > 0 the N:M pattern is used and `sparsity`
    is ignored: in every group of prune_m columns of a row, the prune_n lowest scores go. `timings` gains the
    seconds of the factorization and of the sweep.
    """
    timings = timings if timings is not None else {}
    started = time.perf_counter()
    W = weight.detach().clone().float()
    rows, columns = W.shape
    kept = W != 0  # the existing mask: these zeros stay zeros
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    W[:, dead] = 0
    kept[:, dead] = False
    Hinv = _upper_cholesky_of_inverse(hessian, percdamp)
    timings["factorization"] = timings.get("factorization", 0.0) + _synchronized_seconds(W.device, started)

    started = time.perf_counter()
    block_starts = list(range(0, columns, blocksize))
    block_new_zeros = [0] * len(block_starts)
    if not prune_n:
        # New zeros for the whole matrix, shared among the blocks by their remaining non-zeros.
        new_zeros = zeros_to_reach(W.numel(), int((~kept).sum()), sparsity)
        nonzeros_per_block = torch.stack([kept[:, i : i + blocksize].sum() for i in block_starts]).cpu()
        block_new_zeros = allocate_exactly(new_zeros, nonzeros_per_block).tolist()
    losses = torch.zeros(rows, device=W.device)
    for block, i1 in enumerate(block_starts):
        i2 = min(i1 + blocksize, columns)
        losses += _sweep_block(W, Hinv, kept, i1, i2, block_new_zeros[block], prune_n, prune_m)
    timings["sweep"] = timings.get("sweep", 0.0) + _synchronized_seconds(W.device, started)
    return W.to(weight.dtype), losses


def prune_with_sparsegpt(
    model: nn.Module,
    linears: dict[str, nn.Module],
    config: PruneConfig,
    windows: torch.Tensor | None,
    device: torch.device,
    progress: bool,
    sparsities: dict[str, float],
) -> list[LayerRecord]:
    """The registry's SparseGPT: decoder layer by decoder layer, each matrix from its inputs' Hessian."""
    n, m = config.n_m or (0, 0)

    def prune_matrix(name: str, module: nn.Module, stats: InputStatistics, seconds: dict):
        try:
            pruned, _ = sparsegpt_prune_matrix(
                matrix_of(module),
                stats.sum,
                sparsities[name],
                n,
                m,
                config.sparsegpt.blocksize,
                config.sparsegpt.percdamp,
                timings=seconds,
            )
        except SingularHessian:
            raise UserError(
                f"SparseGPT cannot invert the Hessian of {name}: it is singular with "
                f"{option('percdamp')} {config.sparsegpt.percdamp:g} over {windows.shape[0]} calibration windows; "
                f"raise {option('percdamp')} (the reference uses 0.01) or {option('nsamples')}"
            ) from None
        set_matrix(module, pruned)

    return prune_sequentially(
        model, linears, windows, device, True, prune_matrix, config.calibration_batch_size, progress
    )
