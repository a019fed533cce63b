"""Schedules, mask-preserving training, the IMP loop, checkpoints and resume."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
import torch
from imp_jobs import (
    PER_ITERATION,
    final_perplexity,
    final_sparsity,
    finished_output,
    iterative_args,
    run_iterative_cli,
)

from pipeline.errors import UserError
from pipeline.schedules import (
    cubic_schedule,
    geometric_schedule,
    iterations_to_reach,
    learning_rate_for,
    sparsity_schedule,
)


@pytest.mark.parametrize(
    "target, fraction, n", [(0.9, 0.1, 22), (0.5, 0.1, 7), (0.95, 0.1, 29), (0.19, 0.1, 2), (0.5, 0.2, 4)]
)
def test_iteration_counts_match_the_spec(target, fraction, n):
    assert iterations_to_reach(target, fraction) == n
    schedule = geometric_schedule(target, fraction)
    assert len(schedule) == n and schedule[-1] == target
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    assert schedule[0] == pytest.approx(fraction)
    if n > 1:
        assert schedule[-2] == pytest.approx(1 - (1 - fraction) ** (n - 1))


def test_cubic_schedule_is_zhu_gupta():
    s = cubic_schedule(0.9, 10)
    assert s[-1] == pytest.approx(0.9) and len(s) == 10
    assert s[0] == pytest.approx(0.9 * (1 - (1 - 0.1) ** 3))
    steps = [b - a for a, b in zip([0.0] + s, s)]
    assert all(x > y for x, y in zip(steps, steps[1:]))  # prunes most early
    assert len(sparsity_schedule("cubic", 0.5, 0.1)) == 7


def test_learning_rate_decays_geometrically():
    assert learning_rate_for(1, 5, 1e-5, 1e-6) == pytest.approx(1e-5)
    assert learning_rate_for(5, 5, 1e-5, 1e-6) == pytest.approx(1e-6)
    assert learning_rate_for(3, 5, 1e-5, 1e-6) == pytest.approx(math.sqrt(1e-5 * 1e-6))


def test_training_keeps_the_mask_and_lowers_the_loss(tiny_model_dir, corpus_dir):
    from loading import load_model_and_tokenizer

    from pipeline.data import load_corpus, training_blocks
    from pipeline.pruning.magnitude import magnitude_prune_layerwise
    from pipeline.pruning.masks import MaskKeeper, model_masks, prunable_linears
    from pipeline.training import TrainConfig, train_causal_lm

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    blocks = training_blocks(load_corpus(f"text:{corpus_dir}"), tokenizer, 64)
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.6)
    before = model_masks(linears)
    keeper = MaskKeeper(linears)
    result = train_causal_lm(
        model,
        blocks,
        TrainConfig(lr=3e-3, weight_decay=0.1, batch_size=4, epochs=2, max_steps=8, log_every=4),
        mask_keeper=keeper,
        show_progress=False,
    )
    after = model_masks(linears)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert result.steps == 16 and result.tokens == 16 * 4 * 64
    assert result.epoch_losses[1] < result.epoch_losses[0]
    # Without the keeper, AdamW's weight decay and moments revive pruned weights: the keeper is what holds them.
    revived = train_causal_lm(
        model, blocks, TrainConfig(lr=3e-3, weight_decay=0.1, batch_size=4, max_steps=2), show_progress=False
    )
    assert revived.steps == 2
    assert any(not torch.equal(before[n], m.weight != 0) for n, m in linears.items())


def test_kill_during_training_then_resume_equals_uninterrupted(
    tmp_path, tiny_model_dir, corpus_dir, reference_iterative_run
):
    import mlflow
    from mlflow.tracking import MlflowClient

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    reference = reference_iterative_run

    process = run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "killed", env=env)
    seen = []
    for line in process.stdout:  # kill it inside iteration 2's training
        seen.append(line)
        if "Iteration 2, Epoch 1/1" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert any("Iteration 1:" in line for line in seen)
    time.sleep(4)  # time between the kill and the resume: the run's wall time holds it, the cell's own time not
    resumed = finished_output(
        run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "killed", "--resume", env=env)
    )
    assert "Resuming after iteration 1" in resumed
    assert f"was held by pid {process.pid}" in resumed and "no longer running" in resumed  # the stale lock
    assert final_perplexity(resumed) == final_perplexity(reference)

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["imp"])
    assert len(runs) == 1  # the resumed run continued the killed one
    run_id = runs.iloc[0]["run_id"]
    assert runs.iloc[0]["status"] == "FINISHED"
    client = MlflowClient()
    for key in PER_ITERATION:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], key  # one point per iteration, none twice, none missing
    step_losses = [m.step for m in client.get_metric_history(run_id, "train_step_loss")]
    assert len(step_losses) == len(set(step_losses))
    assert runs.iloc[0]["metrics.final_sparsity"] == pytest.approx(final_sparsity(reference), abs=1e-4)
    assert final_sparsity(reference) >= 0.488
    assert runs.iloc[0]["metrics.final_perplexity"] == pytest.approx(final_perplexity(reference), rel=1e-4)
    wall = (runs.iloc[0]["end_time"] - runs.iloc[0]["start_time"]).total_seconds()
    iterations = sum(m.value for m in client.get_metric_history(run_id, "iteration_seconds"))
    assert iterations < runs.iloc[0]["metrics.cell_seconds"] <= wall - 4, (iterations, wall)


def test_iterative_api_saves_models_that_reload_to_the_same_numbers(mlflow_store, tiny_model_dir, corpus_dir):
    import mlflow
    from loading import load_model_and_tokenizer

    from pipeline.api import iterative_training_wrapper
    from pipeline.data import load_corpus
    from pipeline.perplexity import evaluate_on
    from pipeline.pruning.masks import prunable_linears, sparsity_of

    history = iterative_training_wrapper(
        {
            "model_name": str(tiny_model_dir),
            "dataset": f"text:{corpus_dir}",
            "target_sparsity": 0.3,
            "prune_percentage": 0.2,
            "epochs_per_iteration": 1,
            "max_iterations": 25,
            "batch_size": 4,
            "lr": 1e-3,
            "train_steps": 3,
            "seed": 1,
            "save_model": True,
            "seqlen": 64,
            "experiment": "api",
        }
    )
    assert [round(h["sparsity"], 4) for h in history] == [0.0, 0.2, 0.3]
    for h in history[1:]:
        assert h["recovery_pct"] == pytest.approx(
            100 * (h["ppl_after_prune"] - h["ppl_after_train"]) / h["ppl_after_prune"]
        )
    corpus = load_corpus(f"text:{corpus_dir}")
    name = f"{tiny_model_dir.name}-iterative-0.30"
    model, tokenizer = load_model_and_tokenizer(f"pruned_models/{name}")
    assert sparsity_of(prunable_linears(model)) == pytest.approx(0.3, abs=1e-4)
    assert evaluate_on(model, tokenizer, corpus, "test", 64, "cpu").perplexity == pytest.approx(
        history[-1]["ppl_after_train"], rel=1e-5
    )
    state = torch.load(f"pruned_models/{name}.pt", weights_only=True)
    fresh, _ = load_model_and_tokenizer(str(tiny_model_dir))
    fresh.load_state_dict(state)
    assert evaluate_on(fresh, tokenizer, corpus, "test", 64, "cpu").perplexity == pytest.approx(
        history[-1]["ppl_after_train"], rel=1e-5
    )
    run = mlflow.search_runs(experiment_names=["api"]).iloc[0]
    assert run["metrics.vs_unpruned_pct"] == pytest.approx(
        100 * (history[-1]["ppl_after_train"] - history[0]["ppl_after_train"]) / history[0]["ppl_after_train"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "model")}
    assert "model/model.safetensors" in artifacts


def test_api_rejects_unknown_keys():
    from pipeline.api import iterative_training_wrapper

    with pytest.raises(UserError, match="unknown config keys: learning_rate, traget_sparsity"):
        iterative_training_wrapper({"traget_sparsity": 0.9, "learning_rate": 1e-5})


@pytest.mark.parametrize(
    "stop, code, said", [(signal.SIGTERM, 143, "Terminated."), (signal.SIGINT, 130, "Interrupted.")]
)
def test_sigterm_or_ctrl_c_marks_killed_and_resume_refuses_other_config(
    tmp_path, tiny_model_dir, corpus_dir, stop, code, said
):
    import mlflow

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    long = ["--epochs-per-iteration", "50"]  # still training when the signal comes, however fast the machine
    # as from a terminal: a shell that starts the suite in the background has its children ignore SIGINT
    terminal = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    process = run_iterative_cli(tmp_path, tiny_model_dir, corpus_dir, "--output-dir", "run", *long, env=env, **terminal)
    for line in process.stdout:
        if "Iteration 1, Epoch 1/50" in line:
            break
    process.send_signal(stop)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == code and said in rest, rest
    assert "--resume" in rest and "Traceback" not in rest
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert mlflow.search_runs(experiment_names=["imp"]).iloc[0]["status"] == "KILLED"
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no half-written checkpoint
    if stop == signal.SIGINT:
        return
    from test_bad_input import assert_one_line, here

    common = iterative_args(tiny_model_dir, corpus_dir, "--output-dir", "run", *long)
    assert_one_line(here(*common, "--resume", "--batch-size", "2", cwd=tmp_path, env=env), 2, "batch_size")
    assert_one_line(here(*common, cwd=tmp_path, env=env), 2, "--resume")


def test_train_command_keeps_the_mask_and_logs(mlflow_store, tiny_model_dir, corpus_dir, tmp_path):
    import mlflow
    from loading import load_model_and_tokenizer

    from pipeline.config import TrainRunConfig
    from pipeline.data import load_corpus
    from pipeline.jobs.train import run_train
    from pipeline.perplexity import evaluate_on
    from pipeline.pruning.magnitude import magnitude_prune_layerwise
    from pipeline.pruning.masks import model_masks, prunable_linears
    from pipeline.settings import build

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    magnitude_prune_layerwise(prunable_linears(model), 0.7)
    masks = model_masks(prunable_linears(model))
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    result = run_train(
        build(
            TrainRunConfig,
            dict(
                model=str(tmp_path / "pruned"),
                dataset=f"text:{corpus_dir}",
                device="cpu",
                seqlen=64,
                experiment="train",
                output_dir=str(tmp_path / "trained"),
                lr=2e-3,
                batch_size=4,
                epochs=2,
                max_steps=5,
                log_every=2,
            ),
        )
    )
    trained, _ = load_model_and_tokenizer(str(tmp_path / "trained"))
    after = model_masks(prunable_linears(trained))
    assert all(torch.equal(masks[n], after[n]) for n in masks)
    ppl = evaluate_on(trained, tokenizer, load_corpus(f"text:{corpus_dir}"), "validation", 64, "cpu").perplexity
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-5)
    run = mlflow.search_runs(experiment_names=["train"]).iloc[0]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run["run_id"], "train_loss")] == [2, 4, 5, 6, 8, 10]
    assert [m.step for m in client.get_metric_history(run["run_id"], "epoch_loss")] == [1, 2]
    assert run["metrics.validation_perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert run["metrics.sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(mlflow_store, tiny_model_dir, corpus_dir):
    import mlflow

    from pipeline.api import iterative_training_wrapper
    from pipeline.checkpoint import load_checkpoint
    from pipeline.cli import user_message

    config = {
        "model_name": str(tiny_model_dir),
        "dataset": f"text:{corpus_dir}",
        "target_sparsity": 0.5,
        "prune_percentage": 0.4,
        "epochs_per_iteration": 1,
        "batch_size": 4,
        "train_steps": 4,
        "seqlen": 64,
        "lr": 1e6,
        "experiment": "nan",
        "output_dir": "run",
    }
    with pytest.raises(UserError, match=r"iteration 1 stopped: the training loss became (nan|inf)") as caught:
        iterative_training_wrapper(config)
    assert "--resume" in user_message(caught.value)  # as the CLI shows it
    assert load_checkpoint(Path("run"))["iteration"] == 0  # the last good checkpoint, untouched
    run = mlflow.search_runs(experiment_names=["nan"]).iloc[0]
    assert run["status"] == "FAILED" and "training loss became" in run["tags.error"]


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_as_before_value():
    """A checkpoint records the settings of its version: one made before --recovery existed holds none, and
    resumes where --recovery is finetune (what every run did then), not where it is reconstruct."""
    from pipeline.jobs.iterative import config_differences

    saved = {"lr": 1e-3, "budget": None}
    assert config_differences(saved, {"lr": 1e-3, "budget": None, "recovery": "finetune", "eval_every": 1}) == []
    assert config_differences(saved, {"lr": 1e-3, "budget": None, "recovery": "reconstruct"}) == ["recovery"]
    assert config_differences(saved, {"lr": 1e-3, "budget": None, "max_steps": 20}) == ["max_steps"]
    assert config_differences({**saved, "recovery": "reconstruct"}, {**saved, "recovery": "finetune"}) == ["recovery"]
