"""Bad input refused in one line before any work (naming the flag as the command spells it), and faults that
keep the last good state: models never replaced unasked, saves that fail whole, runs a kill left RUNNING."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from test_bad_input import assert_one_line, cli, here, runs_in, store_env

from pipeline.cli import COMMANDS, flag, user_message
from pipeline.cli import cli as click_group
from pipeline.errors import ConfigError
from pipeline.settings import build, flatten

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_model(source: Path, target: Path, *, tokenizer_from: Path | None = None, tokenizer: bool = True) -> Path:
    shutil.copytree(source, target)
    for name in TOKENIZER_FILES:
        if not tokenizer or tokenizer_from:
            (target / name).unlink(missing_ok=True)
        if tokenizer_from and (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, target / name)
    return target


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, corpus_dir):
    """Tiny OPTs beside the session's (vocabulary 400, 2 layers): a smaller vocabulary, and another depth."""
    from conftest import make_tiny_opt

    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    return {
        "vocab300": make_tiny_opt(tmp_path_factory.mktemp("vocab300"), text, vocab=300),
        "deeper": make_tiny_opt(tmp_path_factory.mktemp("deeper"), text, layers=3),
    }


def data_args(model: Path, corpus_dir: Path) -> list:
    return ["--model", str(model), "--dataset", f"text:{corpus_dir}", "--seqlen", "32", "--device", "cpu"]


# --- a model is never replaced unasked; a save that fails leaves the previous one whole --------------------


def test_a_second_prune_into_the_same_directory_never_replaces_the_first_model(tmp_path, tiny_model_dir, corpus_dir):
    env = store_env(tmp_path)
    first = here(
        "prune",
        "--prune-method",
        "random",
        "--prune-seed",
        "1",
        *data_args(tiny_model_dir, corpus_dir),
        cwd=tmp_path,
        env=env,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    saved = tmp_path / "pruned_models" / f"{tiny_model_dir.name}-random-0.50"
    weights = (saved / "model.safetensors").read_bytes()
    second = here(
        "prune",
        "--prune-method",
        "random",
        "--prune-seed",
        "2",
        *data_args(tiny_model_dir, corpus_dir),
        cwd=tmp_path,
        env=env,
    )
    assert_one_line(second, 2, "--output-dir", "already holds a saved model", "--overwrite")
    assert (saved / "model.safetensors").read_bytes() == weights and len(runs_in(tmp_path)) == 1
    third = here(
        "prune",
        "--prune-method",
        "random",
        "--prune-seed",
        "2",
        "--overwrite",
        *data_args(tiny_model_dir, corpus_dir),
        cwd=tmp_path,
        env=env,
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert (saved / "model.safetensors").read_bytes() != weights  # asked for: replaced


def test_a_save_that_runs_out_of_space_leaves_the_previous_model_whole(tmp_path, tiny_model_dir):
    """The file-size limit makes every write past 64 KiB fail as a full disk would (EFBIG instead of ENOSPC)."""
    script = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from loading import load_model_and_tokenizer
from pipeline.errors import UserError
from pipeline.models import save_model
model, tokenizer = load_model_and_tokenizer({str(tiny_model_dir)!r})
target = {str(tmp_path / "model")!r}
save_model(model, tokenizer, target)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(0.5)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
try:
    save_model(model, tokenizer, target)
except UserError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not save the model to" in done.stdout and "is intact" in done.stdout, done.stdout
    from loading import load_model_and_tokenizer

    original, _ = load_model_and_tokenizer(str(tiny_model_dir))
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "model"))
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        assert (a == b).all(), name  # the first save, whole: not the halved weights, not a mix
    assert not list((tmp_path / "model").glob(".saving-*"))


def test_a_run_that_fails_before_writing_leaves_no_directory_it_created(tmp_path):
    from pipeline.outputs import owned_output_dir

    with pytest.raises(RuntimeError):
        with owned_output_dir(tmp_path / "new" / "run"):
            raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):
        with owned_output_dir(tmp_path / "kept") as out:
            (out / "checkpoint.pt").write_text("written")
            raise RuntimeError("failed after writing")
    assert (tmp_path / "kept" / "checkpoint.pt").exists()  # what a run wrote is kept
    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError):
        with owned_output_dir(tmp_path / "existing"):
            raise RuntimeError("failed")
    assert (tmp_path / "existing").is_dir()  # a directory it did not create stays


# --- refused in one line before any run opens ------------------------------------------------------------


def test_a_teacher_of_another_vocabulary_or_shape_is_refused(tmp_path, tiny_model_dir, corpus_dir, other_models):
    env = store_env(tmp_path)
    base = ["train", *data_args(tiny_model_dir, corpus_dir), "--max-steps", "1", "--batch-size", "2"]
    vocab = here(*base, "--teacher", str(other_models["vocab300"]), "--distill", "logits", cwd=tmp_path, env=env)
    assert_one_line(vocab, 2, "--teacher", "vocabulary of 300", "400")
    deeper = here(*base, "--teacher", str(other_models["deeper"]), "--distill", "squarehead", cwd=tmp_path, env=env)
    assert_one_line(deeper, 2, "--distill squarehead", "--teacher", "3 layers")
    missing = here(*base, "--teacher", str(tmp_path / "no-such-dir"), "--distill", "logits", cwd=tmp_path, env=env)
    assert_one_line(missing, 2, "--teacher", "does not exist")
    unused = here(*base, "--teacher", str(tiny_model_dir), cwd=tmp_path, env=env)
    assert_one_line(unused, 2, "--teacher is what --distill learns from")
    assert runs_in(tmp_path) == [] and not (tmp_path / "pruned_models").exists()


def test_a_model_whose_vocabulary_is_smaller_than_its_token_ids_is_refused(
    tmp_path, tiny_model_dir, corpus_dir, other_models
):
    mixed = copy_model(other_models["vocab300"], tmp_path / "mixed", tokenizer_from=tiny_model_dir)
    for command in ("evaluate", "prune"):
        result = here(command, *data_args(mixed, corpus_dir), cwd=tmp_path, env=store_env(tmp_path))
        assert_one_line(result, 2, "--model", "token ids below 300", "not the model's own")
    assert runs_in(tmp_path) == []


def test_a_model_directory_without_tokenizer_or_with_cut_weights_is_one_line(tmp_path, tiny_model_dir, corpus_dir):
    bare = copy_model(tiny_model_dir, tmp_path / "bare", tokenizer=False)
    assert_one_line(
        here("evaluate", *data_args(bare, corpus_dir), cwd=tmp_path, env=store_env(tmp_path)),
        2,
        "holds no tokenizer",
        "tokenizer.save_pretrained",
    )
    cut = copy_model(tiny_model_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line(
        here("evaluate", *data_args(cut, corpus_dir), cwd=tmp_path, env=store_env(tmp_path)),
        1,
        "model.safetensors is truncated",
    )
    assert runs_in(tmp_path) == []


def test_only_decoder_only_causal_lms_are_accepted(tmp_path, corpus_dir):
    from transformers import BertConfig, T5Config

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(tmp_path / "t5")
    for name, fragment in (("bert", "is an encoder model (bert)"), ("t5", "is an encoder-decoder model (t5)")):
        result = here("prune", *data_args(tmp_path / name, corpus_dir), cwd=tmp_path, env=store_env(tmp_path))
        assert_one_line(result, 2, fragment, "decoder-only causal LMs")
    assert runs_in(tmp_path) == [] and not (tmp_path / "pruned_models").exists()


def test_pretraining_a_model_larger_than_the_memory_is_refused_before_allocating(tmp_path):
    started = time.perf_counter()
    result = here(
        "pretrain",
        "--hidden-size",
        "1000000",
        "--num-layers",
        "1000",
        "--num-heads",
        "4",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert_one_line(result, 2, "--hidden-size 1000000", "--num-layers 1000", "GiB to train", "GiB free")
    assert time.perf_counter() - started < 60 and runs_in(tmp_path) == [] and not (tmp_path / "pretrained").exists()


def test_report_bad_output_dir_and_empty_experiment_open_no_run(tmp_path):
    env = store_env(tmp_path)
    (tmp_path / "a-file").write_text("x")
    assert_one_line(
        here("report", "--output-dir", "a-file", cwd=tmp_path, env=env), 2, "--output-dir a-file", "is a file"
    )
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.create_experiment("empty")
    assert_one_line(here("report", "--experiment", "empty", cwd=tmp_path, env=env), 1, "'empty' holds no finished")
    assert runs_in(tmp_path) == []


def test_bench_bad_input_opens_no_run(tmp_path, tiny_model_dir):
    env = store_env(tmp_path)
    assert_one_line(here("bench", "--model", "opt-9b", "--quick", cwd=tmp_path, env=env), 2, "unknown model")
    window = here("bench", "--model", str(tiny_model_dir), "--seqlen", "4096", "--quick", cwd=tmp_path, env=env)
    assert_one_line(window, 2, "--seqlen 4096 is above the model's 128 positions")
    assert runs_in(tmp_path) == []


def test_a_broken_task_yaml_is_named_in_one_line(tmp_path, tiny_model_dir, corpus_dir):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "broken.yaml").write_text("task: broken\ndataset_path: [unclosed\n")
    result = here(
        "evaluate", *data_args(tiny_model_dir, corpus_dir), "--tasks", "tasks", cwd=tmp_path, env=store_env(tmp_path)
    )
    assert_one_line(result, 2, "--tasks", "broken.yaml is not valid YAML at line")
    assert runs_in(tmp_path) == []


@pytest.mark.parametrize("name", ["a/b", "models:/x"])
def test_a_registered_model_name_mlflow_refuses_is_refused_first(tmp_path, name):
    result = here("prune", "--register-model", name, "--model", "opt-9b", cwd=tmp_path, env=store_env(tmp_path))
    assert_one_line(result, 2, "--register-model", "Model Registry")  # before the model is even looked at


def test_rewinding_past_the_schedule_is_refused(tmp_path):
    result = here(
        "iterative",
        "--target-sparsity",
        "0.5",
        "--prune-percentage",
        "0.3",
        "--rewind",
        "iteration:2",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert_one_line(result, 2, "--rewind iteration:2", "the schedule has 2 iterations", "from 1 to 1")


def test_seeds_are_whole_numbers_a_64_bit_generator_takes_exactly(tmp_path):
    for args, fragment in (
        (["train", "--seed", str(2**64)], "--seed 18446744073709551616 is outside [0, 9223372036854775807]"),
        (["prune", "--prune-seed", "1e23"], "--prune-seed 99999999999999991611392 is outside"),
        (["compare", "--seeds", "0,-1"], "--seeds -1 is outside"),
    ):
        assert_one_line(here(*args, cwd=tmp_path, env=store_env(tmp_path)), 2, fragment)
    context = click_group.commands["train"].make_context("train", ["--seed", str(2**63 - 1)])
    assert context.params["seed"] == 2**63 - 1  # exactly, not through a float


def test_every_list_setting_takes_each_value_once():
    from pipeline.config import CompareConfig
    from pipeline.grid import plan_cells

    config = build(
        CompareConfig,
        {"methods": ["magnitude", "iterative", "magnitude"], "sparsities": [0.5, 0.5], "seeds": [0, 0, 1]},
    )
    assert config.grid.methods == ["magnitude", "iterative"] and config.grid.sparsities == [0.5]
    assert [cell.label for cell in plan_cells(config, "corpus")] == [
        "dense",
        "Magnitude 0.50",
        "Iterative 0.50 lr 1e-05 seed 0",
        "Iterative 0.50 lr 1e-05 seed 1",
    ]


def test_settings_that_would_be_ignored_are_refused(tmp_path):
    for args, fragment in (
        (["evaluate", "--limit", "3"], "--limit applies to --tasks"),
        (["iterative", "--num-fewshot", "1"], "--num-fewshot applies to --eval-tasks"),
        (["compare", "--methods", "sparsegpt", "--distill", "logits"], "--methods has none"),
        (["compare", "--methods", "sparsegpt", "--recoveries", "logits"], "--distill logits is the recovery loss"),
    ):
        assert_one_line(here(*args, cwd=tmp_path, env=store_env(tmp_path)), 2, fragment)
    assert runs_in(tmp_path) == []


def test_messages_name_the_flag_of_the_command_that_was_run(tmp_path, tiny_model_dir):
    env = store_env(tmp_path)
    assert_one_line(here("compare", "--patterns", "3:2", cwd=tmp_path, env=env), 2, "--patterns takes N:M")
    long = here("iterative", "--model", str(tiny_model_dir), "--train-seqlen", "100000", cwd=tmp_path, env=env)
    assert_one_line(long, 2, "--train-seqlen 100000 is above the model's 128 positions")


def _out_of_range(leaf):
    """A value the leaf's range refuses, or None when it has no range."""
    check = leaf.check
    kind = leaf.item if leaf.base is list else leaf.base
    if kind not in (int, float):
        return None
    if check.at_least is not None:
        return check.at_least - 1
    if check.above is not None:
        return check.above
    if check.at_most is not None:
        return check.at_most + 1
    if check.below is not None:
        return check.below
    return None


def _ranged_options():
    for command in COMMANDS:
        for leaf in flatten(command.config):
            if leaf.check.cli and not leaf.check.argument and _out_of_range(leaf) is not None:
                yield command.name, leaf


@pytest.mark.parametrize("command, leaf", list(_ranged_options()), ids=lambda v: v if isinstance(v, str) else v.key)
def test_every_option_refuses_an_out_of_range_value_naming_its_own_flag(command, leaf):
    with pytest.raises(ConfigError) as refused:
        click_group.main([command, flag(leaf.key), str(_out_of_range(leaf))], standalone_mode=False)
    message = user_message(refused.value)
    assert message.startswith(f"{flag(leaf.key)} ") or f" {flag(leaf.key)} " in message, message


def test_the_python_entry_point_says_it_takes_a_dict():
    from pipeline.api import iterative_training_wrapper

    with pytest.raises(ConfigError, match="takes a dict of settings.*not a list"):
        iterative_training_wrapper([1, 2])


def test_zero_shot_tasks_print_no_git_complaint_outside_a_repository(tmp_path, tiny_model_dir, corpus_dir):
    result = cli(
        "evaluate",
        *data_args(tiny_model_dir, corpus_dir),
        "--tasks",
        "pydocs-cloze",
        "--limit",
        "3",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fatal" not in result.stdout + result.stderr


# --- a compare stopped or killed: how to continue, and what it left RUNNING -------------------------------


def test_a_killed_compare_is_marked_killed_by_the_next_one_which_says_how_to_continue(
    tmp_path, tiny_model_dir, corpus_dir
):
    args = [
        "compare",
        *data_args(tiny_model_dir, corpus_dir),
        "--methods",
        "iterative",
        "--sparsities",
        "0.5",
        "--prune-percentage",
        "0.4",
        "--max-steps",
        "400",
        "--batch-size",
        "2",
        "--lr",
        "1e-4",
        "--experiment",
        "stop",
        "--no-report",
    ]
    env = store_env(tmp_path, PYTHONUNBUFFERED="1")

    def start_and_wait_for_training():
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        seen = []
        for line in process.stdout:  # the trained cell's first iteration has started training
            seen.append(line)
            if "Iteration 1/" in line:
                break
        time.sleep(2)
        assert process.poll() is None, "".join(seen)
        return process, seen

    first, _ = start_and_wait_for_training()
    first.kill()
    first.wait(timeout=60)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    left = mlflow.search_runs(experiment_names=["stop"])
    killed = list(left.loc[left["status"] == "RUNNING", "run_id"])
    assert len(killed) == 2  # the grid's run and the trained cell's (the dense cell had finished)
    second, seen = start_and_wait_for_training()
    assert any("marked KILLED" in line for line in seen), "".join(seen)
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 143, stderr[-2000:]
    assert "run the same compare command again" in stderr and "--resume" not in stderr, stderr
    runs = mlflow.search_runs(experiment_names=["stop"]).set_index("run_id")
    assert set(runs.loc[killed, "status"]) == {"KILLED"}
    assert "RUNNING" not in set(runs["status"])


@pytest.mark.parametrize(
    "args, flag_name, fragment",
    [
        (("prune", "--sparsity-profile", "owl", "--pattern", "2:4"), "--sparsity-profile", "N:M"),
        (
            ("prune", "--prune-method", "magnitude", "--sparsity-profile", "owl", "--scope", "global"),
            "--sparsity-profile",
            "--scope global",
        ),
        (("prune", "--sparsity-profile", "nonuniform"), "--sparsity-profile", "uniform"),
        (("train", "--lora-targets", "fc(", "--train-params", "lora"), "--lora-targets", "not a valid regex"),
        (("train", "--train-params", "lora-all"), "--train-params", "norms-biases"),
        (("compare", "--methods", "sparsegpt", "--train-params", "lora"), "--train-params", "add iterative"),
    ],
)
def test_owl_and_train_params_settings_are_refused_in_one_line(tmp_path, args, flag_name, fragment):
    result = here(*args, cwd=tmp_path, env=store_env(tmp_path))
    assert_one_line(result, 2, flag_name, fragment)
    assert not (tmp_path / "mlflow.db").exists() or mlflow.search_runs(search_all_experiments=True).empty
