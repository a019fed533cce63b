"""Where the pipeline keeps what it can recompute (token streams, dense perplexities, the pydocs documents):
PIPELINE_CACHE_DIR, else ~/.cache/pipeline. Each entry is written whole (a temporary file renamed into place), so a
kill leaves the old entry or none, and an entry that cannot be read is recomputed, never trusted."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from .errors import UserError
from .outputs import write_error


def cache_dir() -> Path:
    path = Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "pipeline")
    return _usable_cache_dir(path)


@cache
def _usable_cache_dir(path: Path) -> Path:
    error = write_error(path)
    if error:
        raise UserError(
            f"the cache directory {path} (PIPELINE_CACHE_DIR, default ~/.cache/pipeline) cannot be "
            f"written ({error.strerror or error}): point PIPELINE_CACHE_DIR at a writable directory"
        )
    return path


def replace_atomically(path: Path, write) -> None:
    """`write(temporary_path)` writes the entry, which then replaces `path` in one rename; a write that fails (a
    full disk) leaves no temporary file behind."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
