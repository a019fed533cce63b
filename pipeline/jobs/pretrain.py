"""The pretrain job: an embedded-size model trained from scratch on pydocs, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

from ..config import PretrainConfig
from ..pretrain import pretrain
from ..settings import flat_values
from . import job_run


def run_pretrain(config: PretrainConfig) -> dict:
    output_dir = Path(config.resolved("output_dir"))
    with job_run(
        f"pretrain {config.name} pydocs",
        params=flat_values(config),
        tags={"model": config.name, "dataset": "pydocs"},
        tracking=config.tracking,
        output_dir=output_dir,
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
