"""One-shot pruning methods behind one registry: magnitude, SparseGPT, Wanda, and the random control."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architecture import in_features, matrix_of, set_matrix
from ..config import PRUNE_METHODS, PruneConfig
from ..errors import ConfigError, UserError, option
from .magnitude import magnitude_prune_global, magnitude_prune_layerwise
from .masks import prunable_linears, sparsity_of
from .random import random_prune
from .sequential import InputStatistics, LayerRecord, prune_sequentially
from .sparsegpt import SingularHessian, sparsegpt_prune_matrix
from .wanda import wanda_prune_matrix


@dataclass
class PruneResult:
    sparsity: float
    seconds: float
    layers: list = field(default_factory=list)  # LayerRecord per decoder layer (calibrated methods)


def _magnitude(model, linears, config, windows, device, progress):
    if config.n_m:  # N:M by magnitude is Wanda's selection with unit input norms
        for module in linears.values():
            ones = torch.ones(in_features(module), device=module.weight.device)
            set_matrix(module, wanda_prune_matrix(matrix_of(module), ones, 0.0, *config.n_m))
    elif config.scope == "global":
        magnitude_prune_global(linears, config.fraction)
    else:
        magnitude_prune_layerwise(linears, config.fraction)
    return []


def _sparsegpt(model, linears, config, windows, device, progress):
    n, m = config.n_m or (0, 0)

    def prune_matrix(name: str, module: nn.Module, stats: InputStatistics, seconds: dict):
        try:
            pruned, _ = sparsegpt_prune_matrix(matrix_of(module), stats.sum, config.fraction, n, m,
                                               config.blocksize, config.percdamp, timings=seconds)
        except SingularHessian:
            raise UserError(f"SparseGPT cannot invert the Hessian of {name}: it is singular with "
                            f"{option('percdamp')} {config.percdamp:g} over {windows.shape[0]} calibration windows; "
                            f"raise {option('percdamp')} (the reference uses 0.01) or {option('nsamples')}") from None
        set_matrix(module, pruned)

    return prune_sequentially(model, linears, windows, device, True, prune_matrix,
                              config.calibration_batch_size, progress)


def _wanda(model, linears, config, windows, device, progress):
    n, m = config.n_m or (0, 0)

    def prune_matrix(name: str, module: nn.Module, stats: InputStatistics, seconds: dict):
        started = time.perf_counter()
        set_matrix(module, wanda_prune_matrix(matrix_of(module), stats.sum, config.fraction, n, m))
        seconds["select"] = seconds.get("select", 0.0) + time.perf_counter() - started

    return prune_sequentially(model, linears, windows, device, False, prune_matrix,
                              config.calibration_batch_size, progress)


def _random(model, linears, config, windows, device, progress):
    random_prune(linears, config.fraction, config.seed, config.n_m)
    return []


PRUNERS = {"magnitude": _magnitude, "sparsegpt": _sparsegpt, "wanda": _wanda, "random": _random}
assert set(PRUNERS) == set(PRUNE_METHODS), "the registry and the --method choices must name the same methods"


def check_prunable(model: nn.Module, config: PruneConfig) -> dict:
    """The matrices `config` prunes (checkable on a meta-device skeleton): some must match, and an N:M
    pattern needs at least M input columns in each."""
    linears = prunable_linears(model, config.include, config.exclude)
    if not linears:
        raise ConfigError(f"no prunable matrices match {option('include')}/{option('exclude')}")
    if config.n_m:
        name, narrowest = min(((n, in_features(m)) for n, m in linears.items()), key=lambda item: item[1])
        if narrowest < config.n_m[1]:
            raise ConfigError(f"{option('pattern')} {config.pattern} needs groups of {config.n_m[1]} input columns, "
                              f"but {name} has {narrowest} inputs: use M of at most {narrowest}")
    return linears


def prune_model(model: nn.Module, config: PruneConfig, windows: torch.Tensor | None = None,
                device: torch.device | str = "cpu", progress: bool = False) -> PruneResult:
    """Prunes the model's decoder Linear weights in place to the config's sparsity (or N:M pattern)."""
    linears = check_prunable(model, config)
    if config.calibrated and windows is None:
        raise ValueError(f"{config.method} needs calibration windows")
    started = time.perf_counter()
    layers = PRUNERS[config.method](model, linears, config, windows, torch.device(device), progress)
    return PruneResult(sparsity_of(linears), time.perf_counter() - started, layers)


__all__ = ["PruneConfig", "PruneResult", "check_prunable", "prune_model", "prunable_linears", "sparsity_of",
           "LayerRecord"]
