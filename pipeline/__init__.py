"""Iterative magnitude pruning vs one-shot pruning of causal LMs, tracked in MLflow."""

__version__ = "0.1.0"
