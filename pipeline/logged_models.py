"""Which of a run's models become MLflow LoggedModels (`--log-models`), what each records, and where its weights
are. A LoggedModel here holds no copy of the weights: its `weights` tag names the directory that already holds
them (a saved model), so they are stored once. Its params say what made it (method, target, iteration, lr,
seed), its tags what it is (the sha256 of its packed masks and its non-zeros: two cells with one mask show it,
as a one-shot cell and its +ft cell's first iteration do), and the run's metrics about it are linked to it by
model id, with the evaluation dataset they measure."""

from __future__ import annotations

from pathlib import Path

from .pruning.masks import mask_fingerprint, model_masks


def model_name(method: str, target: float, iteration: int | None = None) -> str:
    """`iterative-s50-it2`, `sparsegpt+ft-s87p5`: MLflow refuses '.', ':', '/' and '%' in a model's name."""
    percent = f"{round(100 * target, 2):g}".replace(".", "p")
    return f"{method}-s{percent}" + ("" if iteration is None else f"-it{iteration}")


def model_record(linears: dict, weights: Path, made_by: dict, tags: dict | None = None) -> tuple[dict, dict]:
    """(params, tags) of a LoggedModel: `made_by` (method, target_sparsity, iteration, lr, seed), and its mask's
    fingerprint, its non-zeros and the directory its weights are in."""
    fingerprint, nonzeros = mask_fingerprint(model_masks(linears))
    tags = {"mask_sha256": fingerprint, "nonzeros": nonzeros, "weights": str(Path(weights).resolve()), **(tags or {})}
    return made_by, tags
