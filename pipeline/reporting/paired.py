"""Paired comparisons over seeds: the cells of one seed share its calibration draw and data order, so two
methods are compared seed by seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30 the normal's 1.96 is within 2%).
T_95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042,
}  # fmt: skip


@dataclass(frozen=True)
class Paired:
    """`other` minus `best` per seed: the mean, its 95% t-interval (nan with one seed), and on how many seeds
    `best` is the lower (better) of the two."""

    mean: float
    low: float
    high: float
    better: int
    seeds: int


def paired_difference(best: pd.DataFrame, other: pd.DataFrame, column: str = "perplexity") -> Paired | None:
    """Over the seeds both cells ran; None when they share none."""
    joined = (
        best.set_index("seed")[column]
        .to_frame("best")
        .join(other.set_index("seed")[column].to_frame("other"), how="inner")
    )
    differences = (joined["other"] - joined["best"]).tolist()
    n = len(differences)
    if n == 0:
        return None
    mean = sum(differences) / n
    if n == 1:
        return Paired(mean, math.nan, math.nan, int(differences[0] > 0), 1)
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = T_95.get(n - 1, 1.96) * std / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, sum(d > 0 for d in differences), n)
