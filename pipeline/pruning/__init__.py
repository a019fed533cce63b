"""One-shot pruning behind one entry point, `prune_model`: each criterion's pruning function, a
`PruningFunction`, is named by its entry in the method registry (pipeline/methods.py, read through the
config's `criterion`) and imported when first used. Nothing here imports the registry or the config at run
time, so the registry can name these modules without an import loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..architecture import decoder_layout, in_features, matrix_of
from ..errors import ConfigError, option
from .masks import prunable_linears, sparsity_of
from .owl import matrix_zero_counts, outlier_ratio, owl_layer_sparsities, within_bounds
from .sequential import LayerRecord, dense_input_norms

if TYPE_CHECKING:
    from ..config import PruneConfig


class PruningFunction(Protocol):
    """What a criterion's pruning function is (the registry names one per criterion, "module:function").

    It prunes `linears` (name -> module, the matrices `config` selects) of `model` in place, each to its fraction
    of zeros in `sparsities` (from the sparsity profile), or to `config.n_m`; `windows` are the calibration
    windows (None for a criterion that reads none), `device` where each decoder layer computes, `progress`
    whether to show a bar. It returns a LayerRecord per decoder layer it calibrated (none otherwise)."""

    def __call__(
        self,
        model: nn.Module,
        linears: dict[str, nn.Module],
        config: PruneConfig,
        windows: torch.Tensor | None,
        device: torch.device,
        progress: bool,
        sparsities: dict[str, float],
    ) -> list[LayerRecord]: ...


@dataclass
class PruneResult:
    sparsity: float
    seconds: float
    layers: list = field(default_factory=list)  # LayerRecord per decoder layer (calibrated methods)
    profile: list = field(default_factory=list)  # OWL: per decoder layer, its outlier ratio and OWL sparsity


@dataclass
class LayerProfile:
    layer: int
    outlier_ratio: float  # percent of its Wanda scores above --owl-m times their mean
    owl_sparsity: float  # what OWL's formula gives it
    bounded_sparsity: float  # held within the target +- lambda (the counts then land the whole set exactly)


def matrix_sparsities(model: nn.Module, linears: dict, config: PruneConfig, windows, device) -> tuple[dict, list]:
    """(name -> the fraction of zeros each matrix is pruned to, the OWL profile): every matrix at the target
    (uniform), or each layer's share from its outlier ratio in the dense model (owl), in exact counts."""
    if not config.uses_owl:
        return {name: config.fraction for name in linears}, []
    norms = dense_input_norms(model, linears, windows, device, config.calibration_batch_size)
    prefix = decoder_layout(model).layer_prefix + "."
    groups = {}  # decoder layer index -> its prunable matrices
    for name, module in linears.items():
        groups.setdefault(int(name[len(prefix) :].split(".")[0]), {})[name] = module
    ratios = []
    for group in groups.values():
        scores = [
            (matrix_of(m).detach().abs().float() * norms[n].sqrt().reshape(1, -1).to(m.weight.device)).reshape(-1)
            for n, m in group.items()
        ]
        ratios.append(outlier_ratio(torch.cat([s.cpu() for s in scores]), config.owl.owl_m))
    formula = owl_layer_sparsities(ratios, config.fraction, config.owl.owl_lambda)
    holdings = [{n: (m.weight.numel(), int((m.weight == 0).sum())) for n, m in g.items()} for g in groups.values()]
    sizes = [sum(numel for numel, _ in layer.values()) for layer in holdings]
    bounded = within_bounds(formula, sizes, config.fraction, config.owl.owl_lambda)
    counts = matrix_zero_counts(holdings, bounded, config.fraction)
    profile = [LayerProfile(*values) for values in zip(groups, ratios, formula, bounded)]
    return {name: counts[name] / linears[name].weight.numel() for name in linears}, profile


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
    """Prunes the model's decoder Linear weights in place to the config's sparsity (or N:M pattern), spread over
    the layers by its sparsity profile."""
    linears = check_prunable(model, config)
    if config.calibrates and windows is None:
        raise ValueError(f"{config.label} needs calibration windows")
    started = time.perf_counter()
    sparsities, profile = matrix_sparsities(model, linears, config, windows, torch.device(device))
    prune: PruningFunction = config.criterion.prune_function()
    layers = prune(model, linears, config, windows, torch.device(device), progress, sparsities)
    return PruneResult(sparsity_of(linears), time.perf_counter() - started, layers, profile)


__all__ = [
    "PruningFunction",
    "PruneResult",
    "check_prunable",
    "prune_model",
    "prunable_linears",
    "sparsity_of",
    "LayerRecord",
]
