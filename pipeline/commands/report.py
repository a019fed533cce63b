"""`report`: the report of a past comparison."""

from __future__ import annotations

from ..config import ReportConfig


def report(config: ReportConfig) -> None:
    """Markdown + self-contained HTML report of an experiment's comparison runs, from MLflow alone."""
    from ..reporting import run_report  # deferred: see commands/__init__.py

    run_report(config)
