"""`prune`: one-shot pruning."""

from __future__ import annotations

from ..config import PruneRunConfig


def prune(config: PruneRunConfig) -> None:
    """One-shot pruning (magnitude, SparseGPT, Wanda): dense and pruned perplexity, saved model."""
    from ..jobs.prune import run_prune  # deferred: see commands/__init__.py

    run_prune(config)
