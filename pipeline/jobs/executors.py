"""Where a grid's cells run when they do not run one after another in the compare process: a pool of local
processes (`--parallel N`, each cell `python -m pipeline cell SPEC.json`, its own GPUs and its share of the
threads), or a submitit job array (`--executor submitit`: Slurm on a cluster, submitit's local executor off
one). Each returns one Outcome per cell; a cell that fails does not stop the others."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import ConfigError, UserError, option
from ..local_server import die_with_parent
from .cell import CLAIMED, cell_command, run_cell_job, write_spec


@dataclass
class Outcome:
    key: str
    state: str  # finished | failed | claimed (another process runs it)
    log: Path | None = None


class Progress:
    """One line each time the counts change: cells done / running / failed / waiting."""

    def __init__(self, total: int):
        self.total, self.last = total, None

    def show(self, done: int, running: int, failed: int) -> None:
        line = (
            f"cells: {done} done, {running} running, {failed} failed, "
            f"{self.total - done - running - failed} waiting (of {self.total})"
        )
        if line != self.last:
            print(line, flush=True)
            self.last = line


def gpu_count() -> int:
    import torch  # deferred: the pool itself needs no torch

    return torch.cuda.device_count()


def run_local_pool(specs: list, parallel: int, gpus_per_cell: int, gpus: int, folder: Path, env: dict) -> list:
    """`parallel` cells at a time, each its own process with its log in folder/logs/<key>.log; with `gpus` to
    share out, each gets `gpus_per_cell` of its own (CUDA_VISIBLE_DEVICES). Ctrl-C or SIGTERM stops them all."""
    pending, running, outcomes = list(specs), {}, []
    free = list(range(parallel))
    progress = Progress(len(specs))
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    try:
        while pending or running:
            while pending and free:
                slot, spec = free.pop(0), pending.pop(0)
                cell_env = dict(env)
                if gpus:
                    devices = range(slot * gpus_per_cell, (slot + 1) * gpus_per_cell)
                    cell_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
                log = folder / "logs" / f"{spec['key']}.log"
                with open(log, "ab") as handle:
                    process = subprocess.Popen(
                        cell_command(write_spec(spec, folder / "cells"), gpus_per_cell if gpus else 1),
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        env=cell_env,
                        preexec_fn=die_with_parent,  # a SIGKILLed compare leaves no cell running
                    )
                running[slot] = (process, spec, log)
            for slot, (process, spec, log) in list(running.items()):
                code = process.poll()
                if code is not None:
                    state = "finished" if code == 0 else "claimed" if code == CLAIMED else "failed"
                    outcomes.append(Outcome(spec["key"], state, log))
                    del running[slot]
                    free.append(slot)
            done = sum(o.state != "failed" for o in outcomes)
            progress.show(done, len(running), len(outcomes) - done)
            time.sleep(0.2)
    except BaseException:
        for process, _, _ in running.values():  # the cells stop with the grid: SIGTERM, as a kill would send
            process.send_signal(signal.SIGTERM)
        for process, _, _ in running.values():
            process.wait(timeout=120)
        raise
    return outcomes


def executor_parameters(settings, cluster: str) -> dict:
    """submitit's parameters from compare's flags and the --executor-config YAML (which may add any other)."""
    parameters = {"name": "pipeline-cell", "timeout_min": settings.slurm_time}
    if cluster == "slurm":
        parameters.update(
            slurm_array_parallelism=settings.parallel,
            gpus_per_node=settings.gpus_per_cell,
            slurm_setup=list(settings.slurm_setup),
            tasks_per_node=1,
        )
        if settings.slurm_partition:
            parameters["slurm_partition"] = settings.slurm_partition
    if settings.executor_config:
        extra = yaml.safe_load(Path(settings.executor_config).read_text()) or {}
        if not isinstance(extra, dict):
            raise ConfigError(
                f"{option('executor_config')} {settings.executor_config} must hold a mapping of "
                "submitit parameters, e.g. slurm_mem_gb: 32"
            )
        parameters.update(extra)
    return parameters


def submitit_executor(settings, folder: Path):
    """submitit's AutoExecutor for the cluster at hand (Slurm where `sbatch` is, else its local executor)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder)
    try:
        executor.update_parameters(**executor_parameters(settings, executor.cluster))
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"submitit refused a parameter of {option('executor_config')}: {str(error).splitlines()[0]}"
        ) from None
    return executor


def run_submitit(specs: list, settings, folder: Path, wait: bool) -> list | None:
    """On Slurm, the cells are one job array (`map_array`, at most --parallel at a time); with submitit's local
    executor, which runs whatever it is given at once, they are submitted --parallel at a time. Waits with a
    progress line, or (`--no-wait`, Slurm) returns None at once: a later compare collects what they record."""
    executor = submitit_executor(settings, folder)
    job_function = run_cell_job
    if settings.slurm_requeue:
        from .requeue import RequeuedCell

        job_function = RequeuedCell()
    array = executor.cluster == "slurm"
    waiting = [] if array else list(specs)
    jobs = list(zip(executor.map_array(job_function, specs), specs)) if array else []
    if array:
        shown = ", ".join(job.job_id for job, _ in jobs[:8])
        print(f"submitted {len(jobs)} cell jobs to Slurm: {shown}{' ...' if len(jobs) > 8 else ''}; logs in {folder}")
        if not wait:
            return None
    progress, outcomes = Progress(len(specs)), {}
    try:
        while len(outcomes) < len(specs):
            while waiting and sum(not job.done() for job, _ in jobs) < settings.parallel:
                spec = waiting.pop(0)
                jobs.append((executor.submit(job_function, spec), spec))
            for job, spec in jobs:
                if spec["key"] in outcomes or not job.done():
                    continue
                try:
                    result = job.result()
                    state = "claimed" if result == "claimed" else "finished"
                except Exception:  # the job's own traceback is in its log
                    state = "failed"
                outcomes[spec["key"]] = Outcome(spec["key"], state, Path(job.paths.stderr))
            finished = sum(o.state != "failed" for o in outcomes.values())
            running = sum(not job.done() for job, _ in jobs)
            progress.show(finished, running, len(outcomes) - finished)
            time.sleep(1.0)
    except BaseException:
        for job, _ in jobs:
            if not job.done():
                job.cancel(check=False)
        raise
    return list(outcomes.values())


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError('--executor submitit needs submitit, an optional extra: pip install -e ".[slurm]"') from None
    return submitit


def child_environment(tracking_uri: str, threads: int | None) -> dict:
    """A cell process's environment: the tracking store it must use and its threads (the run `mlflow run` may
    have injected into the compare process, the cell's process drops itself: see jobs/cell.run_spec)."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
