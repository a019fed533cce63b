"""The sync job: replays into MLflow what runs kept locally while the tracking store was unreachable. It
opens no run of its own: it completes the runs the journals belong to."""

from __future__ import annotations

from ..config import SyncConfig
from ..tracking.journal import sync_journals


def run_sync(config: SyncConfig) -> int:
    return sync_journals(config.paths, config.tracking_uri)
