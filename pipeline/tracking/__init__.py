"""Everything MLflow: where runs go (store), what a run records and how (logger), and what an outage
leaves to send later (journal)."""

from .logger import MLflowLogger, NullLogger, tracked_run

__all__ = ["MLflowLogger", "NullLogger", "tracked_run"]
