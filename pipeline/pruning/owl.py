"""OWL, outlier-weighed layerwise sparsity (Yin et al., ICML 2024): a sparsity per decoder layer, not one for all.

A layer's outlier ratio D_l is the share of its Wanda scores |W_ij| * ||X_j|| (over all its prunable matrices
together) above M times their mean. The ratios are scaled linearly onto [0, 2 lambda], and layer l keeps
density (1 - S) + (scaled_l - mean of scaled): a layer with more outliers is pruned less and the layers' mean
sparsity is the target S (the reference code's formula, and llm-compressor's `sparsity_profile="owl"`).
The paper bounds each layer to [S - lambda, S + lambda]; the formula alone keeps that only when the ratios are
spread evenly (a skewed spread puts a layer up to 2 lambda away), so a layer beyond the bound is held at it and
all layers shift by one constant that restores the mean: the reference's values whenever they are in bounds.

Then the counts: the whole set gets exactly round(S * N) zeros, shared among the layers in proportion to
their sparsity times their size (cumulative rounding), never fewer in a layer than the zeros it already holds
(an iterative step cannot unprune), and within a layer shared among its matrices by their sizes.
"""

from __future__ import annotations

import torch

from .masks import allocate_exactly


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Percent of the scores above m times their mean."""
    scores = scores.reshape(-1).float()
    return 100.0 * float((scores > scores.mean() * m).sum()) / scores.numel()


def owl_layer_sparsities(ratios: list, target: float, lam: float) -> list:
    """Each layer's sparsity from its outlier ratio (percent), the layers' mean being `target`."""
    ratios = torch.tensor(ratios, dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratios)
    return [float(1 - ((1 - target) + value - scaled.mean())) for value in scaled]


def within_bounds(sparsities: list, sizes: list, target: float, lam: float) -> list:
    """The layers' sparsities held to [target - lam, target + lam], shifted by the one constant that keeps their
    size-weighted mean at `target` (found by bisection: the clipped mean rises monotonically with the shift)."""
    sizes = [float(n) for n in sizes]

    def shifted(c: float) -> list:
        return [min(max(s + c, target - lam), target + lam) for s in sparsities]

    def mean(values: list) -> float:
        return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)

    if all(target - lam <= s <= target + lam for s in sparsities):
        return list(sparsities)
    low, high = -2 * lam - 1, 2 * lam + 1
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if mean(shifted(middle)) < target else (low, middle)
    return shifted((low + high) / 2)


def allocate_with_floors(total: int, weights: list, floors: list) -> list:
    """Splits `total` in proportion to `weights` (cumulative rounding, so it sums to exactly `total`), each slot
    getting at least its floor: slots the proportional share would put below their floor are held at it and
    the rest is shared again among the others. Needs total >= sum(floors)."""
    if total < sum(floors):
        raise ValueError(f"cannot allocate {total} with floors summing to {sum(floors)}")
    held = [False] * len(weights)
    while True:
        free = [i for i in range(len(weights)) if not held[i]]
        rest = total - sum(floors[i] for i in range(len(weights)) if held[i])
        shares = allocate_exactly(rest, torch.tensor([float(weights[i]) for i in free])).tolist() if free else []
        below = [i for i, share in zip(free, shares) if share < floors[i]]
        if not below:
            counts = list(floors)
            for i, share in zip(free, shares):
                counts[i] = share
            return counts
        for i in below:
            held[i] = True


def matrix_zero_counts(layers: list, sparsities: list, target: float) -> dict:
    """Name -> zeros for every matrix: exactly round(target * N) in all; layer l's share in proportion to
    sparsities[l] times its size, at least the zeros it holds; within a layer, by the matrices' sizes (at least
    each one's own zeros). `layers`: per decoder layer, {name: (numel, zeros it holds now)}."""
    sizes = [sum(numel for numel, _ in layer.values()) for layer in layers]
    total = round(target * sum(sizes))
    layer_zeros = allocate_with_floors(
        total,
        [s * n for s, n in zip(sparsities, sizes)],
        [sum(zeros for _, zeros in layer.values()) for layer in layers],
    )
    counts = {}
    for layer, zeros in zip(layers, layer_zeros):
        names = list(layer)
        shares = allocate_with_floors(zeros, [layer[n][0] for n in names], [layer[n][1] for n in names])
        counts.update(zip(names, shares))
    return counts


def layer_sparsity_csv(layer_sparsities: dict, profile: list) -> str:
    """One row per decoder layer: the sparsity it holds, and under OWL its outlier ratio, the formula's sparsity
    and the bounded one it was pruned to."""
    planned = {str(p.layer): p for p in profile}
    lines = ["layer,sparsity,outlier_ratio,owl_sparsity,bounded_sparsity"]
    for layer, sparsity in sorted(layer_sparsities.items(), key=lambda item: int(item[0])):
        p = planned.get(str(layer))
        extra = f"{p.outlier_ratio:.6g},{p.owl_sparsity:.6g},{p.bounded_sparsity:.6g}" if p else ",,"
        lines.append(f"{layer},{sparsity:.6g},{extra}")
    return "\n".join(lines) + "\n"


def layer_sparsity_metrics(layer_sparsities: dict) -> dict:
    """One MLflow metric per decoder layer (`layer_sparsity/<index>`, grouped as one section in the UI)."""
    return {f"layer_sparsity/{layer}": sparsity for layer, sparsity in layer_sparsities.items()}
