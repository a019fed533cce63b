"""The comparison grid, cell reuse, and the report rendered in a real browser (issue 5)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import CompareConfig
from pipeline.grid import run_grid
from pipeline.report import findings
from pipeline.settings import build


@pytest.fixture()
def finished_grid(mlflow_store, tiny_model_dir, corpus_dir):
    settings = dict(model=str(tiny_model_dir), dataset=f"text:{corpus_dir}", sparsities=[0.5], prune_percentage=0.4,
                    epochs_per_iteration=1, max_steps=2, batch_size=4, lr=1e-3, nsamples=4, seqlen=64, device="cpu",
                    experiment="grid", output_dir="reports/grid")
    table = run_grid(build(CompareConfig, settings))
    return settings, table


def test_grid_values_match_an_independent_computation(finished_grid, tiny_model_dir, corpus_dir):
    from pipeline.data import eval_tokens, load_corpus
    from pipeline.models import load_model_and_tokenizer
    from pipeline.perplexity import perplexity
    from pipeline.pruning.magnitude import magnitude_prune_layerwise
    from pipeline.pruning.masks import prunable_linears

    _, table = finished_grid
    assert sorted(table["method"]) == ["iterative", "magnitude", "sparsegpt", "unpruned", "wanda"]
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    ids = eval_tokens(load_corpus(f"text:{corpus_dir}"), tokenizer, "test", 64)
    dense = perplexity(model, ids, 64).perplexity
    magnitude_prune_layerwise(prunable_linears(model), 0.5)
    pruned = perplexity(model, ids, 64).perplexity
    row = table.set_index("method")
    assert row.loc["unpruned", "perplexity"] == pytest.approx(dense, rel=1e-6)
    assert row.loc["magnitude", "perplexity"] == pytest.approx(pruned, rel=1e-6)
    assert row.loc["magnitude", "vs_dense_pct"] == pytest.approx(100 * (pruned - dense) / dense, rel=1e-6)
    for method in ("magnitude", "sparsegpt", "wanda", "iterative"):
        assert row.loc[method, "sparsity"] == pytest.approx(0.5, abs=1e-4)
        assert row.loc[method, "seconds"] > 0
    assert (Path("reports/grid/compare.csv")).exists() and "| Magnitude | 50% |" in Path("reports/grid/compare.md").read_text()


def test_rerun_reuses_finished_cells(finished_grid):
    import mlflow

    settings, table = finished_grid
    before = len(mlflow.search_runs(experiment_names=["grid"]))
    again = run_grid(build(CompareConfig, {**settings, "report": False}))
    runs = mlflow.search_runs(experiment_names=["grid"])
    assert len(runs) == before + 1  # only the new compare run itself (no report asked)
    assert list(again["run_id"]) == list(table["run_id"])


def test_report_sentences_are_computed_from_the_numbers(finished_grid):
    _, table = finished_grid
    sentences = findings(table)
    best = table[table["kind"] != "dense"].sort_values("perplexity").iloc[0]
    assert f"At 50% sparsity {best['method']} is best with perplexity {best['perplexity']:.2f}" in sentences[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_html_renders_table_and_plots_in_chromium(finished_grid, tmp_path):
    import matplotlib.image

    page = Path("reports/grid/report.html").resolve()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<tr>") == 1 + 5 and "SparseGPT" in dom and "Iterative" in dom
    assert dom.count('<img alt="') == 2 and "data:image/png;base64," in dom
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", "--window-size=1200,2400",
                    page.as_uri()], capture_output=True, timeout=120)
    pixels = torch.from_numpy(matplotlib.image.imread(shot)[..., :3].copy())
    blue = torch.tensor([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first line colour: only a drawn plot has it
    assert int(((pixels - blue).abs().max(dim=-1).values < 0.03).sum()) > 200
