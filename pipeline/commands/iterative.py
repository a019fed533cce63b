"""`iterative`: the main job."""

from __future__ import annotations

from ..config import IterativeConfig


def iterative(config: IterativeConfig) -> None:
    """Iterative magnitude pruning with recovery training, checkpointed after every iteration (the main job)."""
    from ..jobs.iterative import run_iterative  # deferred: see commands/__init__.py

    run_iterative(config)
