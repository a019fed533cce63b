"""How results are compared and written as numbers and tables, shared by the jobs and the report (no torch)."""

from __future__ import annotations


def change_pct(perplexity: float, baseline: float) -> float:
    """How much higher `perplexity` is than `baseline`, in percent (negative: lower)."""
    return 100.0 * (perplexity - baseline) / baseline


def tokens_text(tokens: float) -> str:
    """A token count as a reader takes it in: 327.7 k, 1.15 M."""
    if tokens >= 1e9:
        return f"{tokens / 1e9:.2f} G"
    if tokens >= 1e6:
        return f"{tokens / 1e6:.2f} M"
    if tokens >= 1e3:
        return f"{tokens / 1e3:.1f} k"
    return f"{tokens:.0f}"


def markdown_table(frame) -> str:
    """A GitHub Markdown table of a DataFrame (pandas' to_markdown would add the tabulate dependency for this)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
