"""Bad input: one clear line, the right exit code, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import exit_code_for, user_message
from pipeline.config import IterativeConfig, ScheduleConfig
from pipeline.errors import ConfigError, UserError
from pipeline.settings import build, flatten


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_sparsity": 1.0}, "outside (0, 1)"),
        ({"target_sparsity": -0.5}, "outside (0, 1)"),
        ({"prune_percentage": 0.0}, "prune-percentage"),
        ({"prune_percentage": 1.5}, "prune-percentage"),
        ({"epochs_per_iteration": 0}, "epochs-per-iteration"),
        ({"batch_size": -1}, "batch-size"),
        ({"max_iterations": 0}, "max-iterations"),
        ({"max_steps": 0}, "max-steps"),
        ({"lr": 0}, "--lr must be positive"),
        ({"schedule": "linear"}, "unknown schedule"),
        ({"prune_method": "optimal"}, "unknown pruning method"),
        ({"prune_method": "wanda", "scope": "global"}, "global"),
    ],
)
def test_iterative_config_rejects(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        build(IterativeConfig, kwargs)
    assert message in user_message(caught.value)  # as the CLI shows it
    assert exit_code_for(caught.value) == 2


def test_unreachable_target_is_announced_at_the_start():
    from pipeline.imp import planned_schedule

    schedule, uncapped = planned_schedule(ScheduleConfig(target_sparsity=0.9, prune_percentage=0.1, max_iterations=5))
    assert uncapped == 22 and len(schedule) == 5
    assert schedule[-1] == pytest.approx(1 - 0.9**5)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    from pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint

    (tmp_path / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="damaged or truncated"):
        load_checkpoint(tmp_path)


def cli(*args, cwd, env=None, prefix=()):
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env=env,
    )


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def here(*args, cwd, env=None):
    """The command run in this process, as `cli` runs it in another (one line on stderr, the exit code, what it
    printed): a refusal comes before any work, so the interpreter's start-up need not be paid for each case.
    `env`'s variables that differ from this process's are set for the call."""
    import click

    from pipeline.cli import cli as click_group

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.chdir(cwd)
        for name, value in (env or {}).items():
            if os.environ.get(name) != value:
                patch.setenv(name, value)
        try:
            click_group.main(list(args), standalone_mode=False)
        except (UserError, click.UsageError) as error:
            line = user_message(error) if isinstance(error, UserError) else error.format_message()
            return Result(exit_code_for(error), printed.getvalue(), f"error: {line}\n")
    return Result(0, printed.getvalue(), "")


def assert_one_line(result, code: int, *fragments: str) -> str:
    """The command failed with `code` and said so in one line on stderr, without a traceback."""
    everything = result.stdout + result.stderr
    assert result.returncode == code, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["iterative", "--target-sparsity", "1.2"], "outside (0, 1)"),
        (["iterative", "--epochs-per-iteration", "0"], "epochs-per-iteration"),
        (["prune", "--pattern", "2:x"], "N:M"),
        (["train", "--batch-size", "0"], "--batch-size must be positive"),
        (["compare", "--sparsities", "0.5,abc"], "comma-separated"),
        (["report", "--experiment", "nope"], "no MLflow experiment named 'nope'"),
        (["sync", "nowhere"], "nowhere does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = here(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stdout + result.stderr


def test_resume_of_a_corrupt_checkpoint_exits_1(tmp_path):
    from pipeline.checkpoint import CHECKPOINT_NAME

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"\x00" * 100)
    result = here("iterative", "--output-dir", "run", "--resume", cwd=tmp_path)
    assert result.returncode == 1 and "damaged or truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["iterative", "train"])
def test_fsdp1_launch_is_refused_before_any_work(tmp_path, command):
    import os

    # what `accelerate launch --use_fsdp --fsdp_version 1` puts in every process's environment
    env = dict(os.environ, ACCELERATE_USE_FSDP="true", FSDP_VERSION="1")
    result = here(command, "--output-dir", "out", cwd=tmp_path, env=env)
    assert result.returncode == 2 and "--fsdp_version 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# --- more bad inputs and faults: values, files, permissions, stores -----------------------------------

# Run as root, a process ignores file permissions; without CAP_DAC_OVERRIDE it obeys them as any user does.
AS_A_USER = (
    ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search")
    if os.geteuid() == 0
    else ()
)


def store_env(tmp_path, **extra) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", **extra)


def runs_in(tmp_path) -> list:
    if not (tmp_path / "mlflow.db").exists():
        return []
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return list(mlflow.search_runs(search_all_experiments=True)["status"])


def read_only_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


@pytest.mark.parametrize("command", ["prune", "train", "iterative"])
def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_model_dir, command):
    target = tmp_path / "F"
    target.write_text("a file the user keeps")
    result = here(
        command,
        "--model",
        str(tiny_model_dir),
        "--output-dir",
        "F",
        "--device",
        "cpu",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert_one_line(result, 2, "--output-dir F", "is a file")
    assert target.read_text() == "a file the user keeps" and runs_in(tmp_path) == []
    assert "saved to" not in result.stdout


@pytest.mark.parametrize("command", ["prune", "iterative"])
def test_output_dir_in_a_read_only_directory_is_refused_before_any_work(tmp_path, tiny_model_dir, command):
    read_only_dir(tmp_path / "locked")
    result = cli(
        command,
        "--model",
        str(tiny_model_dir),
        "--output-dir",
        "locked/out",
        "--device",
        "cpu",
        cwd=tmp_path,
        env=store_env(tmp_path),
        prefix=AS_A_USER,
    )
    assert_one_line(result, 2, "--output-dir locked/out cannot be written (Permission denied)")
    assert runs_in(tmp_path) == [] and not (tmp_path / "locked" / "out").exists()


def test_saved_model_is_read_back(tmp_path, tiny_model_dir):
    from loading import load_model_and_tokenizer

    from pipeline.errors import UserError
    from pipeline.models import save_model, verify_saved_model

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    save_model(model, tokenizer, tmp_path / "saved")
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own error, whichever this version raises)
        verify_saved_model(model, tmp_path / "saved")
    weights.unlink()
    with pytest.raises(UserError, match="hold no weights"):
        verify_saved_model(model, tmp_path / "saved")


def imp_args(model_dir, corpus_dir, *extra) -> list:
    return [
        "iterative",
        "--model",
        str(model_dir),
        "--dataset",
        f"text:{corpus_dir}",
        "--target-sparsity",
        "0.36",
        "--prune-percentage",
        "0.2",
        "--epochs-per-iteration",
        "1",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seqlen",
        "64",
        "--device",
        "cpu",
        "--experiment",
        "lock",
        *extra,
    ]


def test_an_output_directory_belongs_to_one_live_run(tmp_path, tiny_model_dir, corpus_dir):
    env = store_env(tmp_path)
    long = ["--epochs-per-iteration", "100", "--max-steps", "100"]  # runs until it is stopped
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *imp_args(tiny_model_dir, corpus_dir, "--output-dir", "D", *long)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in first.stdout:  # printed inside the run, while the directory is held
        seen.append(line)
        if "Iteration 1/" in line:  # iteration 0 is checkpointed; the directory is held
            break
    second = here(*imp_args(tiny_model_dir, corpus_dir, "--output-dir", "D", *long), cwd=tmp_path, env=env)
    assert_one_line(second, 1, "D belongs to a run that is still going", f"pid {first.pid}")
    resumed = here(*imp_args(tiny_model_dir, corpus_dir, "--output-dir", "D", *long, "--resume"), cwd=tmp_path, env=env)
    assert_one_line(resumed, 1, f"pid {first.pid}")  # resuming takes the lock too
    first.terminate()
    rest, _ = first.communicate(timeout=120)
    assert first.returncode == 143, "".join(seen) + rest
    from pipeline.checkpoint import load_checkpoint

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["lock"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "KILLED"  # the refused ones opened no run
    assert load_checkpoint(tmp_path / "D")["run_id"] == runs.iloc[0]["run_id"]  # the first run's, untouched
    assert json.loads((tmp_path / "D" / ".pipeline.lock").read_text() or "{}") == {}  # released


def test_evaluation_text_shorter_than_a_window_is_one_line(tmp_path, tiny_model_dir):
    data = tmp_path / "tiny-text"
    data.mkdir()
    (data / "train.txt").write_text("Return the value of the thing. " * 200)
    (data / "test.txt").write_text("Return it.")
    result = here(
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        f"text:{data}",
        "--seqlen",
        "64",
        "--device",
        "cpu",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert_one_line(result, 2, "tokens, fewer than one window of 64", "--seqlen")
    assert runs_in(tmp_path) == []  # checked before a run was opened


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\xff\xfe\x00\x01 binary", "not UTF-8 text"),
        (
            b'{"kind": "run", "run_id": "r", "tracking_uri": "x"}\n[1, 2, 3]\n{"kind": "tags", "tags": {}}\n',
            "line 2 is not an entry",
        ),
        (
            b'{"kind": "run", "run_id": "r", "tracking_uri": "x"}\n{"key": "loss", "value": 1}\n{"kind": "tags"}\n',
            "line 2 is not an entry",
        ),
        (b'{"kind": "tags", "tags": {}}\n', "no run header"),
    ],
)
def test_sync_of_a_journal_it_did_not_write_is_one_line(tmp_path, content, fragment):
    journal = tmp_path / "mlflow-pending-r.jsonl"
    journal.write_bytes(content)
    result = here("sync", str(journal), cwd=tmp_path, env=store_env(tmp_path))
    assert_one_line(result, 1, "is not a tracking journal of this pipeline", fragment)
    assert journal.read_bytes() == content  # left as it was


def test_read_only_tracking_store_is_one_line(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'ro.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # creates the store
    mlflow.set_tracking_uri(None)
    (store / "ro.db").chmod(0o444)
    result = cli(
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        cwd=tmp_path,
        env=dict(os.environ, MLFLOW_TRACKING_URI=uri),
        prefix=AS_A_USER,
    )
    assert_one_line(result, 1, f"MLflow tracking store {uri} is not usable", "readonly database")
    assert "autoflush" not in result.stderr


def test_custom_code_and_pickled_weights_are_refused_in_one_line(tmp_path, tiny_model_dir):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    )
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text(f"open({str(tmp_path / 'CODE_RAN')!r}, 'w').write('x')\n")
    result = here("evaluate", "--model", str(custom), "--device", "cpu", cwd=tmp_path, env=store_env(tmp_path))
    assert_one_line(result, 2, "brings its own Python code", "was not run", "--trust-remote-code")

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "PICKLE_RAN"
    (tmp_path / "make.py").write_text(
        "import os, sys, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        "torch.save({'x': Evil()}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, str(tmp_path / "make.py"), str(pickled / "pytorch_model.bin")], check=True)
    result = here("evaluate", "--model", str(pickled), "--device", "cpu", cwd=tmp_path, env=store_env(tmp_path))
    line = assert_one_line(result, 1, "refused to load", "would run code", "not loaded")
    assert "weights_only=False" not in result.stderr + result.stdout and "likely succeed" not in line
    assert not (tmp_path / "CODE_RAN").exists() and not marker.exists()  # neither ran
    assert runs_in(tmp_path) == []


def _float_settings():
    from pipeline import cli as cli_module

    seen = set()
    for command in cli_module.COMMANDS:
        config_class = command.config
        for leaf in flatten(config_class):
            if leaf.base is float and (config_class, leaf.key) not in seen:
                seen.add((config_class, leaf.key))
                yield config_class, leaf.key


@pytest.mark.parametrize(
    "config_class, key", list(_float_settings()), ids=lambda v: v if isinstance(v, str) else v.__name__
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_rejects_nan_and_inf(config_class, key, value):
    with pytest.raises(ConfigError, match="must be a finite number"):
        build(config_class, {key: value})


def test_lr_nan_is_refused_before_any_work(tmp_path, tiny_model_dir):
    result = here(
        "iterative",
        "--model",
        str(tiny_model_dir),
        "--lr",
        "nan",
        "--output-dir",
        "run",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert_one_line(result, 2, "--lr must be a finite number, got nan")
    assert not (tmp_path / "run").exists() and runs_in(tmp_path) == []


def test_singular_hessian_says_what_to_raise(tmp_path, tiny_model_dir, corpus_dir):
    result = here(
        "prune",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        f"text:{corpus_dir}",
        "--method",
        "sparsegpt",
        "--percdamp",
        "0",
        "--nsamples",
        "1",
        "--seqlen",
        "8",
        "--device",
        "cpu",
        "--experiment",
        "singular",
        cwd=tmp_path,
        env=store_env(tmp_path),
    )
    assert_one_line(
        result,
        1,
        "SparseGPT cannot invert the Hessian of model.decoder.layers.0.",
        "singular",
        "raise --percdamp",
        "--nsamples",
    )
    assert runs_in(tmp_path) == ["FAILED"]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda root: (root / "cache-file").write_text("not a directory") and root / "cache-file", "cache-file"),
        (lambda root: read_only_dir(root / "cache-ro"), "Permission denied"),
    ],
)
def test_unusable_cache_directory_is_one_line(tmp_path, tiny_model_dir, make, fragment):
    cache = make(tmp_path)
    result = cli(
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        cwd=tmp_path,
        env=store_env(tmp_path, PIPELINE_CACHE_DIR=str(cache)),
        prefix=AS_A_USER,
    )
    assert_one_line(result, 1, f"the cache directory {cache}", "PIPELINE_CACHE_DIR", fragment)
    assert runs_in(tmp_path) == []


@pytest.mark.parametrize("command", ["train", "iterative"])
def test_float16_training_is_refused_up_front(tmp_path, command):
    result = here(command, "--dtype", "float16", cwd=tmp_path, env=store_env(tmp_path))
    assert_one_line(result, 2, "--dtype float16 cannot train", "--dtype auto")


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (
            ["prune", "--method", "magnitude", "--pattern", "1:100000"],
            2,
            ("--pattern 1:100000 needs groups of 100000",),
        ),
        (["prune", "--pattern", "2:4", "--sparsity", "0.9"], 2, ("--sparsity 0.9 and --pattern 2:4 disagree",)),
        (["compare", "--sparsities", ""], 2, ("--sparsities is empty",)),
        (["compare", "--methods", ""], 2, ("--methods is empty",)),
    ],
)
def test_silently_ignored_settings_are_errors(tmp_path, tiny_model_dir, args, code, fragments):
    result = here(*args, "--model", str(tiny_model_dir), "--device", "cpu", cwd=tmp_path, env=store_env(tmp_path))
    assert_one_line(result, code, *fragments)
    assert runs_in(tmp_path) == []


def test_two_commands_at_once_on_a_new_store_both_succeed(tmp_path, tiny_model_dir, corpus_dir):
    """No MLFLOW_TRACKING_URI: both create ./mlflow.db at the same moment."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        f"text:{corpus_dir}",
        "--seqlen",
        "64",
        "--device",
        "cpu",
        "--experiment",
        "together",
    ]
    processes = [
        subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert runs_in(tmp_path) == ["FINISHED", "FINISHED"]
