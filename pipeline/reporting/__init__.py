"""The comparison report, from MLflow alone: results (the runs of a grid, summarized over seeds), findings
(sentences computed from them), plots, and render (Markdown + self-contained HTML). The report job
(jobs/report.py) publishes it as a run."""

from .findings import findings
from .render import markdown_table, write_report
from .results import collect_runs, summarize

__all__ = ["collect_runs", "summarize", "findings", "markdown_table", "write_report"]
