"""The project's shape (issue 13): two layers, no import cycle, MLproject's parameters equal to the flags."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.cli import cli
from pipeline.config import CompareConfig

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """The pipeline modules a module imports, wherever the import statement is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")} - {name}


MODULES = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_no_command_imports_another_and_the_library_imports_no_command():
    for module, imported in MODULES.items():
        commands = {m for m in imported if m.startswith("pipeline.commands.")}
        if module.startswith("pipeline.commands"):
            assert not commands, f"{module} imports the commands {commands}"
        elif module not in ("pipeline.cli", "pipeline.__main__"):
            assert not commands and "pipeline.cli" not in imported, f"library module {module} imports {imported}"


def test_no_import_cycle():
    def visit(module, stack):
        if module in stack:
            raise AssertionError(" -> ".join(stack[stack.index(module):] + [module]))
        for target in MODULES.get(module, ()):
            if target.startswith("pipeline.") and target != "pipeline":
                visit(target, stack + [module])

    for module in MODULES:
        visit(module, [])


def test_commands_and_config_import_nothing_heavy_at_the_top():
    """`--help` and a bad flag answer at once: the CLI's own modules load no torch, transformers or mlflow."""
    for path in [PACKAGE / "cli.py", PACKAGE / "config.py", PACKAGE / "settings.py", PACKAGE / "errors.py",
                 *(PACKAGE / "commands").glob("*.py")]:
        top = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {alias.name for node in top for alias in node.names} | {getattr(n, "module", "") or "" for n in top}
        assert not names & {"torch", "transformers", "mlflow", "accelerate", "datasets"}, path


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
