"""The memory job: the memory formula's table, checked by measurement on the CPU. It opens no MLflow run:
it reads nothing and saves nothing, and its table is what it prints."""

from __future__ import annotations

from ..config import MemoryConfig
from ..tools.memory import memory_table


def run_memory(config: MemoryConfig) -> str:
    table = memory_table(config.measure)
    print(table)
    return table
