"""Everything MLflow: where runs go (store), what a run records and how (tracker), and what an outage
leaves to send later (journal)."""

from .tracker import MLflowTracker, NullTracker, tracked_run

__all__ = ["MLflowTracker", "NullTracker", "tracked_run"]
