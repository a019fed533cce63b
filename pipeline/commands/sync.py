"""`sync`: replays what a tracking outage kept locally."""

from __future__ import annotations

from ..config import SyncConfig


def sync(config: SyncConfig) -> None:
    """Replay tracking calls a run kept locally while the MLflow server was unreachable."""
    from ..tracking.journal import sync_journals  # deferred: see commands/__init__.py

    sync_journals(config.paths, config.tracking_uri)
