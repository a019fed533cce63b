"""`python -m pipeline <command>`: the Click group, each command's flags generated from its config.

The command table names each command's config and its job (pipeline/jobs/), imported only when the
command runs: importing torch, transformers and mlflow takes 5-7 s on 2 cores, and `--help` or a bad
flag value should answer at once. A flag is a setting's key with dashes (`prune_method` ->
`--prune-method`); its default, help and checks are the setting's (pipeline/config.py), and an older
spelling of a renamed flag still works. Only flags given on the command line reach the config, so a
preset (`compare --preset demo`) can change the rest. Every error a user can fix ends here as one line
and an exit code: 2 for a wrong value (ConfigError, a usage error), 1 for anything else the user can fix
(UserError, MLflow refusing a request), 130 for Ctrl-C and 143 for SIGTERM.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import typing
from dataclasses import dataclass

import click
from click.core import ParameterSource

from .allocator import reuse_freed_memory
from .config import (
    BenchConfig,
    CompareConfig,
    EvaluateConfig,
    IterativeConfig,
    MemoryConfig,
    ModelsConfig,
    PretrainConfig,
    PruneRunConfig,
    ReportConfig,
    SyncConfig,
    TrainRunConfig,
)
from .errors import ConfigError, Terminated, UserError, spell
from .settings import Leaf, Tokens, build, flatten


@dataclass(frozen=True)
class Command:
    name: str
    config: type
    job: str  # "module:function" under pipeline.jobs, imported when the command runs
    help: str


COMMANDS = (
    Command(
        "evaluate",
        EvaluateConfig,
        "evaluate:run_evaluate",
        "Perplexity of a model on a dataset (windows as the SparseGPT reference cuts them), logged to MLflow.",
    ),
    Command(
        "prune",
        PruneRunConfig,
        "prune:run_prune",
        "One-shot pruning (magnitude, SparseGPT, Wanda, random): dense and pruned perplexity, saved model.",
    ),
    Command(
        "train",
        TrainRunConfig,
        "train:run_train",
        "Fine-tune a (pruned) model on a dataset; pruned weights stay exactly zero.",
    ),
    Command(
        "iterative",
        IterativeConfig,
        "iterative:run_iterative",
        "Iterative magnitude pruning with recovery training, checkpointed after every iteration (the main job).",
    ),
    Command(
        "compare",
        CompareConfig,
        "compare:run_compare",
        "The comparison grid: dense, one-shot SparseGPT/magnitude/Wanda, iterative and their equal-budget "
        "controls at each sparsity, then the report; finished cells are reused.",
    ),
    Command(
        "report",
        ReportConfig,
        "report:run_report",
        "Markdown + self-contained HTML report of an experiment's comparison runs, from MLflow alone.",
    ),
    Command(
        "pretrain",
        PretrainConfig,
        "pretrain:run_pretrain",
        "Train an embedded model (opt-tiny, llama-tiny) from scratch on the pydocs corpus.",
    ),
    Command(
        "bench",
        BenchConfig,
        "bench:run_bench",
        "Speed and memory of the hot paths, side by side with their baselines, against targets.",
    ),
    Command(
        "memory",
        MemoryConfig,
        "memory:run_memory",
        "Peak memory per model size (training, SparseGPT, a teacher) from the formula, checked by measurement on CPU.",
    ),
    Command(
        "models",
        ModelsConfig,
        "models:run_models",
        "An experiment's logged models (each final model, or each IMP iteration's), best validation perplexity "
        "first, with their masks' fingerprints and where their weights are.",
    ),
    Command(
        "sync",
        SyncConfig,
        "sync:run_sync",
        "Replay tracking calls a run kept locally while the MLflow server was unreachable.",
    ),
)
NONE_WORDS = ("none", "None", "null")  # how an MLproject parameter says "not set"


def _refuse_empty(kind: click.ParamType, value: str, param, ctx) -> None:
    """An empty value is a mistake (a variable that expanded to nothing), not a way to say "the default"."""
    if not value.strip():
        kind.fail(f"'{value}' is empty: give a value, or leave the flag out for its default", param, ctx)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


class Number(click.ParamType):
    """An int or float flag: `40.0` is a whole number too (MLflow passes float parameters that way), and an
    empty value or `none` leaves an optional setting unset."""

    def __init__(self, base: type, optional: bool):
        self.base, self.optional = base, optional
        self.name = {int: "integer", float: "float", Tokens: "tokens"}[base]

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        _refuse_empty(self, value, param, ctx)
        if self.optional and value.strip() in NONE_WORDS:
            return None
        if self.base is Tokens:
            try:
                return int(Tokens(value))
            except ValueError as error:
                self.fail(str(error), param, ctx)
        if self.base is int and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)  # exactly: a seed like 2^64 - 1 must not be rounded through a float
        try:
            number = float(value)
        except ValueError:
            self.fail(f"'{value}' is not a number", param, ctx)
        if self.base is int:
            if not number.is_integer():
                self.fail(f"'{value}' is not a whole number", param, ctx)
            return int(number)
        return number


class OptionalText(click.ParamType):
    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            _refuse_empty(self, value, param, ctx)
        return None if isinstance(value, str) and value.strip() in NONE_WORDS else value


class CommaList(click.ParamType):
    name = "list"

    def __init__(self, item: type):
        self.item = item

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return list(value)
        if value.strip() and not value.replace(",", "").strip():
            self.fail(
                f"'{value}' holds no values: give them comma-separated, e.g. {param.default or 'a,b'}", param, ctx
            )
        try:
            return [self.item(part.strip()) for part in value.split(",") if part.strip()]
        except ValueError as error:
            if self.item is Tokens:
                self.fail(f"{error}, in '{value}'", param, ctx)
            kind = "numbers" if self.item in (int, float) else "values"
            self.fail(f"'{value}' is not a comma-separated list of {kind}, e.g. {param.default or 'a,b'}", param, ctx)


def _parameter(leaf: Leaf) -> click.Parameter:
    check, default = leaf.check, leaf.default
    if check.argument:
        return click.Argument([leaf.key], nargs=-1, type=leaf.item)
    help = check.help_text + (f" [{'|'.join(map(str, check.choices))}]" if check.choices else "")
    if leaf.aliases:
        help += f" (older spelling: {', '.join(flag(alias) for alias in leaf.aliases)})"
    names = [flag(leaf.key), *(flag(alias) for alias in leaf.aliases), leaf.key]  # the last: the parameter's name
    if leaf.base is bool:
        if check.negatable:
            names[0] = f"{flag(leaf.key)}/--no-{leaf.key.replace('_', '-')}"
        return click.Option(names, is_flag=True, default=default, show_default=check.negatable, help=help)
    if leaf.base is list:
        return click.Option(
            names, type=CommaList(leaf.item), default=",".join(map(str, default)), show_default=True, help=help
        )
    if leaf.base in (int, float, Tokens):
        kind = Number(leaf.base, leaf.optional)
    else:
        kind = OptionalText() if leaf.optional else click.STRING
    return click.Option(names, type=kind, default=default, show_default=default is not None, help=help)


def spelling_for(config_class) -> typing.Callable[[str], str]:
    """How this command names a setting: by its key, or by the field name a library message used."""
    names = {}
    for leaf in flatten(config_class):
        names.setdefault(leaf.name, flag(leaf.key))
    for leaf in flatten(config_class):
        names[leaf.key] = flag(leaf.key)
    return lambda name: names.get(name, flag(name))


def make_command(command: Command) -> click.Command:
    """A click command whose flags are the settings of the command's config; its job runs with the config."""
    leaves = [leaf for leaf in flatten(command.config) if leaf.check.cli]

    def callback(**given):
        context = click.get_current_context()
        values = {
            key: value
            for key, value in given.items()
            if context.get_parameter_source(key) is not ParameterSource.DEFAULT
        }
        module, function = command.job.split(":")
        try:
            config = build(command.config, values)
            job = getattr(importlib.import_module(f"pipeline.jobs.{module}"), function)  # after the checks: heavy
            job(config)
        except (UserError, KeyboardInterrupt) as error:
            error.spelling = spelling_for(command.config)
            raise

    return click.Command(
        command.name, callback=callback, params=[_parameter(leaf) for leaf in leaves], help=command.help
    )


cli = click.Group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help="Iterative magnitude pruning vs one-shot pruning (SparseGPT, magnitude, Wanda) of causal LMs.",
)
for _command in COMMANDS:
    cli.add_command(make_command(_command))


@click.command("cell", hidden=True)
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
def cell(spec: str) -> None:
    """One cell of a compare grid, from the spec compare wrote (what --parallel and --executor submitit run);
    exit 75 when another process holds the cell."""
    from .jobs.cell import run_spec_file  # deferred, as every job

    run_spec_file(spec)


cli.add_command(cell)
cli = click.version_option(package_name="llm-pruning-pipeline", message="%(version)s")(cli)


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, Terminated):
        return 143
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, (ConfigError, click.UsageError)):
        return 2
    return getattr(error, "exit_code", 1)


def user_message(error: UserError) -> str:
    return spell(error.template, getattr(error, "spelling", flag))


def _stop(interrupt: KeyboardInterrupt) -> None:
    if getattr(interrupt, "hint", None):
        click.echo("\n" + spell(interrupt.hint, getattr(interrupt, "spelling", flag)), err=True)
    click.echo("Terminated." if isinstance(interrupt, Terminated) else "Interrupted.", err=True)
    sys.exit(exit_code_for(interrupt))


def main() -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under a launcher only the main process prints
        sys.stdout = open(os.devnull, "w")
    reuse_freed_memory()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as abort:  # Click turns KeyboardInterrupt (and our SIGTERM) into Abort
        _stop(abort.__cause__ if isinstance(abort.__cause__, KeyboardInterrupt) else KeyboardInterrupt())
    except KeyboardInterrupt as interrupt:
        _stop(interrupt)
    except click.UsageError as error:
        where = f" (see `python -m pipeline {error.ctx.info_name} --help`)" if error.ctx else ""
        click.echo(f"error: {error.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UserError as error:
        click.echo(f"error: {user_message(error)}", err=True)
        sys.exit(exit_code_for(error))
    except Exception as error:
        from mlflow.exceptions import MlflowException  # deferred: mlflow is loaded by now if it was used

        if not isinstance(error, MlflowException):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        click.echo(
            f"error: MLflow refused a request ({first[:300]}); completed iterations are in the "
            "output directory's checkpoint",
            err=True,
        )
        sys.exit(1)
