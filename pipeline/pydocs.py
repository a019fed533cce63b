"""The `pydocs` corpus: English text from the running Python's own standard-library documentation.

It exists so that the whole product runs offline: the texts of `pydoc_data.topics` (the language
reference sections `help()` shows) plus the docstrings of the stdlib's modules, classes and functions.
Docstrings are read with `ast` from the source files, never by importing them: importing the stdlib
wholesale has side effects (turtle opens windows, antigravity a browser) and depends on what is built.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from pydoc_data.topics import topics

# Directories that hold tests, third-party code or GUI demos rather than library documentation.
SKIPPED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "venv",
    "config",
}
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}


def _docstrings_of_source(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 4:  # one-word docstrings ("Return x.") teach little
            docs.append(doc.strip())
    return docs


def _stdlib_source_files(stdlib: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("config-"))
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


@lru_cache(maxsize=1)
def collect_documents() -> tuple[str, ...]:
    """All documents in a deterministic order, exact duplicates dropped. Read once per process: the corpus and
    the pydocs-cloze task both start from them, and a grid builds the task again for every cell."""
    documents = [topics[key].strip() for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_source_files(stdlib):
        documents += _docstrings_of_source(path.read_text(encoding="utf-8", errors="replace"))
    seen, unique = set(), []
    for doc in documents:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return tuple(unique)


def split_of(document: str) -> str:
    """Stable split assignment by a hash of the content: identical text can never straddle splits."""
    bucket = int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big") % 100
    edge = 0
    for name, percent in SPLIT_PERCENT.items():
        edge += percent
        if bucket < edge:
            return name
    raise AssertionError("split percentages must sum to 100")


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


@lru_cache(maxsize=1)
def build_pydocs_splits() -> dict:
    """Split name -> text, documents joined with a blank line."""
    grouped = {name: [] for name in SPLIT_PERCENT}
    for doc in collect_documents():
        grouped[split_of(doc)].append(doc)
    return {name: "\n\n".join(docs) for name, docs in grouped.items()}
