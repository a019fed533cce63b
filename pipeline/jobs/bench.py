"""The bench job: speed and memory against their baselines (bench.py), in an MLflow run, the table printed,
written and logged."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import BenchConfig
from ..settings import flat_values
from ..tools.bench import format_table, measure, verdicts
from ..workload import check_inputs
from . import job_run


def run_bench(config: BenchConfig) -> dict:
    out = Path(config.resolved("output_dir"))
    label = f"{Path(config.model.model).name}-{'quick' if config.quick else 'full'}"
    with job_run(
        f"bench {label}",
        params=flat_values(config),
        tags={"kind": "bench"},
        tracking=config.tracking,
        output_dir=out,
        checks=lambda: check_inputs(config.model, config.data, eval_split="test", training=True),
    ) as job:
        results = measure(config)
        table = format_table(results)
        print(table)
        (out / f"bench-{label}.json").write_text(json.dumps(results, indent=2))
        (out / f"bench-{label}.md").write_text(table + "\n")
        job.tracker.log_dict(
            {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        job.tracker.log_dict({f"target_met_{row['key']}": float(row["met"]) for row in verdicts(results)})
        job.tracker.log_artifact(out / f"bench-{label}.json")
        job.tracker.log_artifact(out / f"bench-{label}.md")
    return results
