"""The comparison grid for one model and dataset, each cell one MLflow run, a finished cell reused.

Cells, at every target sparsity: the untrained one-shot methods (SparseGPT, magnitude, Wanda); iterative
pruning; and its equal-budget controls, which run the same IMP loop with the same training per
iteration (steps, batch, window, lr, seed) and so the same training tokens: `X+ft` prunes one-shot with
X at the first iteration and then only trains, `dense+ft` never prunes. Plus the dense baseline. A
stochastic cell (a calibration draw, a data order) is repeated for every seed, and a trained cell for every
learning rate of a sweep (`--lrs`): the lr is part of its identity, so a sweep reuses the cells it shares
with an earlier grid and can be extended later.

Each cell's config is composed from the grid's (the model, data, training and calibration settings
are the grid's own objects, not copies), and a cell is identified by a hash of everything that
determines its result (the `cell_key` tag): a FINISHED run with the same key is reused, not rerun,
unless `force`. Which cells a method makes, and how they train, the method registry says
(pipeline/methods.py); running them is the compare job's (jobs/compare.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import numbers
from dataclasses import dataclass, replace

from .axes import AXES, RECOVERY_AXES, ROW_AXES, SELECTION, combinable, display_name
from .config import (
    LORA_SETTINGS,
    CompareConfig,
    EvaluateConfig,
    IterativeConfig,
    PruneRunConfig,
    TrainConfig,
    parse_pattern,
    unset_since,
)
from .methods import BASELINE, KINDS, METHODS
from .settings import default_of, flat_values

# Settings that change where or how a cell runs, not its result.
NOT_IDENTITY = {
    "experiment",
    "system_metrics",
    "output_dir",
    "overwrite",
    "resume",
    "device",
    "log_every",
    "save_model",
    "model_dir",
    "tasks_batch_size",
    "log_models",
    "eval_every",  # which iterations are measured: the models are the same
}


@dataclass
class Cell:
    """One cell: its job's config, the corpus digest, and its place on each axis of the grid (pipeline/axes.py),
    read as attributes: `cell.kind`, `cell.method`, `cell.target_sparsity`, `cell.lr`, ..."""

    config: object  # the job's config: EvaluateConfig, PruneRunConfig or IterativeConfig
    corpus: str  # digest of the corpus, part of the identity
    values: dict  # axis name -> value; None where nothing in the cell is random (seed) or trained (lr)

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def key(self) -> str:
        values = flat_values(self.config)
        identity = {k: v for k, v in values.items() if k not in NOT_IDENTITY and not unset_since(k, values[k])}
        identity.update(kind=self.kind, corpus=self.corpus)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        amount = f"{self.target_sparsity:.2f}" if self.pattern == "unstructured" else self.pattern
        described = [a.describe(self.values[a.name]) for a in AXES if a.describe and self.values[a.name] is not None]
        return " ".join([display_name(self.values), amount, *described])

    @property
    def tags(self) -> dict:
        return {"cell_key": self.key, **{axis.tag: axis.encode(self.values[axis.name]) for axis in AXES}}


def cell_values(kind: str, method: str, target: float, seed: int | None, pattern="unstructured", **recovery) -> dict:
    """A cell's place on every axis; an untrained cell sits at each recovery axis' plain value (None for lr)."""
    values = {"kind": kind, "method": method, "target_sparsity": target, "pattern": pattern, "seed": seed}
    return {**values, **{axis.name: axis.plain for axis in RECOVERY_AXES}, **recovery}


def trained_cell_config(
    config: CompareConfig, method: str, target: float, seed: int, recovery: dict
) -> IterativeConfig:
    """The IMP loop of one trained cell: the grid's schedule (iterative), one-shot with the method's criterion
    (X+ft) or never pruned (dense+ft), always the grid's training, so every trained cell at a target has one
    budget; then each recovery axis at its value in `recovery` (the grid's default where it has none). The
    final model is also measured on the validation split, which a sweep selects on."""
    entry = METHODS[method]
    schedule = entry.schedule or config.schedule.schedule
    prune_method = entry.criterion.name if entry.criterion else config.prune.method
    cell_config = IterativeConfig(
        model=config.model,
        data=config.data,
        tracking=config.tracking,
        tasks=config.tasks,
        saved_model=config.saved_model,
        eval_tasks_every=0,  # the cell's accuracy is its final model's
        eval_every=config.grid.eval_every,
        schedule=replace(config.schedule, target_sparsity=target, schedule=schedule),
        # LoRA's settings at their defaults: the recovery axes set what each cell reads
        train=replace(config.train, seed=seed, **{name: default_of(TrainConfig, name) for name in LORA_SETTINGS}),
        prune=replace(config.prune, method=prune_method, seed=seed, sparsity_profile=entry.profile),
        validate=True,
    )
    for axis in RECOVERY_AXES:
        value = recovery[axis.name] if axis.name in recovery else axis.sweep(config)[0] if axis.of(entry) else None
        cell_config = axis.apply(cell_config, value, config)
    return cell_config


def _one_shot_cells(config: CompareConfig, corpus_digest: str, shared: dict) -> list[Cell]:
    """Every untrained pruning: each one-shot method at each target and N:M pattern, per seed where it draws."""
    methods, cells = [METHODS[name] for name in config.grid.methods], []
    amounts = [(target, "unstructured") for target in config.grid.sparsities]
    amounts += [(n / m, pattern) for pattern in config.grid.patterns for n, m in [parse_pattern(pattern)]]
    for target, pattern in amounts:
        # OWL spreads an unstructured target over the layers; an N:M pattern is the same in every layer
        # (nor can a criterion that prunes unstructured only)
        one_shot = [
            m
            for m in methods
            if m.kind == "one-shot" and (pattern == "unstructured" or (m.profile != "owl" and m.criterion.patterns))
        ]
        for method in one_shot:
            for seed in config.grid.seeds if method.seeded else [None]:  # magnitude draws nothing
                prune = replace(
                    config.prune,
                    method=method.criterion.name,
                    pattern=pattern,
                    sparsity=None if pattern != "unstructured" else target,
                    seed=config.prune.seed if seed is None else seed,
                    sparsity_profile=method.profile,
                )
                values = cell_values("one-shot", method.name, target, seed, pattern)
                job = PruneRunConfig(**shared, prune=prune, saved_model=config.saved_model)
                cells.append(Cell(job, corpus_digest, values))
    return cells


def _trained_cells(config: CompareConfig, corpus_digest: str) -> list[Cell]:
    """Every trained cell: each trained method at each target, at every combination of the values of the
    recovery axes that are the method's (an axis that is not, e.g. the step size of X+ft, is None), per seed."""
    trained = [METHODS[name] for name in config.grid.methods if METHODS[name].kind == "trained"]
    rows = [axis for axis in RECOVERY_AXES if axis.role != SELECTION]
    selections = [axis for axis in RECOVERY_AXES if axis.role == SELECTION]
    cells = []
    for target in config.grid.sparsities:
        for row in itertools.product(*(axis.sweep(config) for axis in rows)):
            for method in trained:
                if any(not axis.of(method) and value != axis.sweep(config)[0] for axis, value in zip(rows, row)):
                    continue  # the method's one cell on an axis that is not its own is made at the first value
                mine = tuple(value if axis.of(method) else None for axis, value in zip(rows, row))
                if not combinable(dict(zip([a.name for a in rows], mine))):
                    continue  # e.g. reconstruct with lora: not a recovery there is
                for selection in itertools.product(*(axis.sweep(config) for axis in selections)):
                    recovery = dict(zip([a.name for a in rows + selections], mine + selection))
                    for seed in config.grid.seeds:
                        cell_config = trained_cell_config(config, method.name, target, seed, recovery)
                        values = cell_values("trained", method.name, target, seed, **recovery)
                        cells.append(Cell(cell_config, corpus_digest, values))
    return cells


def plan_cells(config: CompareConfig, corpus_digest: str) -> list[Cell]:
    """The grid's cells: the dense baseline, the untrained prunings, the trained cells."""
    shared = {"model": config.model, "data": config.data, "tracking": config.tracking, "tasks": config.tasks}
    dense = Cell(EvaluateConfig(**shared, split="test"), corpus_digest, cell_values("dense", BASELINE, 0.0, None))
    cells = [dense, *_one_shot_cells(config, corpus_digest, shared), *_trained_cells(config, corpus_digest)]
    # one cell per key: under a budget dense+ft is the same cell at every target (the report reads it at each)
    unique: dict = {}
    for cell in cells:
        unique.setdefault(cell.key, cell)
    return list(unique.values())


def shard_of(cells: list, k: int, n: int) -> list:
    """The k-th of n slices (1-based) of the whole plan, the same in every shard whatever has finished: cells in
    order of kind, then key, dealt out in turn, so each shard gets its share of each kind (a trained cell costs
    far more than a one-shot one)."""
    ordered = sorted(cells, key=lambda cell: (KINDS.index(cell.kind), cell.key))
    return ordered[k - 1 :: n]


def next_rung(tried: list[float], upward: bool) -> float:
    """The lr one rung past the edge of those tried, at the ratio of the two rungs next to that edge, so a 1-3
    ladder stays one: 1e-4, 3e-4, 1e-3 goes on 3e-3, 1e-2 upward and 3e-5, 1e-5 downward (three significant
    figures, as lrs are written, so a rung made here is the cell `--lrs` would make)."""
    rates = sorted(tried)
    inner = rates[-3:-1] if upward else rates[1:3]
    ratio = inner[1] / inner[0] if len(inner) == 2 else rates[-1] / rates[0]
    return float(f"{rates[-1] * ratio if upward else rates[0] / ratio:.3g}")


def _row_identity(values) -> tuple:
    """A trained row's place on the row axes, alike for a Cell's values and a summary row (where a missing value
    is NaN and an integer may be a float)."""

    def plain(value):
        if value is None or (isinstance(value, float) and value != value):
            return None
        return round(float(value), 12) if isinstance(value, numbers.Real) else value

    return tuple(plain(values[name]) for name in ROW_AXES)


def lr_extension_cells(config: CompareConfig, cells: list[Cell], summary) -> list[Cell]:
    """The next rung of the lr ladder, at every seed of the grid, for each of the grid's trained rows whose
    selected lr (results.select_lrs, on the validation split) is the smallest or largest of those it tried."""
    planned = {_row_identity(cell.values): cell for cell in cells if cell.kind == "trained"}
    trained = summary[summary["kind"] == "trained"]
    tried = {}
    for _, row in trained.iterrows():
        tried.setdefault(_row_identity(row), []).append(float(row["lr"]))
    extensions = {}
    for _, row in trained[trained["selected"] & trained["lr_at_edge"]].iterrows():
        cell = planned.get(_row_identity(row))
        if cell is None:
            continue  # a row of the experiment that this grid does not plan
        rates = tried[_row_identity(row)]
        recovery = {axis.name: cell.values[axis.name] for axis in RECOVERY_AXES}
        recovery["lr"] = next_rung(rates, upward=float(row["lr"]) == max(rates))
        for seed in config.grid.seeds:
            cell_config = trained_cell_config(config, cell.method, cell.target_sparsity, seed, recovery)
            values = cell_values("trained", cell.method, cell.target_sparsity, seed, **recovery)
            extension = Cell(cell_config, cell.corpus, values)
            extensions.setdefault(extension.key, extension)  # dense+ft's one cell is a row at every target
    return list(extensions.values())
