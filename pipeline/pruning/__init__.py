"""One-shot pruning methods behind one registry: magnitude, SparseGPT, Wanda."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .magnitude import magnitude_prune_global, magnitude_prune_layerwise
from .masks import prunable_linears, sparsity_of
from .sequential import InputStatistics, LayerRecord, prune_sequentially
from .sparsegpt import sparsegpt_prune_matrix
from .wanda import wanda_prune_matrix

METHODS = ("magnitude", "sparsegpt", "wanda")
CALIBRATED = {"sparsegpt", "wanda"}


@dataclass
class PruneConfig:
    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"   # or N:M, e.g. 2:4
    scope: str = "layer"            # layer | global (magnitude only)
    include: str | None = None
    exclude: str | None = None
    nsamples: int = 128
    blocksize: int = 128
    percdamp: float = 0.01
    calibration_batch_size: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method '{self.method}': use one of {', '.join(METHODS)}", 2)
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"sparsity {self.sparsity} is outside [0, 1): give the fraction of zeros, e.g. 0.5", 2)
        self.n_m = parse_pattern(self.pattern)
        if self.scope not in ("layer", "global"):
            raise UserError(f"unknown scope '{self.scope}': use layer or global", 2)
        if self.scope == "global" and (self.method != "magnitude" or self.n_m):
            raise UserError("--scope global is for unstructured magnitude pruning only", 2)
        for flag, regex in (("--include", self.include), ("--exclude", self.exclude)):
            if regex:
                try:
                    re.compile(regex)
                except re.error as error:
                    raise UserError(f"{flag} '{regex}' is not a valid regex: {error}", 2) from None

    @property
    def label(self) -> str:
        amount = self.pattern if self.n_m else f"{self.sparsity:.2f}"
        return f"{self.method}-{amount}" + ("-global" if self.scope == "global" else "")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for unstructured, (N, M) for 'N:M' with 0 < N < M."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern or "")
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise UserError(f"pattern '{pattern}' is not 'unstructured' or N:M with 0 < N < M (e.g. 2:4)", 2)
    return int(match[1]), int(match[2])


@dataclass
class PruneResult:
    sparsity: float
    seconds: float
    layers: list = field(default_factory=list)  # LayerRecord per decoder layer (calibrated methods)


def _magnitude(model, linears, config, windows, device, progress):
    if config.n_m:  # N:M by magnitude is Wanda's selection with unit input norms
        for module in linears.values():
            ones = torch.ones(module.in_features, device=module.weight.device)
            module.weight.data = wanda_prune_matrix(module.weight, ones, 0.0, *config.n_m)
    elif config.scope == "global":
        magnitude_prune_global(linears, config.sparsity)
    else:
        magnitude_prune_layerwise(linears, config.sparsity)
    return []


def _sparsegpt(model, linears, config, windows, device, progress):
    n, m = config.n_m or (0, 0)

    def prune_matrix(name: str, module: nn.Linear, stats: InputStatistics, seconds: dict):
        pruned, _ = sparsegpt_prune_matrix(module.weight, stats.sum, config.sparsity, n, m,
                                           config.blocksize, config.percdamp, timings=seconds)
        module.weight.data = pruned

    return prune_sequentially(model, linears, windows, device, True, prune_matrix,
                              config.calibration_batch_size, progress)


def _wanda(model, linears, config, windows, device, progress):
    n, m = config.n_m or (0, 0)

    def prune_matrix(name: str, module: nn.Linear, stats: InputStatistics, seconds: dict):
        started = time.perf_counter()
        module.weight.data = wanda_prune_matrix(module.weight, stats.sum, config.sparsity, n, m)
        seconds["select"] = seconds.get("select", 0.0) + time.perf_counter() - started

    return prune_sequentially(model, linears, windows, device, False, prune_matrix,
                              config.calibration_batch_size, progress)


PRUNERS = {"magnitude": _magnitude, "sparsegpt": _sparsegpt, "wanda": _wanda}


def prune_model(model: nn.Module, config: PruneConfig, windows: torch.Tensor | None = None,
                device: torch.device | str = "cpu", progress: bool = False) -> PruneResult:
    """Prunes the model's decoder Linear weights in place to config.sparsity (or N:M)."""
    linears = prunable_linears(model, config.include, config.exclude)
    if not linears:
        raise UserError("no prunable matrices match --include/--exclude", 2)
    if config.method in CALIBRATED and windows is None:
        raise ValueError(f"{config.method} needs calibration windows")
    started = time.perf_counter()
    layers = PRUNERS[config.method](model, linears, config, windows, torch.device(device), progress)
    return PruneResult(sparsity_of(linears), time.perf_counter() - started, layers)


__all__ = ["METHODS", "PruneConfig", "PruneResult", "prune_model", "prunable_linears", "sparsity_of",
           "parse_pattern", "LayerRecord"]
