"""One-shot pruning behind one entry point, `prune_model`: each criterion's pruning function is named by its
entry in the method registry (pipeline/methods.py) and imported when first used."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architecture import in_features
from ..config import PruneConfig
from ..errors import ConfigError, option
from ..methods import criterion
from .masks import prunable_linears, sparsity_of
from .sequential import LayerRecord


@dataclass
class PruneResult:
    sparsity: float
    seconds: float
    layers: list = field(default_factory=list)  # LayerRecord per decoder layer (calibrated methods)


def check_prunable(model: nn.Module, config: PruneConfig) -> dict:
    """The matrices `config` prunes (checkable on a meta-device skeleton): some must match, and an N:M
    pattern needs at least M input columns in each."""
    linears = prunable_linears(model, config.include, config.exclude)
    if not linears:
        raise ConfigError(f"no prunable matrices match {option('include')}/{option('exclude')}")
    if config.n_m:
        name, narrowest = min(((n, in_features(m)) for n, m in linears.items()), key=lambda item: item[1])
        if narrowest < config.n_m[1]:
            raise ConfigError(
                f"{option('pattern')} {config.pattern} needs groups of {config.n_m[1]} input columns, "
                f"but {name} has {narrowest} inputs: use M of at most {narrowest}"
            )
    return linears


def prune_model(
    model: nn.Module,
    config: PruneConfig,
    windows: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> PruneResult:
    """Prunes the model's decoder Linear weights in place to the config's sparsity (or N:M pattern)."""
    linears = check_prunable(model, config)
    chosen = criterion(config.method)
    if chosen.calibrates and windows is None:
        raise ValueError(f"{config.method} needs calibration windows")
    started = time.perf_counter()
    layers = chosen.prune_function()(model, linears, config, windows, torch.device(device), progress)
    return PruneResult(sparsity_of(linears), time.perf_counter() - started, layers)


__all__ = [
    "PruneConfig",
    "PruneResult",
    "check_prunable",
    "prune_model",
    "prunable_linears",
    "sparsity_of",
    "LayerRecord",
]
