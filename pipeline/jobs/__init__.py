"""Jobs: each command's work, from its config to saved and tracked results, opened the same way.

`job_run` is every job's opening: the output directory proved writable, the tracking store reachable,
the job's own input checks (on a weightless skeleton of the model), and only then SIGTERM handled as
Ctrl-C, the output directory owned by this run, and the MLflow run opened (or reopened, when the job
continues one). Bad input therefore opens no run and writes nothing. `compare` runs the evaluate,
prune and iterative jobs as the cells of its grid, passing the cell's tags. Nothing here knows of
flags or exit codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import SavedModelConfig, TasksConfig, TrackingConfig
from ..distributed import is_main_process
from ..errors import Continuable, sigterm_as_interrupt
from ..models import save_model
from ..outputs import check_writable_dir, owned_output_dir
from ..tracking import tracked_run
from ..tracking.store import check_tracking_store
from ..workload import Workload, load_workload
from ..zeroshot import log_tasks


@dataclass
class OpenedJob:
    tracker: object  # the run's metric interface (MLflowTracker; NullTracker off the main process)
    output_dir: Path | None
    inputs: object = None  # what the job's checks returned
    resumed: dict | None = None  # what `resume` returned: the state the job continues from

    def workload(self, config, **options) -> Workload:
        """The job's model and data (checked before the run opened); the corpus's description tags the run."""
        work = load_workload(config.model, config.data, self.inputs, **options)
        self.tracker.set_tags(work.corpus.describe())
        return work


@contextlib.contextmanager
def job_run(
    name: str,
    *,
    params: dict,
    tags: dict,
    tracking: TrackingConfig,
    output_dir: Path | None = None,
    output_setting: str = "output_dir",
    checks: Callable[[], object] = lambda: None,
    resume: Callable[[Path], dict | None] | None = None,
    stop_hint: str | None = None,
    fault_hint: str | None = None,
):
    """Opens one job's tracked run. `output_dir` (None: the job has no directory of its own) is owned by the
    run throughout and keeps what a tracking outage could not send; `checks()` validates the inputs before
    anything opens; `resume(output_dir)` (inside the owned directory) returns the state to continue, whose
    `run_id` is reopened; `stop_hint` is what Ctrl-C or SIGTERM tells the user, `fault_hint` what a Continuable
    fault (a loss gone nan) does: how to continue with the command that was run."""
    main = is_main_process()  # under a launcher every process works; one checks, owns and records
    if output_dir is not None and main:
        check_writable_dir(output_dir, output_setting)
    check_tracking_store()
    inputs = checks()
    owned = (
        owned_output_dir(output_dir, output_setting) if output_dir is not None and main else contextlib.nullcontext()
    )
    try:
        with sigterm_as_interrupt(), owned:
            resumed = resume(output_dir) if resume is not None else None
            with tracked_run(
                name,
                {**params, **({"output_dir": str(output_dir)} if output_dir else {})},
                tags,
                tracking.experiment,
                resume_run_id=resumed["run_id"] if resumed else None,
                journal_dir=output_dir,
                system_metrics=tracking.system_metrics,
            ) as tracker:
                yield OpenedJob(tracker, output_dir, inputs, resumed)
    except KeyboardInterrupt as stop:
        if stop_hint:  # set on the way out, so the outermost job's, the command the user ran, is what they read
            stop.hint = stop_hint
        raise
    except Continuable as fault:
        if fault_hint:  # likewise
            fault.hint = fault_hint
        raise


def finish_model(
    tracker,
    work,
    tasks: TasksConfig,
    saved_model: SavedModelConfig,
    output_dir: Path,
    tags: dict,
    logged_model: str | None = None,
) -> None:
    """A job's model at its end: its zero-shot tasks (linked to its LoggedModel, if it has one), then (main
    process) saved, read back, and registered if asked, `tags` (sparsity, perplexity) on the version."""
    if tasks.tasks:
        log_tasks(tracker, work.model, work.tokenizer, tasks, logged_model=logged_model)
    if is_main_process():
        save_model(work.model, work.tokenizer, output_dir)
        if saved_model.register_model:
            tracker.log_model_dir(output_dir, saved_model.register_model, tags)
