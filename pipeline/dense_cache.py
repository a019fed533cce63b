"""Dense perplexity, remembered per (model, dataset, split, seqlen, dtype) and tracking store experiment, so a
pruning grid computes it once; another store's experiment computes its own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .caching import cache_dir, replace_atomically
from .distributed import from_main, is_main_process
from .models import resolve_model_source
from .workload import Workload


def model_identity(source: str) -> str:
    """A hub id names fixed weights; a local directory's weights can change, so their mtimes count."""
    path = Path(source)
    if not path.is_dir():
        return source
    stamps = sorted(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in path.iterdir()
        if f.suffix in (".safetensors", ".bin", ".json")
    )
    return f"{path.resolve()}|{'|'.join(stamps)}"


def dense_key(source: str, corpus_digest: str, split: str, seqlen: int, dtype: str, scope: str = "") -> str:
    """`scope`: the store's experiment the value is cached for (tracking.store.experiment_identity)."""
    raw = "\0".join([model_identity(source), corpus_digest, split, str(seqlen), dtype, scope])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _path() -> Path:
    return cache_dir() / "dense_perplexity.json"


def cached_dense_perplexity(key: str) -> float | None:
    try:
        return json.loads(_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def remember_dense_perplexity(key: str, value: float) -> None:
    try:
        table = json.loads(_path().read_text())
    except (OSError, ValueError):
        table = {}
    table[key] = value
    replace_atomically(_path(), lambda tmp: tmp.write_text(json.dumps(table, indent=1)))


def dense_perplexity(work: Workload, split: str, scope: str = "") -> tuple[float, bool]:
    """(the unpruned model's perplexity, whether it came from the cache of `scope`): call before pruning."""
    model = resolve_model_source(work.model_config.model)
    key = dense_key(model, work.corpus.digest, split, work.seqlen, work.model_config.dtype, scope)
    cached = from_main(cached_dense_perplexity(key) if is_main_process() else None)  # every process evaluates, or none
    if cached is not None:
        return cached, True
    value = work.evaluate(split).perplexity
    if is_main_process():
        remember_dense_perplexity(key, value)
    return value, False
