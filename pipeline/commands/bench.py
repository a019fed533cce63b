"""`bench`: speed and memory against their baselines."""

from __future__ import annotations

from ..config import BenchConfig


def bench(config: BenchConfig) -> None:
    """Speed and memory of the hot paths, side by side with their baselines, against targets."""
    from ..bench import run_bench_job  # deferred: see commands/__init__.py

    run_bench_job(config)
