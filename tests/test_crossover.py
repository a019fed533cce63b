"""Budgets and step sizes as grid dimensions, and the crossover map: every trained cell of a budget trains exactly
its tokens (to the stated whole step), a one-shot cell runs once whatever the budgets and step sizes, extending a
finished grid by a budget runs only the new cells, and the report's map equals a recomputation from compare.csv."""

from __future__ import annotations

import contextlib
import io
import math

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats
from test_refusals import here
from test_tuning import plant

from pipeline.config import CompareConfig
from pipeline.grid import lr_extension_cells, plan_cells
from pipeline.jobs.compare import run_compare
from pipeline.methods import criterion_of
from pipeline.reporting.crossover import (
    ITERATIVE,
    ONE_SHOT,
    criterion_maps,
    criterion_sentences,
    crossover_map,
    crossover_sentences,
)
from pipeline.reporting.render import equal_budget_table, selected
from pipeline.reporting.results import collect_runs, summarize
from pipeline.settings import Tokens, build

pytestmark = pytest.mark.xdist_group("crossover")  # one worker runs the module, so the grid is run once
TOKENS_PER_STEP = 4 * 64  # --batch-size 4 of --seqlen 64


def settings(model, corpus, budgets) -> dict:
    return dict(
        model=str(model),
        dataset=f"text:{corpus}",
        sparsities=[0.75],
        budgets=budgets,
        prune_percentages=[0.3, 0.5],
        lrs=[3e-4, 3e-3],
        seeds=[0, 1],
        batch_size=4,
        nsamples=4,
        seqlen=64,
        eval_every=0,
        device="cpu",
        experiment="crossover",
        output_dir="reports/crossover",
        methods=["sparsegpt", "magnitude", "iterative", "sparsegpt+ft"],
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir, corpus_dir):
    """The grid at two budgets (1000 tokens: 3.9 steps, rounded to 4; 1.5k: 5.9, rounded to 6), then extended
    by a third; the store's runs before and after the extension (the first grid's console in console.txt)."""
    root = tmp_path_factory.mktemp("crossover")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            run_compare(build(CompareConfig, settings(tiny_model_dir, corpus_dir, ["1000", "1.5k"])))
        (root / "console.txt").write_text(printed.getvalue())
        first = pd.read_csv(root / "reports/crossover/compare.csv")
        run_compare(build(CompareConfig, settings(tiny_model_dir, corpus_dir, ["1000", "1.5k", "2k"])))
        experiment = MlflowClient().get_experiment_by_name("crossover").experiment_id
        cells = [r for r in MlflowClient().search_runs([experiment], max_results=1000) if "cell_key" in r.data.tags]
        mlflow.set_tracking_uri(None)
    return root, first, pd.read_csv(root / "reports/crossover/compare.csv"), cells


def test_every_trained_cell_trains_its_budget_to_the_nearest_whole_step(grid):
    _, first, runs, _ = grid
    trained = runs[runs["kind"] == "trained"]
    assert sorted(trained["budget"].unique()) == [1000, 1500, 2000]
    for budget, cells in trained.groupby("budget"):
        steps = math.floor(budget / TOKENS_PER_STEP + 0.5)
        assert (cells["train_tokens"] == steps * TOKENS_PER_STEP).all(), budget  # 1024, 1536, 2048: every method
        assert abs(steps * TOKENS_PER_STEP - budget) <= TOKENS_PER_STEP / 2
    # iterative at each step size, sparsegpt+ft once (no step size of its own): per budget, lr and seed
    per_budget = trained.groupby(["budget", "method"], dropna=False)["prune_percentage"]
    assert per_budget.apply(lambda s: sorted(s.dropna().unique())).to_dict() == {
        **{(b, "iterative"): [0.3, 0.5] for b in (1000, 1500, 2000)},
        **{(b, "sparsegpt+ft"): [] for b in (1000, 1500, 2000)},
    }
    assert len(trained) == 3 * (2 + 1) * 2 * 2
    assert len(first[first["kind"] == "trained"]) == 2 * (2 + 1) * 2 * 2


def test_a_one_shot_cell_runs_once_and_an_extension_runs_only_the_new_cells(grid):
    _, first, runs, cells = grid
    one_shot = runs[runs["kind"] == "one-shot"]
    assert sorted(zip(one_shot["method"], one_shot["seed"].fillna(-1))) == [
        ("magnitude", -1),
        ("sparsegpt", 0),
        ("sparsegpt", 1),
    ]
    assert one_shot["budget"].isna().all() and one_shot["prune_percentage"].isna().all()
    # every cell of the first grid reused as it was; the extension ran the 2k budget's twelve cells and no other
    assert set(first["run_id"]) <= set(runs["run_id"])
    assert len(cells) == len(runs) == len(first) + 12
    assert set(runs[~runs["run_id"].isin(first["run_id"])]["budget"]) == {2000}


def recomputed_map(runs: pd.DataFrame) -> pd.DataFrame:
    """The crossover map from compare.csv alone: per method, step, target and budget the lr with the lowest mean
    validation perplexity; per target and budget the best of each family on validation; their paired test
    difference over the seeds (one-shot + FT minus iterative) with Student's t interval."""
    trained = runs[(runs["kind"] == "trained") & runs["budget"].notna()].copy()
    trained["step"] = trained["prune_percentage"].fillna(-1)
    cell = ["method", "step", "target_sparsity", "budget"]
    means = trained.groupby([*cell, "lr"])["val_perplexity"].mean().reset_index()
    chosen = means.loc[means.groupby(cell)["val_perplexity"].idxmin()]
    chosen["family"] = [ITERATIVE if m.startswith("iterative") else ONE_SHOT for m in chosen["method"]]
    rows = []
    for (target, budget), group in chosen.groupby(["target_sparsity", "budget"]):
        best = {f: group[group["family"] == f].sort_values("val_perplexity").iloc[0] for f in (ONE_SHOT, ITERATIVE)}

        def test_by_seed(row):
            same = (trained[cell[:-1] + ["budget", "lr"]] == [row[c] for c in cell] + [row["lr"]]).all(axis=1)
            return trained[same].set_index("seed")["perplexity"]

        differences = (test_by_seed(best[ONE_SHOT]) - test_by_seed(best[ITERATIVE])).dropna()
        n, mean = len(differences), differences.mean()
        half = stats.t.ppf(0.975, n - 1) * differences.std(ddof=1) / math.sqrt(n)
        rows.append(
            {
                "target_sparsity": target,
                "budget": budget,
                "step": best[ITERATIVE]["step"],
                "difference": mean,
                "low": mean - half,
                "high": mean + half,
                "iterative_better": int((differences > 0).sum()),
                "seeds": n,
            }
        )
    return pd.DataFrame(rows)


def test_the_reports_map_equals_a_recomputation_from_compare_csv(grid):
    root, _, runs, _ = grid
    written = pd.read_csv(root / "reports/crossover/crossover.csv")
    expected = recomputed_map(runs)
    assert len(written) == len(expected) == 3  # one target at three budgets
    merged = written.merge(expected, on=["target_sparsity", "budget"], suffixes=("", "_expected"))
    for column in ("step", "difference", "low", "high", "iterative_better", "seeds"):
        assert merged[column].to_numpy() == pytest.approx(merged[f"{column}_expected"].to_numpy(), abs=1e-3), column
    report = (root / "reports/crossover/report.md").read_text()
    assert "Where iterating pays" in report and "crossover_map.png" in report
    for difference in written["difference"]:
        assert f"{difference:+.2f}" in report
    budgets = sorted(runs.loc[runs["kind"] == "trained", "train_tokens"].unique())  # 4, 6 and 8 steps of 256
    assert budgets == [1024, 1536, 2048]
    assert "the selected cells each its budget (1.0 k, 1.5 k, 2.0 k)." in report
    assert (root / "reports/crossover/crossover_map.png").stat().st_size > 0
    assert (root / "reports/crossover/perplexity_vs_budget.png").stat().st_size > 0


def test_a_step_that_reaches_the_target_at_once_is_no_candidate_for_the_map():
    """At 50%, iterative at step 0.5 prunes once and trains: magnitude+ft by another name. Made the best on
    validation, the map still sets sparsegpt+ft against the best cell that iterates (step 0.3)."""
    test = {  # test perplexity by cell and seed; validation is the test + 1 but for the single-step cell
        ("sparsegpt+ft", math.nan): [90.0, 91.0, 92.0],
        ("iterative", 0.3): [89.0, 91.5, 90.5],
        ("iterative", 0.5): [80.0, 80.0, 80.0],
    }
    rows = []
    for (method, step), perplexities in test.items():
        for seed, perplexity in enumerate(perplexities):
            validation = 70.0 if step == 0.5 else perplexity + 1
            rows.append(trained_run(method, 0.5, step, seed, perplexity, validation))
    summary = summarize(pd.DataFrame(rows))
    chosen, runs = selected(pd.DataFrame(rows), summary)
    (row,) = crossover_map(chosen, runs).to_dict("records")
    assert (row["one_shot"], row["iterative"], row["step"]) == ("sparsegpt+ft", "iterative", 0.3)
    differences = [one - it for one, it in zip(test[("sparsegpt+ft", math.nan)], test[("iterative", 0.3)])]
    assert row["difference"] == pytest.approx(sum(differences) / 3)
    assert row["iterative_better"] == 2


def test_the_map_per_criterion_sets_each_criterion_against_itself_step_by_step():
    """SparseGPT + FT is the best one-shot cell and iterative SparseGPT the best iterative one, so the map sets
    those two side by side; per criterion, magnitude + FT is set against iterative (magnitude, step by step)
    and SparseGPT + FT against iterative SparseGPT, each difference the mean over seeds with Student's t."""
    test = {  # test perplexity by cell and seed; validation is the test + 1
        ("sparsegpt+ft", math.nan): [90.0, 91.0, 92.5],
        ("iterative-sparsegpt", 0.3): [88.0, 90.5, 90.0],
        ("magnitude+ft", math.nan): [99.0, 101.0, 100.5],
        ("iterative", 0.3): [96.0, 97.5, 98.5],
    }
    rows = [
        trained_run(method, 0.7, step, seed, perplexity, perplexity + 1)
        for (method, step), perplexities in test.items()
        for seed, perplexity in enumerate(perplexities)
    ]
    chosen, runs = selected(pd.DataFrame(rows), summarize(pd.DataFrame(rows)))
    (best,) = crossover_map(chosen, runs).to_dict("records")
    assert (best["one_shot"], best["iterative"]) == ("sparsegpt+ft", "iterative-sparsegpt")
    by_criterion = criterion_maps(chosen, runs).set_index("criterion")
    assert list(by_criterion.index) == ["sparsegpt", "magnitude"]  # the registry's order
    assert criterion_of("dense+ft") is None and criterion_of("a-method-of-another-version") is None
    for criterion, one_shot, iterative in [
        ("magnitude", "magnitude+ft", "iterative"),
        ("sparsegpt", "sparsegpt+ft", "iterative-sparsegpt"),
    ]:
        differences = [a - b for a, b in zip(test[(one_shot, math.nan)], test[(iterative, 0.3)])]
        mean = sum(differences) / 3
        half = stats.t.ppf(0.975, 2) * pd.Series(differences).std(ddof=1) / math.sqrt(3)
        row = by_criterion.loc[criterion]
        assert (row["one_shot"], row["iterative"], row["step"]) == (one_shot, iterative, 0.3)
        assert (row["difference"], row["low"], row["high"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-3)
        assert row["iterative_better"] == sum(d > 0 for d in differences)
    (sparsegpt, magnitude) = criterion_sentences(by_criterion.reset_index())
    assert magnitude.startswith("Magnitude: at 1.0 k training tokens per cell, by the 95% intervals iterative is")
    assert sparsegpt.startswith("SparseGPT: at 1.0 k training tokens per cell, by the 95% intervals the two tie")
    assert magnitude.endswith(
        "by the means iterative is ahead at the one measured sparsity (70%): the sign does not change in the "
        "measured range."
    )


def trained_run(method, target, step, seed, perplexity, validation) -> dict:
    """One trained cell's row as compare.csv writes it (one budget, one lr)."""
    return dict(
        method=method, kind="trained", target_sparsity=target, pattern="unstructured", distill="none",
        train_params="all", recovery="finetune", budget=1000.0, prune_percentage=step, lr=1e-3, seed=seed,
        sparsity=target, perplexity=perplexity, val_perplexity=validation, train_tokens=1024, train_flops=1.0,
        trained_parameters=1.0, peak_memory_bytes=1.0, seconds=1.0, run_id=f"{method}-{step}-{seed}",
    )  # fmt: skip


def table(*cells) -> pd.DataFrame:
    """A map of (target, budget, difference, low, high) cells, three seeds each."""
    rows = []
    for target, budget, difference, low, high in cells:
        verdict = ITERATIVE if low > 0 else ONE_SHOT if high < 0 else "tie"
        rows.append(dict(target_sparsity=target, budget=budget, difference=difference, low=low, high=high))
        rows[-1].update(verdict=verdict, seeds=3, iterative_better=3 if difference > 0 else 0)
    return pd.DataFrame(rows)


def test_the_sentence_of_a_budget_names_where_the_sign_changes_or_that_it_does_not():
    changes, never = crossover_sentences(
        table(
            (0.5, 80_000, -2.0, -3.0, -1.0),
            (0.7, 80_000, -0.5, -1.5, 0.5),
            (0.9, 80_000, 1.2, 0.4, 2.0),
            (0.5, 320_000, -1.0, -2.0, -0.1),
            (0.9, 320_000, -0.3, -1.0, 0.4),
        )
    )
    assert changes == (
        "At 80.0 k training tokens per cell, by the 95% intervals one-shot + ft is ahead at 50%, the two tie at 70%, "
        "iterative is ahead at 90%; by the means the sign changes between 70% and 90% (to iterative)."
    )
    assert never == (
        "At 320.0 k training tokens per cell, by the 95% intervals one-shot + ft is ahead at 50%, the two tie at 90%; "
        "by the means one-shot + ft is ahead at every measured sparsity (50% to 90%): the sign does not change in "
        "the measured range."
    )
    (ties,) = crossover_sentences(table((0.5, 80_000, -0.1, -0.5, 0.3), (0.7, 80_000, -0.2, -1.3, 0.9)))
    assert "by the 95% intervals the two tie at 50%, 70%;" in ties  # a mean below 0 with 0 inside is no lead


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prune-percentages", "0.1,0.3"], "needs --budgets"),
        (["--budgets", "80k", "--prune-percentages", "0.1", "--sparsities", "0.95"], "--max-iterations 29 or more"),
        (["--budgets", "80k", "--methods", "sparsegpt"], "are the trained cells' training tokens"),
        (["--budgets", "80k,1.3x"], "'1.3x' is not a count of tokens"),
        (["--budgets", "80k", "--prune-percentages", "0.3", "--methods", "sparsegpt+ft"], "has none: add iterative"),
        (["--extend-lrs", "1", "--lrs", "1e-3"], "--extend-lrs 1 continues the ladder of an lr sweep"),
    ],
)
def test_budgets_and_step_sizes_are_refused_where_they_cannot_mean_anything(tmp_path, args, words):
    result = here("compare", "--model", "opt-tiny", *args, cwd=tmp_path)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_count_of_tokens_reads_k_and_m():
    assert [Tokens(text) for text in ("80000", "80k", "1.3M", "1.5K", "2m")] == [80_000, 80_000, 1_300_000, 1_500, 2e6]
    for bad in ("1.3x", "k", "-5", "0.5"):
        with pytest.raises(ValueError):
            Tokens(bad)


def test_a_grids_trained_cells_measure_the_unpruned_model_once(grid, tiny_model_dir, corpus_dir):
    """Every trained cell starts from the same model: the first measures its perplexity, the others read it; the
    number is the one an evaluation here gives."""
    from loading import load_model_and_tokenizer

    from pipeline.data import load_corpus
    from pipeline.perplexity import evaluate_on

    root, _, _, cells = grid
    trained = [cell for cell in cells if cell.data.tags.get("cell_kind") == "trained"]
    assert [cell.data.tags["dense_shared"] for cell in trained].count("computed") == 1
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    dense = {
        metric.value
        for cell in trained
        for metric in client.get_metric_history(cell.info.run_id, "ppl_after_train")
        if metric.step == 0
    }
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    expected = evaluate_on(model, tokenizer, load_corpus(f"text:{corpus_dir}"), "test", 64, "cpu").perplexity
    assert len(dense) == 1 and dense.pop() == pytest.approx(expected, rel=1e-6)


def test_an_iteration_that_eval_every_skips_says_it_was_not_measured(grid):
    console = (grid[0] / "console.txt").read_text()
    skipped = [line for line in console.splitlines() if line.startswith(("Pruned:", "Iteration "))]
    assert any("perplexity after pruning not measured (--eval-every)" in line for line in skipped)
    assert any(line.startswith("Iteration 1: trained, ") for line in skipped)
    assert not any("nan" in line for line in skipped), [line for line in skipped if "nan" in line]


def test_under_a_budget_dense_ft_is_one_cell_read_at_every_target(mlflow_store):
    """It prunes nothing, so its target changes nothing (measured on opt-tiny: its five targets' cells gave one
    perplexity to the last digit): the grid plans it once per budget, lr and seed, the report reads it at each."""
    config = build(
        CompareConfig,
        dict(
            model="opt-tiny",
            sparsities=[0.5, 0.9],
            methods=["iterative", "dense+ft"],
            budgets=["1000", "2000"],
            prune_percentages=[0.5],
            lrs=[1e-3, 3e-3],
            seeds=[0, 1],
        ),
    )
    cells = plan_cells(config, "corpus")
    trained = [cell for cell in cells if cell.kind == "trained"]
    assert len({cell.key for cell in cells}) == len(cells)
    assert sum(cell.method == "dense+ft" for cell in trained) == 2 * 2 * 2  # budgets x lrs x seeds
    assert sum(cell.method == "iterative" for cell in trained) == 2 * 2 * 2 * 2  # and targets
    # the cell ran at the first target; its run is read at the other, with its own numbers and run id
    rows = [("iterative", target, 1e-3, seed, 150.0 + seed, 160.0) for target in (0.5, 0.9) for seed in (0, 1)]
    rows += [
        ("dense+ft", 0.5, lr, seed, ppl + seed, val)
        for lr, ppl, val in [(1e-3, 90, 95), (3e-3, 92, 94)]
        for seed in (0, 1)
    ]
    runs = collect_runs(plant("budgeted", 85.0, rows, budget=1000))
    control = runs[(runs["method"] == "dense+ft") & (runs["lr"] == 1e-3)].sort_values(["target_sparsity", "seed"])
    assert list(zip(control["target_sparsity"], control["perplexity"])) == [
        (0.5, 90.0),
        (0.5, 91.0),
        (0.9, 90.0),
        (0.9, 91.0),
    ]
    assert control["run_id"].nunique() == 2
    summary = summarize(runs)
    table = equal_budget_table(summary[summary["selected"]], 0.9, 1000)  # dense+ft at 3e-3, selected on validation
    assert list(table["vs dense+ft"]) == [f"{100 * (150.5 - 92.5) / 92.5:+.1f}%", "+0.0%"]
    # its selection is at the top of its lrs at both targets: one rung more is one cell per seed, not one per target
    extensions = lr_extension_cells(config, cells, summary)
    assert sorted((cell.method, cell.lr, cell.budget, cell.seed) for cell in extensions) == [
        ("dense+ft", 9e-3, 1000, 0),
        ("dense+ft", 9e-3, 1000, 1),
    ]
    # a store where it ran at each target (as grids did before): each target reads its own run, nothing added
    rows = [("iterative", 0.9, 1e-3, 0, 150.0, 160.0), ("dense+ft", 0.5, 1e-3, 0, 90.0, 95.0)]
    rows += [("dense+ft", 0.9, 1e-3, 0, 92.0, 95.0)]
    runs = collect_runs(plant("per-target", 85.0, rows, budget=1000))
    assert sorted(runs.loc[runs["method"] == "dense+ft", "perplexity"]) == [90.0, 92.0]
