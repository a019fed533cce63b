"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, run on the model in memory (its HFLM
wrapper takes a loaded transformers model), each metric logged as task/<task>/<metric>.

Tasks are the harness's own (piqa, arc_easy, ...: it downloads their datasets from the hub) or any
directory of task YAMLs; this package ships one that runs offline, pydocs-cloze (pipeline/tasks).
"""

from __future__ import annotations

import json
import subprocess
from functools import lru_cache
from pathlib import Path

import yaml
from torch import nn

from .config import TasksConfig, default_window
from .errors import ConfigError, UserError, option
from .hub import offline_when_unreachable, quieted

TASKS_DIR = Path(__file__).parent / "tasks"  # pydocs-cloze
INSTALL = "pip install 'lm-eval[hf]==0.4.13' (it comes with `pip install -e .`)"


def _harness():
    try:
        import lm_eval  # deferred: a zero-shot-free run should not need, nor wait for, the harness
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            f"zero-shot tasks need EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    return lm_eval, TaskManager


class _TaggedLoader(yaml.SafeLoader):
    """Reads task YAMLs, whose `!function` tags name Python code we do not run here."""


_TaggedLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def tasks_in(directory: Path) -> list:
    """The task names a directory of lm-eval YAMLs defines."""
    names = []
    for path in sorted(directory.rglob("*.yaml")):
        try:
            spec = yaml.load(path.read_text(), Loader=_TaggedLoader) or {}
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(
                f"{option('tasks')}: {path} is not valid YAML{line} ({problem}); fix or remove it"
            ) from None
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            names.append(spec["task"])
    return names


def resolve_tasks(entries: list) -> tuple[list, list]:
    """(task names, include paths): an entry that is a directory brings its tasks and its path."""
    names, paths = [], [str(TASKS_DIR)]
    for entry in entries:
        if Path(entry).is_dir():
            found = tasks_in(Path(entry))
            if not found:
                raise ConfigError(f"{option('tasks')}: {entry} holds no lm-eval task YAML")
            names += found
            paths.append(str(Path(entry).resolve()))
        else:
            names.append(entry)
    return names, paths


@lru_cache(maxsize=4)
def _manager(paths: tuple):
    _, TaskManager = _harness()
    return TaskManager(include_path=list(paths))  # indexes every task the harness knows: seconds, so once


def check_tasks(config: TasksConfig) -> None:
    """Before a run opens: the harness is there, every task is known, and its data loads (the hub's tasks
    download theirs: offline, that is one line here)."""
    if not config.tasks:
        return
    _, _ = _harness()
    names, paths = resolve_tasks(config.tasks)
    manager = _manager(tuple(paths))
    unknown = sorted(set(names) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(
            f"unknown {option('tasks')} {', '.join(unknown)}: `lm_eval ls tasks` lists the harness's, and "
            "pydocs-cloze runs offline"
        )
    with quieted("lm_eval"), offline_when_unreachable() as unreachable:
        try:
            manager.load(names)  # builds each task, which downloads (or finds cached) its data
        except Exception as error:  # datasets raises ConnectionError, OSError, DatasetNotFoundError, ...
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            where = f"the hub could not be reached ({unreachable})" if unreachable else detail
            raise UserError(
                f"the data of {option('tasks')} {', '.join(names)} could not be loaded: {where}; "
                "pydocs-cloze runs offline, the harness's own tasks need their datasets in the HF cache"
            ) from None


def quiet_git_commit() -> str | None:
    """The working directory's commit, or None outside a repository (git's complaint kept out of the output)."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_tasks(model: nn.Module, tokenizer, config: TasksConfig, max_length: int | None = None) -> dict:
    """The harness's results dict (JSON-able) for `config.tasks` on the model as it is now."""
    lm_eval, _ = _harness()
    from lm_eval.models.huggingface import HFLM  # deferred with the harness

    names, paths = resolve_tasks(config.tasks)
    was_training = model.training
    # The harness records the working directory's git commit, asking git with its stderr inherited: outside a
    # repository that prints "fatal: not a git repository" into our output. Ask quietly instead.
    from lm_eval import evaluator

    evaluator.get_git_commit_hash = quiet_git_commit
    with quieted("lm_eval"), offline_when_unreachable():
        wrapper = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=config.tasks_batch_size,
            max_length=max_length or default_window(None, model),
        )
        results = lm_eval.simple_evaluate(
            model=wrapper,
            tasks=names,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            task_manager=_manager(tuple(paths)),
            log_samples=False,
            verbosity="ERROR",
        )
    model.train(was_training)
    return {key: results[key] for key in ("results", "n-shot", "n-samples", "config", "versions") if key in results}


def task_metrics(results: dict) -> dict:
    """task/<task>/<metric> -> value, for every metric the harness reported (`acc,none` -> `acc`); its
    bookkeeping numbers without a filter (`sample_len`) stay in the JSON artifact."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                metric, _, filter_name = key.partition(",")
                name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
                metrics[f"task/{task}/{name}"] = float(value)
    return metrics


def log_tasks(
    tracker,
    model: nn.Module,
    tokenizer,
    config: TasksConfig,
    step: int = 0,
    artifact: str = "lm_eval_results.json",
    logged_model: str | None = None,
) -> dict:
    """Runs the tasks, logs their metrics at `step` (linked to the run's LoggedModel `logged_model`, if given)
    and the harness's results as a JSON artifact."""
    results = run_tasks(model, tokenizer, config)
    metrics = task_metrics(results)
    tracker.log_dict(metrics, step=step, model=logged_model)
    tracker.log_text(json.dumps(results, indent=2, default=str), artifact)
    for task in results["results"]:
        shown = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith(f"task/{task}/") and "stderr" not in k}
        print(f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in sorted(shown.items())))
    return metrics
