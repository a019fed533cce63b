"""The grid's cells in processes of their own: `--parallel N` on this machine, submitit's local executor (what
Slurm runs, off a cluster), `--shard K/N` for any other scheduler; a killed cell resumed, and two compares on
one grid running each cell once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

pytest.importorskip("submitit")

GRID = [
    "--sparsities",
    "0.5",
    "--methods",
    "magnitude,iterative",
    "--prune-percentage",
    "0.4",
    "--epochs-per-iteration",
    "1",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--seqlen",
    "32",
    "--device",
    "cpu",
    "--threads-per-cell",
    "1",
    "--no-report",
]


def failed_cell_logs(grid_dir) -> str:
    """The cells' own logs, read only when a compare failed: what its one-line summary points to."""
    return "".join(log.read_text()[-3000:] for log in (grid_dir / "logs").glob("*.log"))


def compare(tmp_path, model, corpus, *extra, experiment="grid", wait=True, **popen):
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "compare",
        "--model",
        str(model),
        "--dataset",
        f"text:{corpus}",
        *GRID,
        "--experiment",
        experiment,
        *extra,
    ]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    if not wait:
        return subprocess.Popen(
            args, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
        )
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, output + failed_cell_logs(tmp_path / "reports" / experiment)
    return done.stdout


def compare_here(tmp_path, model, corpus, *extra, experiment="grid") -> str:
    """`compare` in this process (test_bad_input.here), for the runs whose cells run in the compare's own process
    anyway: the same command, without an interpreter's start-up (its one thread per cell is restored after)."""
    from test_bad_input import here

    threads = torch.get_num_threads()
    try:
        args = ["--model", str(model), "--dataset", f"text:{corpus}", *GRID, "--experiment", experiment, *extra]
        done = here("compare", *args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    finally:
        torch.set_num_threads(threads)
        mlflow.set_tracking_uri(None)  # the job pointed this process's MLflow at the test's store
    assert done.returncode == 0, done.stderr
    return done.stdout


def processes_working_in(folder) -> list:
    """The command lines of the live processes whose working directory is in `folder` (a grid's cells and its
    local server with its workers all are)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            status = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if status != "Z" and (cwd == folder or folder in cwd.parents):
            found.append(command)
    return found


def runs(tmp_path, experiment="grid") -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment])


def perplexities(tmp_path, experiment="grid") -> pd.Series:
    return pd.read_csv(tmp_path / "reports" / experiment / "compare.csv").set_index("method")["perplexity"]


def test_parallel_and_submitit_cells_give_the_in_process_numbers_bit_for_bit(tmp_path, tiny_model_dir, corpus_dir):
    """One thread per cell everywhere (--threads-per-cell 1), so the three ways compute the same floats."""
    model, corpus = tiny_model_dir, corpus_dir
    compare_here(tmp_path, model, corpus, "--max-steps", "2", experiment="in-process")
    parallel = compare(tmp_path, model, corpus, "--max-steps", "2", "--parallel", "2", experiment="parallel")
    assert "one writer" in parallel and "cells: 3 done, 0 running, 0 failed" in parallel
    compare(
        tmp_path, model, corpus, "--max-steps", "2", "--executor", "submitit", "--parallel", "2", experiment="submitit"
    )
    expected = perplexities(tmp_path, "in-process")
    assert list(expected.index) == ["unpruned", "magnitude", "iterative"]
    for experiment in ("parallel", "submitit"):
        assert perplexities(tmp_path, experiment).equals(expected), experiment
        cells = runs(tmp_path, experiment).dropna(subset=["tags.cell_key"])
        grid = runs(tmp_path, experiment).query("`tags.kind` == 'compare'")
        assert cells["tags.pipeline.pid"].nunique() == 3  # each cell its own process
        assert grid["tags.pipeline.pid"].iloc[0] not in set(cells["tags.pipeline.pid"])
        assert set(cells["tags.mlflow.parentRunId"]) == {grid["run_id"].iloc[0]}  # nested under the grid's run
    assert list((tmp_path / "reports" / "submitit" / "submitit").glob("*_log.out"))  # submitit's own folder


def test_shards_run_disjoint_cells_and_a_last_compare_only_reports(tmp_path, tiny_model_dir, corpus_dir):
    first = compare_here(tmp_path, tiny_model_dir, corpus_dir, "--max-steps", "2", "--shard", "1/2")
    second = compare_here(tmp_path, tiny_model_dir, corpus_dir, "--max-steps", "2", "--shard", "2/2")
    assert "shard 1/2" in first and "shard 2/2" in second
    assert not (tmp_path / "reports" / "grid" / "compare.csv").exists()  # a shard writes no report
    cells = runs(tmp_path).dropna(subset=["tags.cell_key"])
    by_shard = [
        set(cells.loc[cells["tags.grid"] == grid, "tags.cell_key"])
        for grid in runs(tmp_path).query("`tags.kind` == 'compare'").sort_values("start_time")["run_id"]
    ]
    assert by_shard[0] and by_shard[1] and not by_shard[0] & by_shard[1] and len(by_shard[0] | by_shard[1]) == 3
    last = compare_here(tmp_path, tiny_model_dir, corpus_dir, "--max-steps", "2")
    assert last.count("reusing finished run") == 3 and ": running" not in last
    assert len(perplexities(tmp_path)) == 3 and len(runs(tmp_path).dropna(subset=["tags.cell_key"])) == 3


def test_a_killed_parallel_cell_is_resumed_and_two_compares_run_each_cell_once(tmp_path, tiny_model_dir, corpus_dir):
    slow = ["--max-steps", "150", "--parallel", "2"]
    process = compare(tmp_path, tiny_model_dir, corpus_dir, *slow, wait=False, start_new_session=True)
    logs = tmp_path / "reports" / "grid" / "logs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the trained cell is in its second iteration: one is checkpointed
        if any("Iteration 2/" in log.read_text() for log in logs.glob("*.log")):
            break
        time.sleep(0.5)
    else:
        pytest.fail(process.stdout.read())
    os.killpg(process.pid, signal.SIGKILL)  # the compare and its cells, as a node failure would
    process.wait()
    # nothing it started outlives it: not its cells, not the local mlflow server and its workers
    deadline = time.monotonic() + 30
    while processes_working_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_working_in(tmp_path), processes_working_in(tmp_path)
    trained = runs(tmp_path).query("`tags.cell_kind` == 'trained'")
    assert list(trained["status"]) == ["RUNNING"]
    # two compares at once on the same grid: each cell runs once, the killed one resumed from its checkpoint
    both = [compare(tmp_path, tiny_model_dir, corpus_dir, *slow, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    cells = runs(tmp_path).dropna(subset=["tags.cell_key"])
    assert cells.groupby("tags.cell_key")["status"].apply(list).map(lambda s: s.count("FINISHED")).eq(1).all()
    after = runs(tmp_path).query("`tags.cell_kind` == 'trained'")
    assert list(after["run_id"]) == list(trained["run_id"]) and list(after["status"]) == ["FINISHED"]  # resumed
    log = next(f for f in logs.glob("*.log") if "Resuming after iteration 1" in f.read_text())
    assert log.read_text().count("Iteration 1/") == 1  # iteration 1 was not trained again


def test_executor_settings_that_cannot_work_are_refused_before_any_run(tmp_path):
    from test_bad_input import assert_one_line, runs_in, store_env
    from test_refusals import here

    env = store_env(tmp_path)
    for args, code, fragment in (
        (["--shard", "3/2"], 2, "--shard '3/2' is not K/N"),
        (["--no-wait"], 2, "(--wait off) is for --executor submitit"),
        (["--slurm-partition", "gpu"], 2, "--slurm-partition is for --executor submitit"),
        (["--executor", "submitit", "--no-wait"], 2, "needs Slurm"),
    ):
        assert_one_line(here("compare", *args, cwd=tmp_path, env=env), code, fragment)
    # where Slurm's `srun` is on the PATH, submitit submits to Slurm: other machines cannot reach a sqlite file
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    slurm = dict(env, PATH=f"{bin_dir}:{env['PATH']}")
    assert_one_line(here("compare", "--executor", "submitit", cwd=tmp_path, env=slurm), 2, "an http(s) `mlflow server`")
    assert runs_in(tmp_path) == []
