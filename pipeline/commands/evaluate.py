"""`evaluate`: the perplexity of a model on a dataset."""

from __future__ import annotations

from ..config import EvaluateConfig


def evaluate(config: EvaluateConfig) -> None:
    """Perplexity of a model on a dataset (windows as the SparseGPT reference cuts them), logged to MLflow."""
    from ..jobs.evaluate import run_evaluate  # deferred: see commands/__init__.py

    run_evaluate(config)
