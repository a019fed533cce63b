"""A checkpoint, a shared pruning and a cached dense perplexity belong to one tracking store's experiment: a grid
run again in the same folder with another store (or after the store was deleted) runs its own cells beside the
first's, and never resumes, reads or deletes what belongs to the other."""

from __future__ import annotations

import mlflow
import torch

GRID = [
    "--sparsities",
    "0.5",
    "--methods",
    "magnitude,iterative",
    "--prune-percentage",
    "0.5",
    "--epochs-per-iteration",
    "1",
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--seqlen",
    "32",
    "--device",
    "cpu",
    "--no-report",
    "--no-system-metrics",
    "--experiment",
    "grid",
]


def pipeline(workdir, store: str, *args):
    """The command on the store, in this process (test_bad_input.here): two stores one after the other in one
    process must keep apart as well as in two."""
    from test_bad_input import here

    try:
        return here(*args, cwd=workdir, env={"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / store}"})
    finally:
        mlflow.set_tracking_uri(None)  # the job pointed this process's MLflow at the store


def finished_runs(workdir, store: str) -> dict:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / store}")
    found = mlflow.search_runs(experiment_names=["grid"], filter_string="attributes.status = 'FINISHED'")
    return dict(zip(found["tags.cell_key"].dropna(), found["run_id"]))


def test_a_grid_in_another_store_runs_its_own_cells_and_leaves_the_first_stores_checkpoints(
    tmp_path, tiny_model_dir, corpus_dir
):
    data = ["--model", str(tiny_model_dir), "--dataset", f"text:{corpus_dir}"]
    first = pipeline(tmp_path, "a.db", "compare", *data, *GRID)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    checkpoints = {path: path.read_bytes() for path in tmp_path.glob("checkpoints/*/checkpoint.pt")}
    assert len(checkpoints) == 1  # the iterative cell's
    prunings = sorted(tmp_path.glob("checkpoints/*-pruning/*.pt"))

    second = pipeline(tmp_path, "b.db", "compare", *data, *GRID)  # experiment id 1 again, in another store
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reusing" not in second.stdout
    for path, content in checkpoints.items():  # the first store's checkpoint is neither resumed nor touched
        assert path.read_bytes() == content
    assert len(list(tmp_path.glob("checkpoints/*/checkpoint.pt"))) == 2
    assert len(list(tmp_path.glob("checkpoints/*-pruning/*.pt"))) == 2 * len(prunings)
    a, b = finished_runs(tmp_path, "a.db"), finished_runs(tmp_path, "b.db")
    assert set(a) == set(b) and len(a) == 3  # dense, magnitude, iterative: the same cells, each run in its store
    assert not set(a.values()) & set(b.values())


def test_resuming_a_checkpoint_of_another_store_is_refused_and_leaves_it(tmp_path, tiny_model_dir, corpus_dir):
    """The checkpoint names the run it continues; a store without that run (another file, or the same file
    deleted and made anew) is told so in one line, before any work, and the checkpoint stays as it was."""
    from pipeline.checkpoint import save_checkpoint

    save_checkpoint(
        tmp_path / "run",
        model_state={},
        masks={"w": torch.ones(2, dtype=torch.bool)},
        iteration=1,
        history=[],
        config={},
        run_id="0123456789abcdef0123456789abcdef",
        tracking_uri="sqlite:///elsewhere.db",
    )
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    data = ["--model", str(tiny_model_dir), "--dataset", f"text:{corpus_dir}", "--seqlen", "32"]
    done = pipeline(tmp_path, "mlflow.db", "iterative", *data, "--output-dir", "run", "--resume")
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "--resume refused" in message[0] and "sqlite:///elsewhere.db" in message[0], message
    assert "MLFLOW_TRACKING_URI" in message[0] and "--output-dir" in message[0]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run opened
