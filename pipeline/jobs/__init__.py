"""Jobs: one tracked MLflow run each (evaluate, prune, train, iterative), from a config to saved results.

The commands are thin wrappers of these, and `compare` runs them as the cells of its grid, passing the
cell's tags; nothing here knows of flags or exit codes.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RegistryConfig, TasksConfig
from ..models import save_model
from ..zeroshot import log_tasks


def finish_model(logger, work, tasks: TasksConfig, registry: RegistryConfig, output_dir: Path, tags: dict,
                 main: bool) -> None:
    """A job's model at its end: its zero-shot tasks, then (main process) saved, read back, and registered if
    asked, `tags` (sparsity, perplexity) on the version."""
    if tasks.tasks:
        log_tasks(logger, work.model, work.tokenizer, tasks)
    if main:
        save_model(work.model, work.tokenizer, output_dir)
        if registry.register_model:
            logger.log_model_dir(output_dir, registry.register_model, tags)
