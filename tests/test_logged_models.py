"""Every iteration a model in MLflow: with `--log-models every` each IMP iteration is a LoggedModel of its run, its
metrics linked by model id to the iteration's and its mask's fingerprint equal to one recomputed from the weights
it points to; a resumed run logs none twice; `models` ranks them; the report links its cells to them; and the
MLflow UI's Models tab shows them."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file
from test_bad_input import here, store_env
from test_compare_report import CHROMIUM, FLAGS

pytestmark = pytest.mark.xdist_group("logged-models")  # one worker runs the module, so its run is made once
ITERATIVE = ["--target-sparsity", "0.5", "--prune-percentage", "0.3", "--epochs-per-iteration", "1"]
ITERATIVE += ["--max-steps", "2", "--batch-size", "4", "--seqlen", "32", "--device", "cpu", "--experiment", "lm"]
ITERATIVE += ["--no-system-metrics", "--validate"]


def fingerprint_of_saved(directory: str) -> tuple[str, int]:
    """The masks of the decoder layers' matrices read from the saved safetensors, hashed as the logged
    fingerprint says: name order, each `name:shape` and its bits packed eight to a byte."""
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(file))
    masks = {
        key.removesuffix(".weight"): value != 0
        for key, value in tensors.items()
        if re.search(r"\.layers\.\d+\..*\.weight$", key) and value.ndim == 2
    }
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(f"{name}:{tuple(masks[name].shape)}\n".encode())
        digest.update(np.packbits(masks[name].reshape(-1)).tobytes())
    return digest.hexdigest(), int(sum(mask.sum() for mask in masks.values()))


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_model_dir, corpus_dir):
    """An iterative run to 50% in 2 iterations logging every iteration's model, then resumed once finished."""
    workdir = tmp_path_factory.mktemp("logged")
    data = ["--model", str(tiny_model_dir), "--dataset", f"text:{corpus_dir}"]
    args = ["iterative", *data, *ITERATIVE, "--log-models", "every", "--output-dir", "run"]
    first = here(*args, cwd=workdir, env=store_env(workdir))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = here(*args, "--resume", cwd=workdir, env=store_env(workdir))  # finished already: logs its end again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment_id = mlflow.get_experiment_by_name("lm").experiment_id
    return workdir, experiment_id


def test_each_iteration_is_one_logged_model_with_its_metrics_and_its_masks_fingerprint(logged):
    workdir, experiment_id = logged
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = MlflowClient()
    (run,) = client.search_runs([experiment_id])
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["iterative-s50-it1", "iterative-s50-it2"]  # once each, resume too
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("sparsity", "ppl_after_train")
    }
    for model in models:
        k = int(model.params["iteration"])
        assert model.source_run_id == run.info.run_id and str(model.status) == "READY"
        assert model.params["method"] == "iterative" and model.params["target_sparsity"] == "0.5000"
        metrics = {m.key: m for m in model.metrics}
        assert metrics["sparsity"].value == history["sparsity"][k] and metrics["sparsity"].step == k
        assert metrics["ppl_after_train"].value == history["ppl_after_train"][k]
        assert metrics["ppl_after_train"].dataset_name and metrics["ppl_after_train"].dataset_digest
        assert (model.tags["mask_sha256"], int(model.tags["nonzeros"])) == fingerprint_of_saved(model.tags["weights"])
    final = next(m for m in models if m.params["iteration"] == "2")
    assert Path(final.tags["weights"]).name == "opt-tiny-iterative-0.50" or "pruned_models" in final.tags["weights"]
    assert {"final_perplexity", "final_val_perplexity"} <= {m.key for m in final.metrics}
    first = next(m for m in models if m.params["iteration"] == "1")
    assert Path(first.tags["weights"]) == (workdir / "run" / "iterations" / "1").resolve()


def test_models_lists_them_best_validation_first(logged):
    workdir, _ = logged
    done = here("models", "--experiment", "lm", cwd=workdir, env=store_env(workdir))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows[0].split(" | ")[1] == "iterative-s50-it2"  # the only one with a validation perplexity
    filtered = here("models", "--experiment", "lm", "--method", "sparsegpt+ft", cwd=workdir, env=store_env(workdir))
    assert filtered.returncode == 1 and "no logged model of that sparsity or method" in filtered.stderr


def test_the_default_logs_each_cells_final_model_and_the_report_links_to_it(tmp_path, tiny_model_dir, corpus_dir):
    args = ["compare", "--model", str(tiny_model_dir), "--dataset", f"text:{corpus_dir}", "--sparsities", "0.5"]
    args += ["--methods", "magnitude,magnitude+ft", "--prune-percentage", "0.5", "--epochs-per-iteration", "1"]
    args += ["--max-steps", "2", "--batch-size", "4", "--seqlen", "32", "--experiment", "grid", "--no-system-metrics"]
    done = here(*args, cwd=tmp_path, env=store_env(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = mlflow.get_experiment_by_name("grid").experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["magnitude+ft-s50-it1", "magnitude-s50"]
    one_shot, trained = sorted(models, key=lambda m: m.name)[::-1]
    # the +ft cell starts from the one-shot cell's mask and keeps it: one fingerprint, one count
    assert one_shot.tags["mask_sha256"] == trained.tags["mask_sha256"]
    for model in models:
        assert (model.tags["mask_sha256"], int(model.tags["nonzeros"])) == fingerprint_of_saved(model.tags["weights"])
    report = (tmp_path / "reports" / "grid" / "report.md").read_text()
    for model in models:
        assert f"(models:/{model.model_id})" in report
    assert f'href="models:/{trained.model_id}"' in (tmp_path / "reports" / "grid" / "report.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_the_mlflow_ui_models_tab_shows_one_model_per_iteration_with_its_metrics(logged, tmp_path):
    from pipeline.local_server import LocalMlflowServer

    workdir, experiment_id = logged
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)  # the logged run's store, whichever test of this module ran before
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    with LocalMlflowServer(tmp_path / "ui", backend_store_uri=store, artifacts=workdir / "mlartifacts") as server:

        def page(fragment: str, ready: str) -> str:
            """The page's text once it shows `ready` (the app fetches after it loads: a busy machine may need
            a second look)."""
            command = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=40000"]
            for _ in range(5):
                dom = subprocess.run(
                    [*command, "--dump-dom", f"{server.uri}/#/experiments/{experiment_id}/{fragment}"],
                    capture_output=True,
                    text=True,
                    timeout=240,
                ).stdout
                text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", " ", dom, flags=re.S)))
                if ready in text:
                    break
            return text

        tab = page("models", "iterative-s50-it")
        assert "iterative-s50-it1" in tab and "iterative-s50-it2" in tab and tab.count("Ready") >= 2, tab[-2000:]
        for model in models:
            shown = page(f"models/{model.model_id}", "ppl_after_train")
            for metric in model.metrics:
                if metric.key in ("sparsity", "ppl_after_train"):
                    assert f"{metric.key} " in shown and repr(metric.value) in shown, (metric.key, shown[-3000:])


def test_every_logged_model_of_a_large_experiment_is_listed(mlflow_store):
    """The store answers a page of 100 at a time: a grid of more cells than that still finds each cell's model
    (the report's Model column, `models`)."""
    from pipeline.tracking.models import logged_models

    client = MlflowClient()
    experiment_id = client.create_experiment("many")
    made = set()
    for k in range(130):
        model = client.create_logged_model(experiment_id, name=f"cell-{k}", params={"method": "sparsegpt+ft"})
        client.finalize_logged_model(model.model_id, "READY")
        made.add(model.model_id)
    assert set(logged_models(experiment_id)["model_id"]) == made
    assert len(logged_models(experiment_id, method="sparsegpt+ft")) == 130
