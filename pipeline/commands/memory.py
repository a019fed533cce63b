"""`memory`: the memory formula and its check."""

from __future__ import annotations

from ..config import MemoryConfig


def memory(config: MemoryConfig) -> None:
    """Peak memory per model size (training, SparseGPT, a teacher) from the formula, checked by measurement
    on CPU."""
    from ..memory import memory_table  # deferred: see commands/__init__.py

    print(memory_table(config.measure))
