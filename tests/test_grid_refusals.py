"""Bad input and faults on the grid's features, each refused or reported in one line before any work, in the
words of the command that was run: experiment names that would be paths, LoRA settings no matrix takes, settings
nothing reads, an output directory that cannot be written, a damaged cell spec, a diverged cell, a partial sweep's
report, and a save that does not read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_bad_input import assert_one_line, runs_in, store_env
from test_refusals import data_args, here
from test_tuning import plant, report, rows_of

from pipeline.cli import cli as click_group
from pipeline.config import PRESETS, REPORTS, CompareConfig, default_report_dir, folder_name
from pipeline.settings import build


def no_run_opened(tmp_path) -> bool:
    return runs_in(tmp_path) == []


@pytest.mark.parametrize(
    "names",
    [
        ("sh ard", "x/../sh ard", "x/../../sh ard"),
        ("../../esc", "..", ".", "/abs/olute", "a/b", "a%2Fb", "%2E.", "opt-tiny-tuned"),
    ],
)
def test_an_experiment_name_is_one_folder_of_its_own_inside_the_reports_root(names):
    folders = [default_report_dir(None, name) for name in names]
    for name, folder in zip(names, folders):
        assert folder.parent == REPORTS and len(folder.name) > 0 and "/" not in folder.name, name
        assert folder.name not in (".", ".."), name
        assert (Path("/r") / folder).resolve().parent == Path("/r") / REPORTS, name
    assert len(set(folders)) == len(names)  # no name writes over another's report
    assert folder_name("opt-tiny-tuned") == "opt-tiny-tuned" and folder_name("sh ard") == "sh ard"


def test_lora_settings_that_no_matrix_takes_are_refused_before_any_work(tmp_path, tiny_model_dir, corpus_dir):
    """The tiny model's matrices are 64 wide at the least: rank 64 would be no low-rank update."""
    data = data_args(tiny_model_dir, corpus_dir)
    for command in (["train"], ["iterative"], ["compare", "--methods", "iterative"]):
        lora = ["--train-params", "lora"]
        result = here(*command, *data, *lora, "--lora-rank", "64", cwd=tmp_path, env=store_env(tmp_path))
        assert_one_line(result, 2, "--lora-rank 64", "give at most 63")
        result = here(*command, *data, *lora, "--lora-targets", "zzz_nomatch", cwd=tmp_path, env=store_env(tmp_path))
        assert_one_line(result, 2, "--lora-targets 'zzz_nomatch' matches none", "q_proj", "fc1")
    accepted = here("train", *data, "--train-params", "lora", "--lora-rank", "63", "--help", cwd=tmp_path)
    assert accepted.returncode == 0
    assert no_run_opened(tmp_path)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("compare", "--owl-lambda", "0.2"), "--owl-lambda is OWL's"),
        (("prune", "--owl-m", "3"), "--owl-m is OWL's"),
        (("iterative", "--sparsity-profile", "uniform", "--owl-lambda", "0.1"), "--owl-lambda is OWL's"),
        (("train", "--lora-rank", "4"), "--lora-rank is LoRA's"),
        (("iterative", "--train-params", "norms-biases", "--lora-alpha", "8"), "--lora-alpha is LoRA's"),
        (("compare", "--lora-targets", "q_proj"), "--lora-targets is LoRA's"),
        (("compare", "--lrs", ","), "holds no values"),
        (("compare", "--experiment", ""), "is empty"),
        (("train", "--output-dir", ""), "is empty"),
        (("compare", "--seeds", "-1"), "--seeds -1 is outside"),
        (("compare", "--output-dir", "/proc/no/such"), "--output-dir /proc/no/such cannot be written"),
        (("compare", "--output-dir", "/proc/no/such", "--parallel", "2"), "--output-dir /proc/no/such cannot be"),
    ],
)
def test_settings_nothing_reads_or_no_one_could_mean_are_refused_first(tmp_path, args, fragment):
    assert_one_line(here(*args, cwd=tmp_path, env=store_env(tmp_path)), 2, fragment)
    assert no_run_opened(tmp_path)


def test_owl_and_lora_settings_are_accepted_where_they_are_read():
    config = build(CompareConfig, {"methods": ["sparsegpt-owl", "iterative"], "owl_lambda": 0.1})
    assert config.prune.owl.owl_lambda == 0.1
    config = build(CompareConfig, {"methods": ["iterative"], "train_params": ["all", "lora"], "lora_rank": 4})
    from pipeline.grid import plan_cells

    ranks = {cell.train_params: cell.config.train.lora_rank for cell in plan_cells(config, "d")[1:]}
    assert ranks == {"lora": 4, "all": 8}  # only the lora cells read it: the others keep the default


def test_the_preset_help_says_what_each_preset_sets():
    command = click_group.commands["compare"]
    text = " ".join(
        command.get_help(command.make_context("compare", [], max_content_width=10_000, terminal_width=10_000)).split()
    )
    for name in PRESETS:
        assert f"{name}: prune-percentage" in text
    assert "lrs 3e-05,0.0001,0.0003,0.001,0.003" in text and "1e-4,3e-4,1e-3 selected" not in text


def damaged_specs(tmp_path, tiny_model_dir, corpus_dir) -> dict:
    from pipeline.grid import plan_cells
    from pipeline.jobs.cell import cell_spec

    config = build(CompareConfig, {"model": str(tiny_model_dir), "dataset": f"text:{corpus_dir}", "seqlen": 32})
    spec = cell_spec(plan_cells(config, "digest")[1], "run", "grid", tmp_path / "claims", None, 1)
    other_model = {**spec, "values": {**spec["values"], "model": "opt-tiny"}}
    return {
        "truncated": json.dumps(spec)[:40],
        "array": json.dumps([spec]),
        "empty": "{}",
        "changed model": json.dumps(other_model),
        "unknown job": json.dumps({**spec, "config_class": "TrainRunConfig"}),
        "values not a mapping": json.dumps({**spec, "values": 3}),
    }


def test_a_damaged_cell_spec_is_one_line_naming_the_file(tmp_path, tiny_model_dir, corpus_dir):
    for case, text in damaged_specs(tmp_path, tiny_model_dir, corpus_dir).items():
        path = tmp_path / f"{case.replace(' ', '-')}.json"
        path.write_text(text)
        result = here("cell", str(path), cwd=tmp_path, env=store_env(tmp_path))
        line = assert_one_line(result, 2, f"cell spec {path}")
        assert ("changed after compare wrote it" in line) == (case == "changed model"), line
    assert no_run_opened(tmp_path)


def test_a_diverged_cell_says_how_to_go_on_in_compares_own_words(tmp_path, tiny_model_dir, corpus_dir):
    args = ["--methods", "iterative", "--sparsities", "0.5", "--prune-percentage", "0.5", "--epochs-per-iteration"]
    args += ["1", "--max-steps", "3", "--batch-size", "4", "--lr", "1e9", "--no-report", "--no-system-metrics"]
    result = here("compare", *data_args(tiny_model_dir, corpus_dir), *args, cwd=tmp_path, env=store_env(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]  # after the training's progress bar
    assert line.startswith("error: iteration 1 stopped: the training loss became nan"), line
    assert "run the compare again" in line and "--lrs" in line and "--resume" not in line, line


def test_a_partial_sweep_says_it_is_a_sweep_and_what_has_not_finished(mlflow_store, tmp_path):
    """One shard of a grid sweeping lr 1e-3 and 1e-2 finished only the cells at 1e-2 (and one seed less of
    iterative): the report must not call it a grid at one lr, nor select silently."""
    rows = rows_of("iterative", 1e-2, [100.0, 101.0], [110.0, 111.0])[:1] + rows_of(
        "sparsegpt+ft", 1e-2, [99.0], [109.0]
    )
    rows += rows_of("iterative", 1e-3, [98.0, 99.5], [108.0, 109.0])
    experiment_id = plant("partial", 85.0, rows)
    grid = MlflowClient().create_run(experiment_id, tags={"kind": "compare"})
    MlflowClient().log_param(grid.info.run_id, "lrs", repr([1e-3, 1e-2]))
    text = report(experiment_id, tmp_path / "out")
    assert "not tuned" not in text and "Learning rates were swept (2 per method" in text
    assert "The sweep has not finished" in text and "sparsegpt+ft at 90% has no run at lr 0.001" in text, text
    assert "iterative at 90% has fewer seeds at lr 0.01 (1 of 2 seeds)" in text, text


def test_a_save_in_another_layout_reads_back_and_one_that_differs_says_what_failed(tmp_path, corpus_dir):
    """transformers writes a Mixtral's fused experts as per-expert matrices: other names and shapes than the model
    in memory holds, so the save is loaded back and compared tensor by tensor; files that differ from the model
    are refused for what they are, which is no matter of disk space."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from pipeline.errors import UserError
    from pipeline.experts import fused_experts, unfuse_experts
    from pipeline.models import save_model, verify_saved_model
    from pipeline.tools.pretrain import train_tokenizer

    tokenizer = train_tokenizer((corpus_dir / "train.txt").read_text(encoding="utf-8")[:20_000], 300)
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)  # as the tool holds it
    save_model(model, tokenizer, tmp_path / "moe")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down[1].weight[0, 0] += 1.0  # the model now differs from its files
    with pytest.raises(UserError) as refused, fused_experts(model):  # as save_model checks it: fused
        verify_saved_model(model, tmp_path / "moe")
    message = str(refused.value)
    assert "do not read back as the mixtral model in memory" in message and "they differ" in message, message
    assert "free some space" not in message


def test_a_sweep_extended_at_one_target_is_complete_at_the_others(mlflow_store, tmp_path):
    """A grid swept 1e-3 and 1e-2 at 50% and 90%, then extended by 3e-2 at 90% alone (its selection sat at the
    edge there): nothing is missing, and the report says which lrs each target swept."""
    rows = [
        *[row for t in (0.5, 0.9) for lr in (1e-3, 1e-2) for row in rows_of("sparsegpt+ft", lr, [99.0], [98.0], t)],
        *rows_of("sparsegpt+ft", 3e-2, [97.0], [96.0], 0.9),
    ]
    experiment_id = plant("extended", 85.0, rows)
    for lrs, targets in (([1e-3, 1e-2], [0.5, 0.9]), ([3e-2], [0.9])):
        grid = MlflowClient().create_run(experiment_id, tags={"kind": "compare"})
        for key, value in (("lrs", lrs), ("sparsities", targets)):
            MlflowClient().log_param(grid.info.run_id, key, repr(value))
    text = report(experiment_id, tmp_path / "out")
    assert "The sweep has not finished" not in text, text
    assert "per target: 50% 0.001, 0.01; 90% 0.001, 0.01, 0.03" in text, text


def test_rungs_of_the_lr_ladder_are_not_an_unfinished_sweep(mlflow_store, tmp_path):
    """A grid swept 1e-3 and 1e-2; sparsegpt+ft's selection sat at 1e-2, so the ladder ran 3e-2 for it alone
    (--extend-lrs): iterative has no run at 3e-2 by design. The report names the rung, says the sweep is
    whole, and keeps saying what a seed short at a planned lr still is."""
    rows = [
        *rows_of("sparsegpt+ft", 1e-3, [99.0, 99.0], [98.0, 98.0]),
        *rows_of("sparsegpt+ft", 1e-2, [97.0, 97.0], [96.0, 96.0]),
        *rows_of("sparsegpt+ft", 3e-2, [98.0, 98.0], [97.0, 97.0]),
        *rows_of("iterative", 1e-3, [95.0, 95.0], [94.0, 94.0]),
        *rows_of("iterative", 1e-2, [96.0, 96.0], [95.0, 95.0]),
    ]
    experiment_id = plant("laddered", 85.0, rows)
    grid = MlflowClient().create_run(experiment_id, tags={"kind": "compare"})
    MlflowClient().log_param(grid.info.run_id, "lrs", repr([1e-3, 1e-2]))
    text = report(experiment_id, tmp_path / "out")
    assert "The sweep has not finished" not in text, text
    assert "2 per method, the same grid for each: 0.001, 0.01, and past it" in text, text
    assert "the next rungs of the ladder for that method alone (0.03)" in text, text
    planted = plant("laddered-short", 85.0, rows[:-1])  # iterative one seed short at a planned lr
    grid = MlflowClient().create_run(planted, tags={"kind": "compare"})
    MlflowClient().log_param(grid.info.run_id, "lrs", repr([1e-3, 1e-2]))
    text = report(planted, tmp_path / "short")
    assert "iterative at 90% has fewer seeds at lr 0.01 (1 of 2 seeds)" in text, text
