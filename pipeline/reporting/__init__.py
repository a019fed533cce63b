"""The comparison report, from MLflow alone: results (the runs of a grid, summarized over seeds), findings
(sentences computed from them), paired (per-seed differences), numbers (how they are compared and written),
plots, and render (Markdown + self-contained HTML). The report job (jobs/report.py) publishes it as a run.
Each module is imported by name, so the torch-free ones (numbers, paired, findings) load without the rest."""
