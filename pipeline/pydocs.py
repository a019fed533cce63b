"""The `pydocs` corpus: English text from the running Python's own standard-library documentation.

It exists so that the whole product runs offline: the texts of `pydoc_data.topics` (the language
reference sections `help()` shows) plus the docstrings of the stdlib's modules, classes and functions.
Docstrings are read with `ast` from the source files, never by importing them: importing the stdlib
wholesale has side effects (turtle opens windows, antigravity a browser) and depends on what is built.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from pydoc_data.topics import topics

from .caching import replace_atomically

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


# what is collected: raise it when SKIPPED_DIRS or the docstring filter changes, so cached documents are rebuilt
COLLECTION_VERSION = 1


def _documents_of(files: list[Path]) -> tuple[str, ...]:
    documents = [topics[key].strip() for key in sorted(topics)]
    for path in files:
        documents += _docstrings_of_source(path.read_text(encoding="utf-8", errors="replace"))
    seen, unique = set(), []
    for doc in documents:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return tuple(unique)


def _sources_fingerprint(stdlib: Path, files: list[Path]) -> str:
    """What the documents depend on: this Python, the collection rules, and every source file's size and mtime."""
    digest = hashlib.sha256(f"{COLLECTION_VERSION}|{sys.version}|{stdlib}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(stdlib).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _read_cached(path: Path) -> tuple[str, ...] | None:
    try:
        documents = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(documents, list) or not all(isinstance(doc, str) for doc in documents):
        return None
    return tuple(documents)


@lru_cache(maxsize=4)
def collect_documents(cache: Path | None = None, stdlib: Path | None = None) -> tuple[str, ...]:
    """All documents in a deterministic order, exact duplicates dropped. Read once per process (the corpus and the
    pydocs-cloze task both start from them); with `cache`, a directory, parsed once per Python installation:
    parsing some 600 source files takes about 3.5 CPU seconds, reading the cached entry a few hundredths, and a
    changed source file, another Python or other collection rules make another entry."""
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_source_files(stdlib)
    if cache is None:
        return _documents_of(files)
    path = cache / f"pydocs-{_sources_fingerprint(stdlib, files)}.json"
    documents = _read_cached(path)
    if documents is None:
        documents = _documents_of(files)
        replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(documents), encoding="utf-8"))
    return documents


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


@lru_cache(maxsize=2)
def build_pydocs_splits(cache: Path | None = None) -> dict:
    """Split name -> text, documents joined with a blank line (`cache`: as collect_documents)."""
    grouped = {name: [] for name in SPLIT_PERCENT}
    for doc in collect_documents(cache):
        grouped[split_of(doc)].append(doc)
    return {name: "\n\n".join(docs) for name, docs in grouped.items()}
