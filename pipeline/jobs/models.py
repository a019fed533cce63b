"""`python -m pipeline models`: an experiment's logged models, best first. It reads the store and opens no run."""

from __future__ import annotations

from ..config import ModelsConfig
from ..errors import UserError
from ..reporting.numbers import markdown_table
from ..tracking.models import logged_models
from ..tracking.store import experiment_id_named, use_tracking_store


def run_models(config: ModelsConfig):
    use_tracking_store()
    table = logged_models(experiment_id_named(config.experiment), config.sparsity, config.method)
    if table.empty:
        raise UserError(
            f"experiment '{config.experiment}' holds no logged model"
            + (" of that sparsity or method" if config.sparsity is not None or config.method else "")
            + ": runs log them unless --log-models none"
        )
    shown = table.assign(
        rank=range(1, len(table) + 1),
        mask=table["mask_sha256"].str[:12],
        **{c: table[c].map(lambda v: f"{v:.4f}") for c in ("sparsity", "val_perplexity", "perplexity")},
    )
    columns = ["rank", "name", "method", "target_sparsity", "iteration", "seed", "lr", "sparsity"]
    print(markdown_table(shown[columns + ["val_perplexity", "perplexity", "mask", "model_id", "weights"]]))
    return table
