"""Learning-rate sweeps: each trained method at its own lr, selected on the validation split; paired
statistics over seeds; the recovery recipe's check on the unpruned model."""

from __future__ import annotations

import math
import time

import mlflow
import pandas as pd
import pytest
import torch
from loading import load_model_and_tokenizer
from mlflow.tracking import MlflowClient
from test_refusals import here

from pipeline.config import CompareConfig
from pipeline.grid import next_rung
from pipeline.jobs.compare import run_compare
from pipeline.pruning.masks import prunable_linears
from pipeline.reporting.paired import paired_difference
from pipeline.settings import build

TOKENS = 3000


def plant(experiment: str, dense: float, rows: list, budget: int | None = None) -> str:
    """An experiment of finished cell runs: the dense model, and per row (method, target, lr, seed, test,
    validation) a trained cell as the grid records it, each a minute long (at `budget` tokens, if given)."""
    client = MlflowClient()
    experiment_id = client.create_experiment(experiment)
    run = client.create_run(experiment_id, tags={"cell_key": "dense", "cell_kind": "dense", "cell_target": "0.0"})
    client.log_metric(run.info.run_id, "perplexity", dense)
    client.set_terminated(run.info.run_id)
    for method, target, lr, seed, test, validation in rows:
        tags = {
            "cell_key": f"{method}-{target}-{lr}-{seed}",
            "cell_kind": "trained",
            "cell_target": str(target),
            "cell_method": method,
            "cell_seed": str(seed),
            "cell_lr": repr(lr),
            **({"cell_budget": str(budget)} if budget else {}),
        }
        started = int(time.time() * 1000)
        run_id = client.create_run(experiment_id, start_time=started, tags=tags).info.run_id
        for key, value in (
            ("final_perplexity", test),
            ("final_val_perplexity", validation),
            ("final_sparsity", 0.0 if method == "dense+ft" else target),
            ("train_tokens", TOKENS),
        ):
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, end_time=started + 60_000)
    return experiment_id


def report(experiment_id: str, out) -> str:
    from pipeline.reporting.render import write_report

    write_report(experiment_id, out)
    return (out / "report.md").read_text()


def directory_of(run, root):
    return next(p for p in (root / "pruned_models").iterdir() if p.is_dir() and cell_key_of(run) in p.name)


def cell_key_of(run) -> str:
    return run.data.tags["cell_key"]


def rows_of(method, lr, tests, validations, target=0.9):
    return [(method, target, lr, seed, t, v) for seed, (t, v) in enumerate(zip(tests, validations))]


def test_the_selection_follows_validation_where_test_disagrees(mlflow_store, tmp_path):
    """At lr 1e-4 iterative's test perplexity is the best of all, but its validation perplexity is not: the
    report takes lr 1e-3 (validation), and shows that cell's test numbers."""
    rows = [
        *rows_of("iterative", 1e-4, [90.0, 91.0, 92.0], [97.0, 98.0, 99.0]),
        *rows_of("iterative", 1e-3, [99.0, 100.0, 101.0], [93.0, 94.0, 95.0]),
        *rows_of("magnitude+ft", 1e-4, [96.0, 97.0, 98.0], [94.0, 95.0, 96.0]),
        *rows_of("magnitude+ft", 1e-3, [95.0, 95.0, 95.0], [96.5, 96.5, 96.5]),
    ]
    md = report(plant("planted", 80.0, rows), tmp_path / "out")
    assert (
        "- At 90% with equal training (3.0 k training tokens each), magnitude+ft at lr 0.0001 is best with "
        "97.00 ± 1.00 (n=3); the next, iterative at lr 0.001, reaches 100.00 ± 1.00 (n=3) (+3.1%): the gap is "
        "larger than the spread over seeds (the ± 1 std ranges, 2.00 together, do not overlap). Paired by seed, "
        "iterative minus magnitude+ft is +3.00 (95% t-interval +3.00 to +3.00); magnitude+ft is better on 3 of 3 "
        "seeds.\n"
    ) in md
    # each selection is at the edge of a two-value grid, and the report says so
    assert "the lr selected for iterative, 0.001, is at the edge of the grid" in md
    assert "the lr selected for magnitude+ft, 0.0001, is at the edge of the grid" in md
    assert "![lr_sensitivity](lr_sensitivity.png)" in md and (tmp_path / "out" / "lr_sensitivity.png").exists()
    assert "At 90% the sweep spent, over every lr and seed: iterative 18.0 k, magnitude+ft 18.0 k training tokens" in md
    assert "lr*: the selected learning rate is at the edge of the swept grid." in md
    assert "Wall time of all 13 cells: 12.0 min." in md  # every trained cell (and the dense one), not the selected


def test_the_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    best = pd.DataFrame({"seed": [0, 1, 2, 3], "perplexity": [90.0, 91.0, 95.0, 92.0]})
    other = pd.DataFrame({"seed": [3, 2, 1, 0, 7], "perplexity": [98.0, 97.0, 94.0, 91.0, 50.0]})  # seed 7: unpaired
    paired = paired_difference(best, other)
    # differences by seed: 1, 3, 2, 6; mean 3, sample std sqrt(14 / 3); t(0.975, 3 df) = 3.182 (tables)
    half = 3.182 * math.sqrt(14 / 3) / math.sqrt(4)
    assert paired.seeds == 4 and paired.better == 4
    assert paired.mean == pytest.approx(3.0)
    assert (paired.low, paired.high) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    mixed = paired_difference(best, pd.DataFrame({"seed": [0, 1, 2], "perplexity": [89.0, 92.0, 96.0]}))
    assert mixed.better == 2 and mixed.seeds == 3  # worse on seed 0, better on 1 and 2


@pytest.mark.parametrize(
    "dense_ft, sentence",
    [
        (
            [82.0, 82.5, 83.0],
            "The recovery recipe at lr 0.001 damages the unpruned model: trained as long (the 90% budget) it ends "
            "at 82.50 ± 0.50 (n=3), worse than the untouched 80.00 beyond the spread over seeds.",
        ),
        (
            [79.0, 80.5, 82.0],
            "The recovery recipe at lr 0.001 does not damage the unpruned model beyond the spread over seeds: "
            "trained as long (the 90% budget) it ends at 80.50 ± 1.50 (n=3) against the untouched 80.00.",
        ),
    ],
)
def test_the_recipe_check_says_what_the_dense_control_says(mlflow_store, tmp_path, dense_ft, sentence):
    rows = [*rows_of("iterative", 1e-3, [90.0, 91.0, 92.0], [90.0, 91.0, 92.0])]
    rows += rows_of("dense+ft", 1e-3, dense_ft, dense_ft)
    md = report(plant("recipe", 80.0, rows), tmp_path / "out")
    assert f"- {sentence}\n" in md
    assert "Every trained cell ran at one learning rate (0.001), not tuned" in md


def test_a_sweep_needs_a_validation_split_apart_from_the_test_split(tmp_path, tiny_model_dir, corpus_dir):
    """Refused before any run opens: selecting on a validation split that is the test split again would be
    selecting on test."""
    no_validation = tmp_path / "corpus"
    no_validation.mkdir()
    for name in ("train.txt", "test.txt"):
        (no_validation / name).write_text((corpus_dir / name).read_text())
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = ["compare", "--model", str(tiny_model_dir), "--methods", "iterative", "--lrs", "1e-4,1e-3"]
    result = here(*args, "--dataset", f"text:{no_validation}", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --lrs selects each method's learning rate on the validation split")
    assert "give text:DIR a validation.txt or valid.txt" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() or mlflow.search_runs(search_all_experiments=True).empty
    (no_validation / "valid.txt").write_text((corpus_dir / "validation.txt").read_text())
    from pipeline.data import load_corpus

    assert load_corpus(f"text:{no_validation}").held_out_validation  # valid.txt counts as well
    result = here(*args, "--methods", "sparsegpt", "--dataset", f"text:{corpus_dir}", cwd=tmp_path, env=env)
    assert result.returncode == 2 and "are the trained cells' learning rates" in result.stderr


def test_a_sweep_runs_every_trained_cell_at_every_lr_and_selects_on_validation(
    mlflow_store, tmp_path, tiny_model_dir, corpus_dir
):
    settings = dict(
        model=str(tiny_model_dir),
        dataset=f"text:{corpus_dir}",
        sparsities=[0.5],
        prune_percentage=0.5,
        epochs_per_iteration=1,
        max_steps=2,
        batch_size=4,
        lr=1e-3,
        lrs=[3e-4, 3e-3],
        seeds=[0, 1],
        nsamples=4,
        seqlen=64,
        device="cpu",
        experiment="sweep",
        output_dir="reports/sweep",
        # sparsegpt: an untrained cell, which has no lr and is always kept; sparsegpt+ft starts from its pruning
        methods=["iterative", "sparsegpt", "sparsegpt+ft"],
    )
    run_compare(build(CompareConfig, settings))
    runs = pd.read_csv(tmp_path / "reports/sweep/compare.csv")
    trained = runs[runs["kind"] == "trained"]
    assert sorted(zip(trained["method"], trained["lr"], trained["seed"])) == sorted(
        (m, lr, s) for m in ("iterative", "sparsegpt+ft") for lr in (3e-4, 3e-3) for s in (0, 1)
    )
    assert runs.loc[runs["kind"] == "one-shot", "lr"].isna().all()
    assert trained["val_perplexity"].notna().all() and trained["perplexity"].notna().all()
    assert (trained["val_perplexity"] != trained["perplexity"]).all()  # two splits, two numbers
    # the summary's selection is the argmin of the mean validation perplexity over seeds, recomputed here
    summary = pd.read_csv(tmp_path / "reports/sweep/summary.csv")
    assert summary.loc[summary["kind"] != "trained", "selected"].all()
    for method in ("iterative", "sparsegpt+ft"):
        means = trained[trained["method"] == method].groupby("lr")["val_perplexity"].mean()
        chosen = summary[(summary["method"] == method) & summary["selected"]]
        assert list(chosen["lr"]) == [means.idxmin()]
    # one cell's validation perplexity, measured again on its saved model
    from pipeline.data import eval_tokens, load_corpus
    from pipeline.perplexity import perplexity

    client = MlflowClient()
    cell = trained.iloc[0]
    run = client.get_run(cell["run_id"])
    model, tokenizer = load_model_and_tokenizer(str(directory_of(run, tmp_path)))
    ids = eval_tokens(load_corpus(f"text:{corpus_dir}"), tokenizer, "validation", 64)
    with torch.no_grad():
        assert perplexity(model, ids, 64).perplexity == pytest.approx(cell["val_perplexity"], rel=1e-5)
    assert float(run.data.params["lr"]) == cell["lr"]
    # each pruning of the starting model was done once and read by every other cell that needed it: SparseGPT's
    # per seed (its one-shot cell, then sparsegpt+ft at each lr), magnitude's first step once for all iterative
    shared = {}
    for row in runs[runs["kind"] != "dense"].itertuples():
        tags = client.get_run(row.run_id).data.tags
        criterion = "magnitude" if row.method == "iterative" else "sparsegpt"
        seed = row.seed if criterion == "sparsegpt" else None
        shared.setdefault((criterion, seed), []).append(tags["pruning_shared"])
    assert {key: sorted(v) for key, v in shared.items()} == {
        ("sparsegpt", 0): ["computed", "read", "read"],
        ("sparsegpt", 1): ["computed", "read", "read"],
        ("magnitude", None): ["computed", "read", "read", "read"],
    }
    assert len(list(tmp_path.glob("checkpoints/compare-e*-pruning/*.pt"))) == 3
    for seed in (0, 1):  # the +ft cells kept the one-shot cell's mask: the same zeros in the saved models
        one_shot, *fine_tuned = [
            load_model_and_tokenizer(str(directory_of(client.get_run(r.run_id), tmp_path)))[0]
            for r in runs[(runs["seed"] == seed) & runs["method"].isin(["sparsegpt", "sparsegpt+ft"])]
            .sort_values("kind")
            .itertuples()
        ]
        for model in fine_tuned:
            for (name, a), b in zip(prunable_linears(one_shot).items(), prunable_linears(model).values()):
                assert torch.equal(a.weight == 0, b.weight == 0), name


def test_the_lr_ladder_goes_on_at_the_ratio_of_the_rungs_next_to_its_edge():
    assert next_rung([1e-4, 3e-4, 1e-3], upward=True) == 3e-3  # a 1-3 ladder stays one
    assert next_rung([1e-4, 3e-4, 1e-3, 3e-3], upward=True) == 1e-2
    assert next_rung([1e-4, 3e-4, 1e-3], upward=False) == 3e-5
    assert next_rung([3e-5, 1e-4, 3e-4], upward=False) == 1e-5
    assert next_rung([1e-3, 2e-3], upward=True) == 4e-3
    assert next_rung([1e-4, 1e-3], upward=False) == 1e-5


def test_a_selection_at_the_edge_of_the_lrs_is_extended_rung_by_rung_and_reused_after(
    mlflow_store, tmp_path, tiny_model_dir, corpus_dir
):
    settings = dict(
        model=str(tiny_model_dir),
        dataset=f"text:{corpus_dir}",
        sparsities=[0.5],
        max_steps=2,
        batch_size=4,
        lrs=[1e-5, 3e-5],  # far below what 2 steps want: the top is selected, so the ladder climbs
        extend_lrs=2,
        seeds=[0, 1],
        nsamples=4,
        seqlen=64,
        device="cpu",
        experiment="ladder",
        output_dir="reports/ladder",
        methods=["sparsegpt+ft"],
    )
    run_compare(build(CompareConfig, settings))
    runs = pd.read_csv(tmp_path / "reports/ladder/compare.csv")
    trained = runs[runs["kind"] == "trained"]
    # the ladder walked again from the recorded validation perplexities: up or down a rung (x3 here) while the
    # selection is at an edge, at most twice
    tried = [1e-5, 3e-5]
    for _ in range(2):
        means = trained[trained["lr"].isin(tried)].groupby("lr")["val_perplexity"].mean()
        best = means.idxmin()
        if best not in (min(tried), max(tried)):
            break
        tried.append(best * 3 if best == max(tried) else best / 3)
    assert len(tried) > 2  # the ladder was climbed
    assert sorted(trained["lr"].unique()) == pytest.approx(sorted(tried))
    assert (trained.groupby("lr")["seed"].apply(sorted) == [[0, 1]] * len(tried)).all()  # every rung, every seed
    summary = pd.read_csv(tmp_path / "reports/ladder/summary.csv")
    chosen = summary[(summary["kind"] == "trained") & summary["selected"]]
    assert list(chosen["lr"]) == [trained.groupby("lr")["val_perplexity"].mean().idxmin()]
    # the same command again: every cell reused, the extensions too
    run_compare(build(CompareConfig, settings))
    again = pd.read_csv(tmp_path / "reports/ladder/compare.csv")
    assert sorted(again["run_id"]) == sorted(runs["run_id"])
