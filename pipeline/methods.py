"""The methods a comparison sets side by side, in one registry: what each one is and how the report shows it.

A pruning criterion (magnitude, SparseGPT, Wanda, the random control) is one `Criterion` entry naming its
pruning function. From each criterion the registry derives the two grid methods that use it: the
untrained one-shot cell (`wanda`) and the same one-shot mask trained with the iterative cell's budget
(`wanda+ft`). Beside them stand `iterative` (the IMP loop), `dense+ft` (the unpruned model trained as
long) and `unpruned` (the dense baseline). Flags' choices, the grid, the tables and the figures all ask
this module; none of them spells a method name. Adding a criterion is one entry here plus its pruning
function, a `pipeline.pruning.PruningFunction`, which the entry names as "module:function".

Nothing here imports torch: the CLI reads the choices before any heavy import.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from .errors import ConfigError

KINDS = ("dense", "one-shot", "trained")  # a cell's kind: the baseline, a mask without training, the IMP loop
SPARSITY_SCHEDULES_ONCE = ("one-shot", "dense")  # schedules that prune at once or never: the grid's controls


@dataclass(frozen=True)
class Criterion:
    """How a mask is chosen."""

    name: str  # the value of --prune-method
    display: str  # in tables
    color: str  # one colour per criterion in every figure: `wanda` and `wanda+ft` read as one family
    pruner: str  # "module:function" of its pruning function, imported when first used
    calibrates: bool = False  # reads calibration windows (their draw is seeded)
    seeded: bool = False  # draws randomness: the calibration windows, or the mask itself
    control: bool = False  # shows what choosing by a criterion is worth; not a method to adopt
    global_scope: bool = False  # can rank all matrices together (--scope global), not only each on its own
    patterns: bool = True  # can prune to an N:M pattern

    def prune_function(self):
        module, function = self.pruner.split(":")
        return getattr(importlib.import_module(module), function)


CRITERIA = (
    Criterion(
        "sparsegpt", "SparseGPT", "C0", "pipeline.pruning.sparsegpt:prune_with_sparsegpt", calibrates=True, seeded=True
    ),
    Criterion("magnitude", "Magnitude", "C1", "pipeline.pruning.magnitude:prune_by_magnitude", global_scope=True),
    Criterion("wanda", "Wanda", "C2", "pipeline.pruning.wanda:prune_with_wanda", calibrates=True, seeded=True),
    Criterion("random", "Random", "C5", "pipeline.pruning.random:prune_at_random", seeded=True, control=True),
    Criterion("ria", "RIA", "C7", "pipeline.pruning.ria:prune_with_ria", calibrates=True, seeded=True),
    Criterion(
        "dsnot", "DSnoT", "C8", "pipeline.pruning.dsnot:prune_with_dsnot", calibrates=True, seeded=True, patterns=False
    ),
)


@dataclass(frozen=True)
class Method:
    """One kind of cell of the comparison grid."""

    name: str  # the value of compare's --methods, and the `cell_method` tag
    kind: str  # one of KINDS
    display: str
    color: str
    criterion: Criterion | None  # the one-shot mask's criterion; None: iterative's is --prune-method, or none
    schedule: str | None = None  # a trained cell's sparsity schedule; None: the grid's own --schedule
    control: bool = False  # a control (dense+ft, random, random+ft): read beside the methods, not ranked
    #                               against them as a recommendation
    profile: str = "uniform"  # how its sparsity is spread over the layers: uniform, or owl (the `-owl` methods)

    @property
    def seeded(self) -> bool:
        """Whether the cell draws randomness, so that each seed is a cell of its own."""
        if self.kind == "trained":
            return True  # the data order
        return self.profile == "owl" or (self.criterion is not None and self.criterion.seeded)  # calibration

    @property
    def order(self) -> int:
        return list(METHODS).index(self.name)

    @property
    def prunes(self) -> bool:
        """Whether its model is sparse: every method but the unpruned baseline and dense+ft."""
        return self.kind != "dense" and self.schedule != "dense"

    @property
    def prunes_step_by_step(self) -> bool:
        """Whether it follows the grid's sparsity schedule, iteration by iteration (iterative)."""
        return self.kind == "trained" and self.schedule is None


def _methods() -> dict:
    """Each criterion untrained and +ft, each with the uniform profile and OWL's (`wanda-owl`, `wanda-owl+ft`);
    iterative with either, and step by step with each calibrating criterion (`iterative-sparsegpt`); dense+ft;
    the baseline."""
    entries = [Method("unpruned", "dense", "Unpruned", "C4", None)]
    owl = [c for c in CRITERIA if not c.control]
    entries += [Method(c.name, "one-shot", c.display, c.color, c, control=c.control) for c in CRITERIA]
    entries += [Method(f"{c.name}-owl", "one-shot", f"{c.display} OWL", c.color, c, profile="owl") for c in owl]
    entries += [Method("iterative", "trained", "Iterative", "C3", None)]
    entries += [Method("iterative-owl", "trained", "Iterative OWL", "C3", None, profile="owl")]
    # step by step with a criterion that calibrates: each step measures the current sparse model's activations
    calibrated = [c for c in CRITERIA if c.calibrates]
    entries += [Method(f"iterative-{c.name}", "trained", f"Iterative {c.display}", "C3", c) for c in calibrated]
    entries += [
        Method(f"{c.name}+ft", "trained", f"{c.display} + FT", c.color, c, "one-shot", c.control) for c in CRITERIA
    ]
    entries += [
        Method(f"{c.name}-owl+ft", "trained", f"{c.display} OWL + FT", c.color, c, "one-shot", profile="owl")
        for c in owl
    ]
    entries += [Method("dense+ft", "trained", "Dense + FT", "C4", None, "dense", control=True)]
    return {m.name: m for m in entries}


METHODS = _methods()
BASELINE = "unpruned"
CRITERION_NAMES = tuple(c.name for c in CRITERIA)
GRID_METHODS = tuple(name for name, m in METHODS.items() if m.kind != "dense")  # the baseline always runs
# --prune-method's default; a grid's `iterative` prunes by it (compare has no such flag)
DEFAULT_CRITERION = "magnitude"
DEFAULT_GRID = ("sparsegpt", "magnitude", "wanda", "iterative", "magnitude+ft", "sparsegpt+ft", "dense+ft")


def trained_method_of(schedule: str, criterion_name: str, profile: str = "uniform") -> str:
    """The trained grid method that an IMP run of this sparsity schedule, criterion and profile is: iterative's
    own schedules (geometric, cubic) with any criterion, or the method whose schedule and criterion these are."""
    trained = [entry for entry in METHODS.values() if entry.kind == "trained" and entry.profile == profile]
    # a method of this very criterion before one that takes any (iterative-sparsegpt before iterative)
    for entry in sorted(trained, key=lambda entry: entry.criterion is None):
        if entry.criterion is not None and entry.criterion.name != criterion_name:
            continue
        if entry.prunes_step_by_step and schedule not in SPARSITY_SCHEDULES_ONCE:
            return entry.name
        if entry.schedule == schedule:
            return entry.name
    return f"{schedule}-{criterion_name}"


def one_shot_method_of(criterion_name: str, profile: str = "uniform") -> str:
    """The untrained grid method that a one-shot pruning with this criterion and profile is."""
    for entry in METHODS.values():
        if entry.kind == "one-shot" and entry.criterion.name == criterion_name and entry.profile == profile:
            return entry.name
    return criterion_name


def criterion_of(name: str) -> str | None:
    """The criterion a grid cell of this method prunes by: its own, or `iterative`'s, DEFAULT_CRITERION; None for
    a method that does not prune or that the registry does not know (from a store written by another version)."""
    entry = METHODS.get(name)
    if entry is None or not entry.prunes:
        return None
    return entry.criterion.name if entry.criterion is not None else DEFAULT_CRITERION


def methods_where(names, property_name: str) -> list:
    """For each name, whether its method has the property (False for a name the registry does not know, e.g.
    from a store written by another version)."""
    return [bool(getattr(METHODS[name], property_name)) if name in METHODS else False for name in names]


def _did_you_mean(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def criterion(name: str) -> Criterion:
    for entry in CRITERIA:
        if entry.name == name:
            return entry
    raise ConfigError(
        f"unknown pruning method '{name}'{_did_you_mean(name, CRITERION_NAMES)}: use one of "
        f"{', '.join(CRITERION_NAMES)}"
    )


def method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'{_did_you_mean(name, METHODS)}: use one of {', '.join(METHODS)}")
    return METHODS[name]
