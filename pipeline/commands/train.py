"""`train`: mask-preserving fine-tuning."""

from __future__ import annotations

from ..config import TrainRunConfig


def train(config: TrainRunConfig) -> None:
    """Fine-tune a (pruned) model on a dataset; pruned weights stay exactly zero."""
    from ..jobs.train import run_train  # deferred: see commands/__init__.py

    run_train(config)
