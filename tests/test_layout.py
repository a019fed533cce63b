"""The project's shape: a library under jobs under the CLI, no import cycle, every job in jobs/, method names
known only to the method registry, and MLproject's parameters equal to the flags."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import COMMANDS, cli
from pipeline.config import CompareConfig

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set:
    """The import nodes under `if TYPE_CHECKING:`: annotations only, never run."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }


def _existing_module(candidate: str) -> bool:
    base = PACKAGE.parent / candidate.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(name: str, source: str, is_package: bool = False) -> set:
    """The pipeline modules module `name` imports when it runs, wherever the statement is: `import` and `from`
    statements (not those under `if TYPE_CHECKING`), and "pipeline.module:function" strings, which the registry
    imports when first used. Importing a submodule runs its package too, unless the importer is inside it."""
    package = name if is_package else name.rsplit(".", 1)[0]
    tree = ast.parse(source)
    annotations_only = _type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _existing_module(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"(pipeline(?:\.\w+)+):\w+", node.value)
            if match:
                found.add(match[1])
    parents = {m.rsplit(".", i)[0] for m in found for i in range(1, m.count("."))}
    found |= {p for p in parents if not (name + ".").startswith(p + ".")}
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")} - {name}


def find_cycle(modules: dict) -> list | None:
    """One import cycle of the graph (module -> the modules it imports), or None."""
    done = set()

    def visit(module, stack):
        if module in stack:
            return stack[stack.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(modules.get(module, ())):
            if target != "pipeline":
                cycle = visit(target, stack + [module])
                if cycle:
                    return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(modules) if (cycle := visit(module, []))), None)


MODULES = {
    module_name(p): imports_of(module_name(p), p.read_text(), p.name == "__init__.py") for p in PACKAGE.rglob("*.py")
}


def test_the_library_and_the_jobs_import_no_cli():
    for module, imported in MODULES.items():
        if module not in ("pipeline.cli", "pipeline.__main__"):
            assert "pipeline.cli" not in imported, f"{module} imports the CLI"
        if not module.startswith("pipeline.jobs") and module not in ("pipeline.cli", "pipeline.api"):
            assert not {m for m in imported if m.startswith("pipeline.jobs")}, f"library module {module} imports a job"


def test_every_command_runs_a_job_from_jobs_and_only_jobs_open_a_run():
    from pipeline.cli import COMMANDS

    for command in COMMANDS:
        module, function = command.job.split(":")
        assert (PACKAGE / "jobs" / f"{module}.py").exists(), command.name
        assert f"def {function}(" in (PACKAGE / "jobs" / f"{module}.py").read_text(), command.name
    opening = {"job_run", "owned_output_dir", "sigterm_as_interrupt"}
    for path in PACKAGE.rglob("*.py"):
        calls = {
            node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
        }
        if calls & opening:
            assert path.parent.name == "jobs", f"{path} opens a job outside jobs/"


def _string_constants(node) -> list:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for element in node.elts for v in _string_constants(element)]
    return []


def test_no_module_but_the_registry_compares_a_method_name_with_a_literal():
    """`method == "dense+ft"`, `m in ("sparsegpt", "wanda")` or `name.removesuffix("+ft")` outside the registry
    would be a second place to edit when a method is added."""
    from pipeline.methods import METHODS

    names = set(METHODS)
    for path in PACKAGE.rglob("*.py"):
        if path.name == "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                literals = [v for side in [node.left, *node.comparators] for v in _string_constants(side)]
                assert not names & set(literals), f"{path}:{node.lineno} compares with {names & set(literals)}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in (
                "startswith",
                "endswith",
                "removesuffix",
                "removeprefix",
                "partition",
                "split",
            ):
                literals = [v for arg in node.args for v in _string_constants(arg)]
                assert not any(v in names or "+ft" in v for v in literals), f"{path}:{node.lineno} parses a method"


def test_no_import_cycle():
    assert find_cycle(MODULES) is None, " -> ".join(find_cycle(MODULES))


def test_the_cycle_check_sees_a_loop_through_a_registered_string():
    """A module low in the drawing that names a higher one's function as "module:function" closes a loop the
    check must see, as it sees a plain import (and one under TYPE_CHECKING, which never runs, it must not)."""
    planted = dict(MODULES)
    planted["pipeline.errors"] = imports_of("pipeline.errors", 'HOOK = "pipeline.grid:plan_cells"\n')
    cycle = find_cycle(planted)
    assert cycle and "pipeline.errors" in cycle and "pipeline.grid" in cycle
    annotation = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.grid import Cell\n"
    assert imports_of("pipeline.errors", annotation) == set()


def test_every_registered_function_resolves_with_the_pruning_signature():
    import inspect

    from pipeline.methods import CRITERIA
    from pipeline.pruning import PruningFunction

    expected = list(inspect.signature(PruningFunction.__call__).parameters)[1:]
    for entry in CRITERIA:
        function = entry.prune_function()
        assert callable(function), entry.pruner
        assert list(inspect.signature(function).parameters) == expected, entry.pruner


def test_the_settings_import_no_torch_and_nothing_above_them():
    code = "import sys, pipeline.config, pipeline.reporting.numbers; assert 'torch' not in sys.modules, 'torch'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    below = {
        "pipeline.config",
        "pipeline.settings",
        "pipeline.errors",
        "pipeline.methods",
        "pipeline.schedules",
        "pipeline",
    }
    reached, frontier = set(), {"pipeline.config"}
    while frontier:
        module = frontier.pop()
        reached.add(module)
        frontier |= {m for m in MODULES.get(module, ()) if m not in reached and not m.startswith("pipeline.pruning")}
    assert reached <= below, reached - below


def test_the_measuring_tools_sit_beside_the_pipeline():
    """bench, memory and pretrain are tools of their own (pipeline/tools): only their jobs and other tools
    import them, so nothing on the way from a job to the IMP loop depends on them."""
    for module, imported in MODULES.items():
        if not module.startswith(("pipeline.tools", "pipeline.jobs")):
            assert not {m for m in imported if m.startswith("pipeline.tools")}, module


def test_the_cli_and_its_settings_import_nothing_heavy_at_the_top():
    """`--help` and a bad flag answer at once: the CLI's own modules load no torch, transformers or mlflow."""
    for path in [
        PACKAGE / "cli.py",
        PACKAGE / "config.py",
        PACKAGE / "settings.py",
        PACKAGE / "errors.py",
        PACKAGE / "methods.py",
    ]:
        top = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {alias.name for node in top for alias in node.names} | {getattr(n, "module", "") or "" for n in top}
        assert not names & {"torch", "transformers", "mlflow", "accelerate", "datasets"}, path


def test_every_unset_default_is_a_rule_declared_with_its_setting_or_means_none():
    """A setting whose default is None either has a rule (its help prints it) or None is what it means: no
    registered name, no regex, no limit, the task's own shots."""
    from pipeline.cli import COMMANDS
    from pipeline.settings import flatten

    means_none = {
        "shard",
        "slurm_partition",
        "executor_config",
        "register_model",
        "include",
        "exclude",
        "lora_targets",
        "num_fewshot",
        "limit",
        "preset",
        "teacher",
        "experiment",
        "tracking_uri",
        "eval_windows",
        "max_steps",
        "budget",  # no budget: --epochs of --max-steps each
    }
    filters = {"models": {"sparsity", "method"}}  # a filter left out means every model
    for command in COMMANDS:
        for leaf in flatten(command.config):
            if leaf.default is None and leaf.key not in means_none | filters.get(command.name, set()):
                assert leaf.check.rule is not None and leaf.check.rule.__doc__, f"{command.name} --{leaf.key}"
                assert leaf.check.rule.__doc__.strip() in leaf.check.help_text


def _cli_default(command, key: str, preset: dict):
    param = next(p for p in command.params if p.name == key)
    default = preset.get(key, param.default)
    if isinstance(default, list):
        return ",".join(map(str, default))
    return default


def test_every_mlproject_parameter_is_a_flag_with_the_same_default():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    for entry, spec in project["entry_points"].items():
        words = spec["command"].split()
        command_name = words[words.index("pipeline") + 1]
        command = cli.commands[command_name]
        preset = CompareConfig.PRESETS[words[words.index("--preset") + 1]] if "--preset" in words else {}
        for name, parameter in spec.get("parameters", {}).items():
            flag_word = f"{{{name}}}"
            assert flag_word in spec["command"], f"{entry}: parameter {name} is not used"
            position = words.index(flag_word)
            if words[position - 1].startswith("--"):
                key = words[position - 1][2:].replace("-", "_")
            else:  # sync's paths: none given means the current directory
                assert parameter["default"] == "." and command.name == "sync", f"{entry}.{name}"
                continue
            default = parameter["default"]
            expected = _cli_default(command, key, preset)
            if expected is None:
                assert str(default).lower() == "none", f"{entry}.{name}: {default} but the CLI's default is unset"
            elif isinstance(expected, (tuple, list)):
                assert str(default) in (".", ",".join(map(str, expected))), f"{entry}.{name}"
            elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
                assert float(default) == pytest.approx(float(expected)), f"{entry}.{name}: {default} vs {expected}"
            else:
                assert str(default) == str(expected), f"{entry}.{name}: {default} vs {expected}"


@pytest.mark.parametrize(
    "command, old, new, value, expected",
    [
        ("prune", "--method", "prune_method", "wanda", "wanda"),
        ("prune", "--seed", "prune_seed", "3", 3),
        ("evaluate", "--batch-size", "eval_batch_size", "4", 4),
        ("compare", "--recoveries", "distill", "ce,logits", ["none", "logits"]),
    ],
)
def test_a_renamed_flag_keeps_its_older_spelling(command, old, new, value, expected):
    from pipeline.settings import build, flat_values

    context = cli.commands[command].make_context(command, [old, value])
    config = build(next(c.config for c in COMMANDS if c.name == command), {new: context.params[new]})
    assert flat_values(config)[new] == expected


def test_help_prints_each_computed_default_from_its_rule():
    from pipeline.config import default_checkpoint_dir, default_window

    command = cli.commands["iterative"]
    text = command.get_help(command.make_context("iterative", [], terminal_width=1000, max_content_width=1000))
    for rule in (default_window, default_checkpoint_dir):
        assert " ".join(rule.__doc__.split()) in " ".join(text.split())


def test_every_function_fits_one_screen():
    """None in pipeline/ over 60 lines: a reader holds each one whole."""
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long
