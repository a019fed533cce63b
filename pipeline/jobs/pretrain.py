"""The pretrain job: an embedded-size model trained from scratch on pydocs, tracked in MLflow."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psutil

from ..config import PretrainConfig
from ..errors import ConfigError, option
from ..settings import flat_values
from ..tools.memory import GIB, training_bytes
from ..tools.pretrain import model_config, pretrain
from . import job_run


def check_memory(config: PretrainConfig) -> None:
    """The model's training memory (the `memory` formula: float32 weights, AdamW, activations, logits) against
    what this machine has free, before anything is allocated."""

    def at_depth(layers: int) -> int:  # built on the meta device: a deep model takes long even there
        shallow = replace(config, num_layers=layers)
        return training_bytes(model_config(shallow), config.batch_size, config.max_positions, 4, 4)["total"]

    one, two = at_depth(1), at_depth(2)
    needed = one + (config.num_layers - 1) * (two - one)  # every term of the formula is linear in the depth
    free = psutil.virtual_memory().available
    if needed > free:
        raise ConfigError(
            f"{option('hidden_size')} {config.hidden_size}, {option('num_layers')} {config.num_layers}, "
            f"{option('batch_size')} {config.batch_size} and {option('max_positions')} {config.max_positions} need "
            f"about {needed / GIB:,.1f} GiB to train and this machine has {free / GIB:,.1f} GiB free: make the "
            "model or the batch smaller"
        )


def run_pretrain(config: PretrainConfig) -> dict:
    output_dir = Path(config.resolved("output_dir"))
    with job_run(
        f"pretrain {config.name} pydocs",
        params=flat_values(config),
        tags={"model": config.name, "dataset": "pydocs"},
        tracking=config.tracking,
        output_dir=output_dir,
        checks=lambda: check_memory(config),
    ) as job:
        summary = pretrain(
            config,
            on_log=lambda step, metrics: job.tracker.log_dict(
                {"train_loss": metrics["loss"], "lr": metrics["lr"]}, step
            ),
        )
        job.tracker.set_tags({k: v for k, v in summary["corpus"].items() if k != "dataset"})
        job.tracker.log_dict(
            {
                "test_perplexity": summary["test_perplexity"],
                "validation_perplexity": summary["validation_perplexity"],
                "train_seconds": summary["train_seconds"],
            }
        )
    print(
        f"{config.name} saved to {output_dir}: test perplexity {summary['test_perplexity']:.2f}, "
        f"{summary['train_seconds'] / 60:.1f} min of training"
    )
    return summary
