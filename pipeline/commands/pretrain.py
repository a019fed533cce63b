"""`pretrain`: rebuilds the embedded model."""

from __future__ import annotations

from ..config import PretrainConfig


def pretrain(config: PretrainConfig) -> None:
    """Train the embedded opt-tiny from scratch on the pydocs corpus (reproduces the shipped model)."""
    from ..pretrain import run_pretrain  # deferred: see commands/__init__.py

    run_pretrain(config)
