"""Sparsity schedules for iterative pruning: how sparse the model is after each iteration."""

from __future__ import annotations

import math


def iterations_to_reach(target: float, fraction: float) -> int:
    """n = ceil(log(1 - s) / log(1 - p)): pruning p of the remainder n times zeroes 1 - (1-p)^n."""
    if target <= 0:
        return 0
    # Rounding first keeps exact cases exact: s = 0.19, p = 0.1 is 2 iterations, not 3.
    return math.ceil(round(math.log(1 - target) / math.log(1 - fraction), 9))


def geometric_schedule(target: float, fraction: float) -> list[float]:
    """1 - (1-p)^k for k = 1..n-1, then exactly the target (the last step prunes only what is needed)."""
    n = iterations_to_reach(target, fraction)
    return [1 - (1 - fraction) ** k for k in range(1, n)] + [target] if n else []


def cubic_schedule(target: float, iterations: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - t/T)^3 for t = 1..T; fast early, gentle late."""
    return [target + (initial - target) * (1 - t / iterations) ** 3 for t in range(1, iterations + 1)]


SCHEDULES = {
    "geometric": geometric_schedule,
    "cubic": lambda target, fraction: cubic_schedule(target, iterations_to_reach(target, fraction)),
    # the equal-budget controls: as many iterations of training as geometric, pruned at once or never
    "one-shot": lambda target, fraction: [target] * iterations_to_reach(target, fraction),
    "dense": lambda target, fraction: [0.0] * iterations_to_reach(target, fraction),
}
SPARSITY_SCHEDULES = tuple(SCHEDULES)


def sparsity_schedule(kind: str, target: float, fraction: float) -> list[float]:
    """The per-iteration targets, uncapped; every schedule has the geometric iteration count."""
    return SCHEDULES[kind](target, fraction)


def budget_steps(budget: int, tokens_per_step: int) -> int:
    """A budget of training tokens in optimizer steps: rounded to the nearest whole step (halves up), at least one."""
    return max(1, math.floor(budget / tokens_per_step + 0.5))


def split_steps(steps: int, iterations: int) -> list[int]:
    """`steps` over `iterations` as evenly as whole steps allow: each floor(steps / n), and the last steps mod n
    iterations one more (the sparsest models get the extra step)."""
    if iterations <= 0:
        return []
    share, extra = divmod(steps, iterations)
    return [share + (k >= iterations - extra) for k in range(iterations)]


def learning_rate_for(iteration: int, iterations: int, first: float, last: float) -> float:
    """Geometric decay from the first iteration's lr to the last's (e.g. 1e-5 early, 1e-6 late)."""
    if iterations <= 1 or first == last:
        return first
    return first * (last / first) ** ((iteration - 1) / (iterations - 1))
