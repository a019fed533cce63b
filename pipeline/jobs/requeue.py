"""`--slurm-requeue`: a cell job that Slurm stops (preemption, the time limit) is requeued by submitit, and the
cell resumes from its last completed iteration's checkpoint. Imported only when asked for: submitit is an
optional extra."""

from __future__ import annotations

import submitit


class RequeuedCell(submitit.helpers.Checkpointable):
    """submitit's Checkpointable: on the signal Slurm sends before stopping the job, it submits the same call
    again; the cell's own checkpoint makes that a continuation, not a restart."""

    def __call__(self, spec: dict) -> str:
        from .cell import run_cell_job

        return run_cell_job(spec)
