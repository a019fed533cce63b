"""Bad input: one clear line, the right exit code, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipeline.cli import exit_code_for, user_message
from pipeline.config import IterativeConfig, ScheduleConfig
from pipeline.errors import ConfigError, UserError
from pipeline.settings import build


@pytest.mark.parametrize("kwargs, message", [
    ({"target_sparsity": 1.0}, "outside (0, 1)"), ({"target_sparsity": -0.5}, "outside (0, 1)"),
    ({"prune_percentage": 0.0}, "prune-percentage"), ({"prune_percentage": 1.5}, "prune-percentage"),
    ({"epochs_per_iteration": 0}, "epochs-per-iteration"), ({"batch_size": -1}, "batch-size"),
    ({"max_iterations": 0}, "max-iterations"), ({"max_steps": 0}, "max-steps"), ({"lr": 0}, "--lr must be positive"),
    ({"schedule": "linear"}, "unknown schedule"), ({"prune_method": "random"}, "unknown pruning method"),
    ({"prune_method": "wanda", "scope": "global"}, "global"),
])
def test_iterative_config_rejects(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        build(IterativeConfig, kwargs)
    assert message in user_message(caught.value)  # as the CLI shows it
    assert exit_code_for(caught.value) == 2


def test_unreachable_target_is_announced_at_the_start():
    from pipeline.jobs.iterative import planned_schedule

    schedule, uncapped = planned_schedule(ScheduleConfig(target_sparsity=0.9, prune_percentage=0.1,
                                                         max_iterations=5))
    assert uncapped == 22 and len(schedule) == 5
    assert schedule[-1] == pytest.approx(1 - 0.9 ** 5)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    from pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint

    (tmp_path / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="damaged or truncated"):
        load_checkpoint(tmp_path)


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


@pytest.mark.parametrize("args, message", [
    (["iterative", "--target-sparsity", "1.2"], "outside (0, 1)"),
    (["iterative", "--epochs-per-iteration", "0"], "epochs-per-iteration"),
    (["prune", "--pattern", "2:x"], "N:M"),
    (["train", "--batch-size", "0"], "--batch-size must be positive"),
    (["compare", "--sparsities", "0.5,abc"], "comma-separated"),
    (["report", "--experiment", "nope"], "no MLflow experiment named 'nope'"),
    (["sync", "nowhere"], "nowhere does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stdout + result.stderr


def test_resume_of_a_corrupt_checkpoint_exits_1(tmp_path):
    from pipeline.checkpoint import CHECKPOINT_NAME

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"\x00" * 100)
    result = cli("iterative", "--output-dir", "run", "--resume", cwd=tmp_path)
    assert result.returncode == 1 and "damaged or truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["iterative", "train"])
def test_fsdp1_launch_is_refused_before_any_work(tmp_path, command):
    import os

    # what `accelerate launch --use_fsdp --fsdp_version 1` puts in every process's environment
    env = dict(os.environ, ACCELERATE_USE_FSDP="true", FSDP_VERSION="1")
    result = cli(command, "--output-dir", "out", cwd=tmp_path, env=env)
    assert result.returncode == 2 and "--fsdp_version 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
