"""`compare`: the comparison grid and its report."""

from __future__ import annotations

from ..config import CompareConfig


def compare(config: CompareConfig) -> None:
    """The comparison grid: dense, one-shot SparseGPT/magnitude/Wanda and iterative at each sparsity, then the
    report; finished cells are reused."""
    from ..grid import run_grid  # deferred: see commands/__init__.py

    run_grid(config)
