"""The axes of a comparison cell, in one table: a cell's tags, its spec, the runs table's columns, the report's
rows, their order, the cells' names and the figures' groupings are all read from `AXES`.

Every cell is a point on these axes. `kind`, `method`, `target_sparsity`, `pattern` and `seed` place every cell;
the recovery axes place the trained cells (the IMP loop): each names the grid setting that sweeps it (`--distill`,
`--train-params`, `--lrs`), and the grid runs every combination of their values, each applied to the trained
cell's config. A run made before an axis existed reads as the axis' `legacy` value, so the report of an older
store still reads; older spellings of a value are its `aliases`.

Adding a grid dimension touches three places: its setting (config.py), its entry here, and where the IMP loop
uses it. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from .config import DISTILL_MODES, LORA_SETTINGS, RECOVERIES, TRAIN_PARAMS, ScheduleConfig, TrainConfig
from .methods import KINDS, METHODS, SPARSITY_SCHEDULES_ONCE
from .reporting.numbers import tokens_text
from .settings import default_of, get_path

ROW, SELECTION, REPEAT = "row", "selection", "repeat"  # what an axis is to the report's tables


def _index_in(values: tuple, missing: int = 9) -> Callable:
    return lambda value: values.index(value) if value in values else missing


def _pattern_order(pattern: str) -> float:
    """Unstructured first (by target), then N:M patterns by their fraction of zeros."""
    if pattern == "unstructured":
        return -1.0
    n, m = (int(part) for part in pattern.split(":"))
    return n / m


def _optional_float(text: str) -> float:
    return float(text) if text else math.nan


def _optional_int(text: str) -> int | None:
    return int(text) if text else None


def _optional_step(text: str) -> float | None:
    return float(text) if text else None


def _recovery_before_its_tag(run) -> str:
    """Runs made before the grid's recovery loss was `cell_distill` called it `cell_recovery`."""
    return run.data.tags.get("cell_recovery", "none")


def _lr_before_its_tag(run) -> float:
    """Runs made before the `cell_lr` tag: a trained cell's lr is its `lr` parameter (untrained cells have none)."""
    return _optional_float(run.data.params.get("lr", ""))


def _scaled_lr(cell_config, lr: float, grid_config):
    """A cell at lr x trains at x and ends at --final-lr scaled by x / --lr (warmup and the cosine's floor are
    relative already)."""
    final_lr = grid_config.schedule.final_lr
    final_lr = None if final_lr is None else final_lr * lr / grid_config.train.lr
    schedule = replace(cell_config.schedule, final_lr=final_lr)
    return replace(cell_config, schedule=schedule, train=replace(cell_config.train, lr=lr))


def _budgeted(cell_config, budget: int, grid_config):
    """A cell trains `budget` tokens in all: its steps come from the budget, so --epochs-per-iteration and
    --max-steps are no part of its identity, nor (for one iteration of training) its --prune-percentage, nor
    (for a cell that never prunes) its target."""
    defaults = {name: default_of(TrainConfig, name) for name in ("epochs", "max_steps")}
    schedule = replace(cell_config.schedule, budget=budget)
    if schedule.schedule in SPARSITY_SCHEDULES_ONCE:
        schedule = replace(schedule, prune_percentage=default_of(ScheduleConfig, "prune_percentage"))
    if schedule.schedule == "dense":  # it prunes nothing: one cell at every target, which the report reads at each
        schedule = replace(schedule, target_sparsity=default_of(ScheduleConfig, "target_sparsity"))
    return replace(cell_config, schedule=schedule, train=replace(cell_config.train, **defaults))


def _recovering(cell_config, mode: str, grid_config):
    """A reconstructing cell fits every parameter of a block on the language-model data, with no loss of its own
    to distill (the grid refuses the combinations that make no sense before any cell runs)."""
    return replace(cell_config, train=replace(cell_config.train, recovery=mode))


def _trained_parameters(cell_config, mode: str, grid_config):
    """Only a cell that trains adapters reads LoRA's settings, the grid's; elsewhere they keep their defaults,
    so they are no part of the identity of a cell that does not read them."""
    lora = {name: getattr(grid_config.train, name) for name in LORA_SETTINGS} if mode == "lora" else {}
    return replace(cell_config, train=replace(cell_config.train, train_params=mode, **lora))


@dataclass(frozen=True)
class Axis:
    """One axis of a cell."""

    name: str  # the Cell's attribute, the column of compare.csv and summary.csv, the key in a cell's spec
    tag: str  # the cell run's MLflow tag
    role: str  # ROW: part of a table row's identity; SELECTION: swept and selected on validation; REPEAT: averaged
    rank: int  # the order the report's rows sort in, lowest first
    sort: Callable | None = None  # value -> its sort key (None: the value itself)
    encode: Callable = str  # value -> tag text
    decode: Callable = str  # tag text -> value
    legacy: object = None  # a run without the tag: this value, or a function of the run that finds it
    aliases: Mapping = field(default_factory=dict)  # older spellings of a value in the tag
    plain: object = None  # a value a cell's name leaves out; any other is named in brackets: `X + FT [logits]`
    word: Callable | None = None  # value -> its words in those brackets (None: the value itself)
    describe: Callable | None = None  # value -> words in a cell's label after its sparsity (`lr 0.001`)
    style: Callable | None = None  # value -> the figures' style entries of its points (a marker, a fill)
    # recovery axes: the grid setting that sweeps the trained cells over it (a GridConfig list), the setting
    # its values fall back to when that list is empty, and how a value enters the trained cell's config
    setting: str | None = None
    fallback: str | None = None  # a dotted path into the grid's config; None: a cell outside a sweep has no value
    applies: str | Callable | None = None  # a dotted path into the cell's config, or (config, value, grid) -> config
    only: Callable | None = None  # method -> whether the axis is the method's at all (None: every trained one's)
    # value -> whether a cell at it takes every other plain-valued axis at its plain value only (reconstruct fits
    # every parameter of a block to its output: no loss to distill, no subset of parameters); the grid makes no
    # cell of the other combinations
    alone: Callable | None = None

    def of(self, method) -> bool:
        """Whether a trained cell of this method (a methods.Method) is swept over this axis."""
        return self.only is None or self.only(method)

    def read(self, run):
        """The axis' value for a finished cell run, of this version or an older one."""
        if self.tag in run.data.tags:
            text = run.data.tags[self.tag]
            return self.decode(self.aliases.get(text, text))
        value = self.legacy(run) if callable(self.legacy) else self.legacy
        return self.aliases.get(value, value) if isinstance(value, str) else value

    def sweep(self, grid_config) -> list:
        """The values a grid runs its trained cells at."""
        values = getattr(grid_config.grid, self.setting)
        if values:
            return list(values)
        return [get_path(grid_config, tuple(self.fallback.split(".")))] if self.fallback else [None]

    def apply(self, cell_config, value, grid_config):
        """The trained cell's config with this axis at `value` (None: as the grid's config has it)."""
        if value is None:
            return cell_config
        if callable(self.applies):
            return self.applies(cell_config, value, grid_config)
        group, name = self.applies.split(".")
        return replace(cell_config, **{group: replace(getattr(cell_config, group), **{name: value})})


AXES = (
    Axis("method", "cell_method", ROW, 6, sort=lambda m: METHODS[m].order if m in METHODS else 99),
    Axis("kind", "cell_kind", ROW, 2, sort=KINDS.index, aliases={"iterative": "trained"}),
    Axis("target_sparsity", "cell_target", ROW, 1, encode="{:.4f}".format, decode=float),
    Axis("pattern", "cell_pattern", ROW, 0, sort=_pattern_order, legacy="unstructured"),
    Axis(
        "distill",
        "cell_distill",
        ROW,
        3,
        sort=_index_in(DISTILL_MODES),
        legacy=_recovery_before_its_tag,
        aliases={"ce": "none"},
        plain="none",
        style=lambda loss: {"marker": {"none": "o", "logits": "^", "squarehead": "D"}.get(loss, "o")},
        setting="distill",
        applies="train.distill",
    ),
    Axis(
        "train_params",
        "cell_train_params",
        ROW,
        4,
        sort=_index_in(TRAIN_PARAMS),
        legacy="all",
        plain="all",
        style=lambda trains: {"fillstyle": {"all": "full", "norms-biases": "none", "lora": "left"}.get(trains, "full")},
        setting="train_params",
        applies=_trained_parameters,
    ),
    Axis(
        "recovery",
        "cell_recovery_mode",  # not `cell_recovery`: runs before `cell_distill` named their loss so
        ROW,
        4.5,
        sort=_index_in(RECOVERIES),
        legacy="finetune",
        plain="finetune",
        style=lambda mode: {"markeredgewidth": 2.5 if mode == "reconstruct" else 1.0},
        setting="recovery",
        applies=_recovering,
        alone=lambda mode: mode == "reconstruct",
    ),
    Axis(
        "budget",
        "cell_budget",
        ROW,
        5,
        encode=lambda budget: "" if budget is None else str(budget),
        decode=_optional_int,
        word=lambda budget: f"{tokens_text(budget)} tokens",
        setting="budgets",
        applies=_budgeted,
    ),
    Axis(
        "prune_percentage",
        "cell_prune_percentage",
        ROW,
        6.5,
        encode=lambda step: "" if step is None else repr(step),
        decode=_optional_step,
        word=lambda step: f"step {step:g}",
        setting="prune_percentages",
        applies="schedule.prune_percentage",
        only=lambda method: method.prunes_step_by_step,
    ),
    Axis(
        "lr",
        "cell_lr",
        SELECTION,
        7,
        encode=lambda lr: "" if lr is None else repr(lr),
        decode=_optional_float,
        legacy=_lr_before_its_tag,
        describe=lambda lr: f"lr {lr:g}",
        setting="lrs",
        fallback="train.lr",
        applies=_scaled_lr,
    ),
    Axis(
        "seed",
        "cell_seed",
        REPEAT,
        8,
        encode=lambda seed: "" if seed is None else str(seed),
        decode=_optional_int,
        describe=lambda seed: f"seed {seed}",
    ),
)
AXIS = {axis.name: axis for axis in AXES}
ROW_AXES = [axis.name for axis in AXES if axis.role == ROW]  # a table row: one cell over its seeds and lrs
SELECTION_AXES = [axis.name for axis in AXES if axis.role == SELECTION]
RECOVERY_AXES = [axis for axis in AXES if axis.setting]  # the trained cells' grid dimensions
PLAIN_AXES = [axis for axis in AXES if axis.plain is not None]  # the recipe's plain recovery is at each's plain
NAMED_AXES = [axis for axis in AXES if axis.plain is not None or axis.word]  # named in brackets where they differ
COLUMNS = [axis.name for axis in sorted(AXES, key=lambda axis: axis.role != ROW)]  # rows' identity first


def _given(value) -> bool:
    return not (value is None or value == "" or (isinstance(value, float) and math.isnan(value)))


def recovery(values: Mapping) -> str:
    """` [logits]`, ` [lora]`, ` [logits, 328 k tokens]`: a cell's recovery where it is not the plain one, its
    budget and step size where it has them."""
    named = [(a, values.get(a.name, a.plain)) for a in NAMED_AXES]
    parts = [(a.word or str)(value) for a, value in named if _given(value) and value != a.plain]
    return f" [{', '.join(parts)}]" if parts else ""


def combinable(values: Mapping) -> bool:
    """Whether a trained cell's recovery values go together: where one stands alone (reconstruct), every other
    plain-valued axis is at its plain value."""
    value = {a.name: values.get(a.name, a.plain) for a in PLAIN_AXES}
    alone = [a for a in PLAIN_AXES if a.alone is not None and a.alone(value[a.name])]
    return not alone or all(value[a.name] in (a.plain, None) for a in PLAIN_AXES if a not in alone)


def cell_name(values: Mapping) -> str:
    """A cell's method as the grid names it, with its recovery where that is not the plain one:
    `sparsegpt+ft [logits]`."""
    return values["method"] + recovery(values)


def display_name(values: Mapping) -> str:
    """The tables' name of a cell's method, with its recovery where that is not the plain one:
    `SparseGPT + FT [logits, lora]`."""
    known = METHODS.get(values["method"])
    return (known.display if known else values["method"]) + recovery(values)


def is_plain(values: Mapping) -> bool:
    """Whether a cell recovers the plain way (cross-entropy, every parameter): the recipe's dense control is."""
    return all(values.get(a.name, a.plain) == a.plain for a in PLAIN_AXES)


def cell_style(values: Mapping) -> dict:
    """A cell's colour (its criterion's: `wanda` and `wanda+ft` read as one family), marker and fill."""
    known = METHODS.get(values["method"])
    entries = {"color": known.color if known else "C6"}
    for axis in AXES:
        if axis.style is not None:
            entries.update(axis.style(values.get(axis.name, axis.plain)))
    return entries


def sort_keys(table) -> tuple[list, dict]:
    """(columns to sort by, helper columns to add) that put a runs or summary table in the report's order."""
    helpers, by = {}, []
    for axis in sorted(AXES, key=lambda axis: axis.rank):
        if axis.name not in table:
            continue
        if axis.sort is None:
            by.append(axis.name)
        else:
            helpers[f"_{axis.name}"] = table[axis.name].map(axis.sort)
            by.append(f"_{axis.name}")
    return by, helpers
