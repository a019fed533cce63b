"""The LoggedModels of an experiment as a table, ranked: what `python -m pipeline models` prints and what the
report links its cells to. A thin layer over `mlflow.search_logged_models`."""

from __future__ import annotations

import math

import pandas as pd
from mlflow.tracking import MlflowClient

# a model's numbers under the names its run logged them: the final model's, an iteration's, a one-shot pruning's
VALIDATION = ("final_val_perplexity",)
TEST = ("final_perplexity", "ppl_after_train", "perplexity")
SPARSITY = ("final_sparsity", "sparsity")
COLUMNS = ["name", "method", "target_sparsity", "iteration", "seed", "lr", "sparsity", "val_perplexity"]
COLUMNS += ["perplexity", "mask_sha256", "nonzeros", "weights", "model_id", "run_id"]


def _first(metrics: dict, names: tuple) -> float:
    return next((metrics[name] for name in names if name in metrics), math.nan)


def logged_models(experiment_id: str, sparsity: float | None = None, method: str | None = None) -> pd.DataFrame:
    """The experiment's READY LoggedModels (of a target sparsity and a method, if given), best first: by
    validation perplexity where they have one, then by test perplexity."""
    conditions = []
    if sparsity is not None:
        conditions.append(f"params.target_sparsity = '{sparsity:.4f}'")
    if method is not None:
        conditions.append(f"params.method = '{method}'")
    found, token = [], None
    while True:  # the store answers a page at a time (100 models by default): every page
        page = MlflowClient().search_logged_models(
            [experiment_id], filter_string=" AND ".join(conditions) or None, page_token=token
        )
        found += page
        token = page.token
        if not token:
            break
    rows = []
    for model in (m for m in found if str(m.status) == "READY"):  # the store's filter takes no status
        metrics = {metric.key: metric.value for metric in model.metrics or []}
        rows.append(
            {
                "name": model.name,
                **{key: model.params.get(key, "") for key in ("method", "target_sparsity", "iteration", "seed", "lr")},
                "sparsity": _first(metrics, SPARSITY),
                "val_perplexity": _first(metrics, VALIDATION),
                "perplexity": _first(metrics, TEST),
                **{key: model.tags.get(key, "") for key in ("mask_sha256", "nonzeros", "weights")},
                "model_id": model.model_id,
                "run_id": model.source_run_id,
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["val_perplexity", "perplexity"], na_position="last", kind="stable").reset_index(drop=True)
