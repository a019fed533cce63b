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
from dataclasses import dataclass, replace

from .config import CompareConfig, EvaluateConfig, IterativeConfig, PruneRunConfig, parse_pattern
from .methods import KINDS, METHODS, label
from .settings import flat_values

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
}


@dataclass
class Cell:
    kind: str  # dense | one-shot | trained (iterative, X+ft, dense+ft: the IMP loop)
    method: str  # a name of the method registry
    target: float
    seed: int | None  # None: nothing in the cell is random
    config: object  # the job's config: EvaluateConfig, PruneRunConfig or IterativeConfig
    corpus: str  # digest of the corpus, part of the identity
    pattern: str = "unstructured"  # or N:M (one-shot cells)
    distill: str = "none"  # the trained cells' recovery loss: none (cross-entropy), logits or squarehead
    lr: float | None = None  # the trained cells' learning rate (one of a sweep's)
    train_params: str = "all"  # what the trained cells train: all, norms-biases or lora

    @property
    def key(self) -> str:
        identity = {k: v for k, v in flat_values(self.config).items() if k not in NOT_IDENTITY}
        identity.update(kind=self.kind, corpus=self.corpus)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        amount = f"{self.target:.2f}" if self.pattern == "unstructured" else self.pattern
        rate = f" lr {self.lr:g}" if self.lr is not None else ""
        return f"{label(self.method, self.distill, self.train_params)} {amount}{rate}" + (
            f" seed {self.seed}" if self.seed is not None else ""
        )

    @property
    def tags(self) -> dict:
        return {
            "cell_key": self.key,
            "cell_kind": self.kind,
            "cell_method": self.method,
            "cell_target": f"{self.target:.4f}",
            "cell_seed": "" if self.seed is None else str(self.seed),
            "cell_pattern": self.pattern,
            "cell_distill": self.distill,
            "cell_train_params": self.train_params,
            "cell_lr": "" if self.lr is None else repr(self.lr),
        }


def trained_cell_config(
    config: CompareConfig,
    method: str,
    target: float,
    seed: int,
    distill: str = "none",
    lr: float | None = None,
    train_params: str = "all",
) -> IterativeConfig:
    """The IMP loop of one trained cell: the grid's schedule (iterative), one-shot with the method's criterion
    (X+ft) or never pruned (dense+ft), always the grid's training, so every trained cell at a target has one
    budget; at `lr` (one of a sweep's; default --lr), with --final-lr scaled by lr / --lr. The final model is
    also measured on the validation split, which a sweep selects on."""
    entry = METHODS[method]
    schedule = entry.schedule or config.schedule.schedule
    prune_method = entry.criterion.name if entry.criterion else config.prune.method
    lr = config.train.lr if lr is None else lr
    final_lr = config.schedule.final_lr
    final_lr = None if final_lr is None else final_lr * lr / config.train.lr
    return IterativeConfig(
        model=config.model,
        data=config.data,
        tracking=config.tracking,
        tasks=config.tasks,
        eval_tasks_every=0,  # the cell's accuracy is its final model's
        schedule=replace(config.schedule, target_sparsity=target, schedule=schedule, final_lr=final_lr),
        train=replace(config.train, seed=seed, distill=distill, lr=lr, train_params=train_params),
        prune=replace(config.prune, method=prune_method, seed=seed, sparsity_profile=entry.profile),
        validate=True,
    )


def plan_cells(config: CompareConfig, corpus_digest: str) -> list[Cell]:
    shared = {"model": config.model, "data": config.data, "tracking": config.tracking, "tasks": config.tasks}
    methods, seeds = [METHODS[name] for name in config.grid.methods], config.grid.seeds
    cells = [Cell("dense", "unpruned", 0.0, None, EvaluateConfig(**shared, split="test"), corpus_digest)]
    amounts = [(target, "unstructured") for target in config.grid.sparsities]
    amounts += [(n / m, pattern) for pattern in config.grid.patterns for n, m in [parse_pattern(pattern)]]
    for target, pattern in amounts:
        # OWL spreads an unstructured target over the layers; an N:M pattern is the same in every layer
        one_shot = [m for m in methods if m.kind == "one-shot" and (pattern == "unstructured" or m.profile != "owl")]
        for method in one_shot:
            for seed in seeds if method.seeded else [None]:  # magnitude draws nothing
                prune = replace(
                    config.prune,
                    method=method.criterion.name,
                    pattern=pattern,
                    sparsity=None if pattern != "unstructured" else target,
                    seed=config.prune.seed if seed is None else seed,
                    sparsity_profile=method.profile,
                )
                cells.append(
                    Cell(
                        "one-shot",
                        method.name,
                        target,
                        seed,
                        PruneRunConfig(**shared, prune=prune),
                        corpus_digest,
                        pattern,
                    )
                )
    for target in config.grid.sparsities:
        for distill, trains in itertools.product(config.grid.distill, config.grid.train_params):
            for method in (m for m in methods if m.kind == "trained"):
                for lr in config.grid.lrs or [config.train.lr]:
                    for seed in seeds:
                        cells.append(
                            Cell(
                                "trained",
                                method.name,
                                target,
                                seed,
                                trained_cell_config(config, method.name, target, seed, distill, lr, trains),
                                corpus_digest,
                                distill=distill,
                                lr=lr,
                                train_params=trains,
                            )
                        )
    return cells


def shard_of(cells: list, k: int, n: int) -> list:
    """The k-th of n slices (1-based) of the whole plan, the same in every shard whatever has finished: cells in
    order of kind, then key, dealt out in turn, so each shard gets its share of each kind (a trained cell costs
    far more than a one-shot one)."""
    ordered = sorted(cells, key=lambda cell: (KINDS.index(cell.kind), cell.key))
    return ordered[k - 1 :: n]
