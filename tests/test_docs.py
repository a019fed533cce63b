"""The README and docs/ hold together: every relative link resolves (its file, and its #anchor to a heading of
that file), every command line they show parses (the named command accepts its flags and their values' types),
every `mlflow run` names an entry point and its parameters, and the README stays a five-minute read."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    text = FENCE.sub("", path.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(path: Path) -> list:
    text = FENCE.sub("", path.read_text())
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_resolves(document):
    for target in relative_links(document):
        file, _, anchor = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        assert linked.exists(), f"{document.name}: {target} names no file"
        if anchor:
            assert anchor in anchors(linked), f"{document.name}: {target} names no heading of {linked.name}"


def shell_commands(text: str) -> list:
    """The command lines of the text's shell blocks, continuation lines joined, comments and prompts dropped,
    each `&&`, `;`, `&` or `|` part on its own."""
    lines = []
    for language, body in FENCE.findall(text):
        if language not in ("bash", "sh"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            lines += [part.strip() for part in re.split(r"&&|;|\||&", line) if part.strip()]
    return lines


def pipeline_invocations(document: Path) -> list:
    """(command, arguments) of every `python -m pipeline` (or `accelerate launch ... -m pipeline`) line; a bare
    `...` stands for the other flags and is left out."""
    found = []
    for line in shell_commands(document.read_text()):
        words = shlex.split(line)
        if "pipeline" not in words or words.index("pipeline") == 0 or words[words.index("pipeline") - 1] != "-m":
            continue
        rest = [w for w in words[words.index("pipeline") + 1 :] if w != "..."]
        if rest:
            found.append((rest[0], rest[1:]))
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_command_line_shown_parses(document):
    for name, arguments in pipeline_invocations(document):
        assert name in cli.commands, f"{document.name}: `python -m pipeline {name}` is no command"
        command = cli.commands[name]
        try:
            command.make_context(name, list(arguments), resilient_parsing=False)
        except Exception as error:  # click's usage errors: an unknown flag, a value of the wrong type
            pytest.fail(f"{document.name}: `python -m pipeline {name} {' '.join(arguments)}`: {error}")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_mlflow_run_names_an_entry_point_and_its_parameters(document):
    entry_points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for line in shell_commands(document.read_text()) + re.findall(r"`(mlflow run [^`]*)`", document.read_text()):
        words = shlex.split(line)
        if words[:2] != ["mlflow", "run"]:
            continue
        entry = words[words.index("-e") + 1] if "-e" in words else "main"
        if entry.startswith("<"):  # the form itself: `mlflow run . -e <command> ...`
            continue
        assert entry in entry_points, f"{document.name}: no entry point {entry}"
        for position, word in enumerate(words):
            if word == "-P":
                parameter = words[position + 1].split("=")[0]
                assert parameter in entry_points[entry].get("parameters", {}), (
                    f"{document.name}: {entry} -P {parameter}"
                )


def test_the_shown_commands_were_found():
    """The parsers above see the commands (a change of fence or prefix would make them check nothing)."""
    found = {name for document in DOCUMENTS for name, _ in pipeline_invocations(document)}
    assert set(cli.commands) - {"cell"} <= found


def test_the_readme_is_a_short_read_and_every_doc_says_what_it_covers():
    assert len((REPO / "README.md").read_text().splitlines()) <= 350
    for document in DOCUMENTS[1:]:
        lines = document.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and len(lines[2]) > 80, document.name
        assert document.name in (REPO / "README.md").read_text(), f"the README does not point to {document.name}"
