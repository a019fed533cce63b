"""A pruning of the starting model done once and read by every run that would compute the same one.

The untrained one-shot cell of a comparison and its `X+ft` cells at each learning rate of a sweep all prune
the unpruned model with one criterion, one calibration draw and one target; so does every iterative cell's
first step toward the same first target. The first of them to get there keeps the pruned matrices in the
grid's directory (`<key>.pt`, written atomically under a lock) and the others load them: one pruning per
(criterion, target, seed) instead of one per cell. The key holds everything the result depends on: the
model's weights (its source), their dtype and device, the thread count (SparseGPT's Hessian sums in another
order flip near-ties), the pruning settings and the calibration windows themselves. Only a pruning of the
untouched starting model is shared, never one after training.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_torch_save
from .config import PruneConfig
from .dense_cache import model_identity
from .distributed import num_processes
from .models import resolve_model_source
from .pruning import LayerProfile, PruneResult, prune_model
from .pruning.masks import prunable_linears, sparsity_of
from .pruning.sequential import LayerRecord
from .settings import flat_values


def pruning_key(model: nn.Module, source: str, prune: PruneConfig, windows: torch.Tensor | None, device) -> str:
    parameter = next(model.parameters())
    identity = {
        "model": model_identity(resolve_model_source(source)),
        "dtype": str(parameter.dtype),
        "device": torch.device(device).type,
        "threads": torch.get_num_threads(),
        # an unseeded criterion (magnitude) draws nothing: its seed setting does not change the pruning
        "prune": {k: v for k, v in flat_values(prune).items() if k != "seed" or prune.criterion.seeded},
        "fraction": prune.fraction,
        "windows": None if windows is None else hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _waiting_lock(path: Path):
    """An exclusive `flock` that waits: a second process wanting the same pruning waits for the first's file."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prune_starting_model(
    model: nn.Module,
    source: str,
    prune: PruneConfig,
    windows: torch.Tensor | None,
    device,
    directory: Path | None,
    progress: bool = False,
) -> tuple[PruneResult, bool]:
    """Prunes the untouched starting model as `prune_model` does, or loads the same pruning from `directory`;
    returns (the result, whether it was loaded). Without a directory, or under a launcher with several
    processes (each prunes and the main one's mask is broadcast), it simply prunes."""
    if directory is None or num_processes() > 1:
        return prune_model(model, prune, windows, device, progress), False
    linears = prunable_linears(model, prune.include, prune.exclude)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = pruning_key(model, source, prune, windows, device)
    path = directory / f"{key}.pt"
    with _waiting_lock(directory / f"{key}.lock"):
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for name, module in linears.items():
                    module.weight.copy_(saved["weights"][name])
            layers = [LayerRecord(**record) for record in saved["layers"]]
            profile = [LayerProfile(**layer) for layer in saved["profile"]]
            return PruneResult(sparsity_of(linears), saved["seconds"], layers, profile), True
        started = time.perf_counter()
        result = prune_model(model, prune, windows, device, progress)
        atomic_torch_save(
            {
                "weights": {name: module.weight.detach().cpu() for name, module in linears.items()},
                "layers": [asdict(record) for record in result.layers],
                "profile": [asdict(layer) for layer in result.profile],
                "seconds": time.perf_counter() - started,
            },
            path,
        )
    return result, False
