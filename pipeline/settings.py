"""Settings: every option is declared once, as a dataclass field with its default, help text and checks.

    lr: float = setting(1e-5, "AdamW learning rate", above=0)

Configs nest by concern: a job's config holds a ModelConfig, a TrainConfig, ... as `group` fields,
which may rename, leave out or re-default the group's settings for that job. `flatten` lists every
leaf under its flat key (`lr`, `prune_method`): the CLI makes a flag of each key (`--lr`), the Python
API takes the keys, MLflow records them as params. A config checks its values when it is built, so a
bad value fails before any work, with a ConfigError naming the setting; floats must be finite.

A default that depends on something else (the model's positions, another setting) is a `rule`: a
function declared with the setting, whose docstring `--help` prints and which `config.resolved(name)`
applies, so the rule is written once. The setting's own value stays unset (None) in the config and in
the run's params: the rule's result is the resolved value, logged where it matters.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache

from .errors import ConfigError, option, spell


class Tokens(int):
    """A count of tokens, written whole or with a k or M suffix: 80k is 80000, 1.3M is 1300000."""

    SUFFIXES = {"": 1, "k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}

    def __new__(cls, value):
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*", value)
            if not match:
                raise ValueError(f"'{value}' is not a count of tokens (e.g. 80000, 80k, 1.3M)")
            number = float(match[1]) * cls.SUFFIXES[match[2]]
            if not number.is_integer():
                raise ValueError(f"'{value}' is not a whole number of tokens")
            value = number
        return super().__new__(cls, value)


@dataclass(frozen=True)
class Check:
    help: str
    choices: tuple | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    hint: str | None = None  # appended to a range error: what a good value looks like
    noun: str | None = None  # "pruning method" in "unknown pruning method 'x'"
    cli: bool = True  # False: set from Python only, no flag
    negatable: bool = False  # a bool flag with a --no- form
    argument: bool = False  # a positional argument on the command line
    min_items: int = 0  # lists: at least this many values
    rule: typing.Callable | None = None  # computes the default from the config (and context); its docstring says how
    aliases: tuple = ()  # older spellings of the flag that still work
    value_aliases: dict | None = None  # older spellings of values: {"ce": "none"}

    @property
    def help_text(self) -> str:
        """The help, with the default's rule when there is one."""
        return self.help + (f" (default: {self.rule.__doc__.strip()})" if self.rule else "")


def setting(default, help: str, **checks):
    """A leaf setting: its default (or, with `rule`, None and the function that computes it), its help text
    and the checks its values must pass."""
    if "choices" in checks and checks["choices"] is not None:
        checks["choices"] = tuple(checks["choices"])
    for name in ("aliases",):
        checks[name] = tuple(checks.get(name, ()))
    metadata = {"check": Check(help, **checks)}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Group:
    cls: type
    rename: dict
    exclude: tuple
    defaults: dict
    aliases: dict


def group(cls, *, rename: dict | None = None, exclude=(), defaults: dict | None = None, aliases: dict | None = None):
    """A nested config. `rename` gives a setting another key here (`method` -> `prune_method`),
    `exclude` keeps settings out of this job's flags, `defaults` changes defaults for this job,
    `aliases` keeps older spellings of a key working ({"prune_method": ("method",)})."""
    spec = Group(cls, dict(rename or {}), tuple(exclude), dict(defaults or {}), dict(aliases or {}))
    return field(default_factory=lambda: cls(**spec.defaults), metadata={"group": spec})


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def kind_of(hint) -> tuple[type, bool, type | None]:
    """(base type, optional, item type of a list) of a field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        base, _, item = kind_of(next(a for a in args if a is not type(None)))
        return base, True, item
    if origin is list:
        return list, False, args[0]
    return hint, False, None


def _number(value) -> str:
    """A whole number exactly (a seed of 2^64 must not read as 1.84467e+19), any other briefly."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_error(name: str, value, check: Check) -> str | None:
    low = (check.at_least, False) if check.at_least is not None else (check.above, True)
    high = (check.at_most, False) if check.at_most is not None else (check.below, True)
    fine = (low[0] is None or (value > low[0] if low[1] else value >= low[0])) and (
        high[0] is None or (value < high[0] if high[1] else value <= high[0])
    )
    if fine:
        return None
    if low[0] is not None and high[0] is not None:
        interval = f"{'(' if low[1] else '['}{_number(low[0])}, {_number(high[0])}{')' if high[1] else ']'}"
        message = f"{name} {_number(value)} is outside {interval}"
    elif low[0] is not None:
        bound = "positive" if (low[0] == 0 and low[1]) else f"{'above' if low[1] else 'at least'} {_number(low[0])}"
        message = f"{name} must be {bound}, got {_number(value)}"
    else:
        message = f"{name} must be {'below' if high[1] else 'at most'} {_number(high[0])}, got {_number(value)}"
    return message + (f": {check.hint}" if check.hint else "")


def _scalar(name: str, base: type, value, check: Check):
    if base is Tokens:
        try:
            value = int(Tokens(value)) if isinstance(value, str) else value
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
        base = int
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if base is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    elif base is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be text, got {value!r}")
    if check.value_aliases and value in check.value_aliases:
        value = check.value_aliases[value]
    if check.choices is not None and value not in check.choices:
        raise ConfigError(
            f"unknown {check.noun or name} '{value}' ({name}): use one of {', '.join(map(str, check.choices))}"
        )
    if base in (int, float):
        message = _range_error(name, value, check)
        if message:
            raise ConfigError(message)
    return value


def checked(cls, f: dataclasses.Field, value):
    """`value` for field `f` of `cls`, converted (1.0 -> 1 for an int) and checked."""
    check = f.metadata["check"]
    base, optional, item = kind_of(_hints(cls)[f.name])
    name = option(f.name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} needs a value")
    if base is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        values = list(dict.fromkeys(_scalar(name, item, v, check) for v in value))  # each value once, in order
        if len(values) < check.min_items:
            raise ConfigError(f"{name} is empty" + (f": {check.hint}" if check.hint else ""))
        return values
    return _scalar(name, base, value, check)


class Settings:
    """Base of every config: checks its settings when it is built (dataclasses call __post_init__)."""

    def __post_init__(self):
        for f in fields(self):
            if "check" in f.metadata:
                setattr(self, f.name, checked(type(self), f, getattr(self, f.name)))
            elif "group" in f.metadata and not isinstance(getattr(self, f.name), f.metadata["group"].cls):
                raise TypeError(f"{type(self).__name__}.{f.name} must be a {f.metadata['group'].cls.__name__}")
        self.check()

    def check(self) -> None:
        """Rules between settings; raises ConfigError."""

    def resolved(self, name: str, *context):
        """The setting's value, or when it is unset the value its rule computes from this config (and
        `context`, e.g. the model whose positions bound the window)."""
        value = getattr(self, name)
        if value is None:
            rule = next(f for f in fields(self) if f.name == name).metadata["check"].rule
            if rule is not None:
                return rule(self, *context)
        return value


# --- flat keys: what the CLI, the Python API and MLflow params see --------------------------------


@dataclass(frozen=True)
class Leaf:
    key: str  # flat key: `--key-with-dashes` on the command line
    path: tuple  # attribute path into the nested config, e.g. ("prune", "method")
    name: str  # the field's name in its own config
    owner: type
    check: Check
    base: type
    optional: bool
    item: type | None
    default: object
    aliases: tuple = ()  # older flag keys of this setting


def _field_default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _walk(cls, path: tuple, rename: dict, exclude: tuple, defaults: dict, aliases: dict):
    for f in fields(cls):
        if f.name in exclude:
            continue
        if "group" in f.metadata:
            spec = f.metadata["group"]
            yield from _walk(spec.cls, path + (f.name,), spec.rename, spec.exclude, spec.defaults, spec.aliases)
        elif "check" in f.metadata:
            base, optional, item = kind_of(_hints(cls)[f.name])
            default = defaults[f.name] if f.name in defaults else _field_default(f)
            key, check = rename.get(f.name, f.name), f.metadata["check"]
            yield Leaf(
                key,
                path + (f.name,),
                f.name,
                cls,
                check,
                base,
                optional,
                item,
                default,
                check.aliases + tuple(aliases.get(key, ())),
            )


@cache
def flatten(cls) -> tuple[Leaf, ...]:
    """Every leaf setting of a config class, in declaration order; two leaves never share a key."""
    leaves = tuple(_walk(cls, (), {}, (), {}, {}))
    seen = {}
    for leaf in leaves:
        for key in (leaf.key, *leaf.aliases):
            if key in seen:
                raise TypeError(
                    f"{cls.__name__}: settings {'.'.join(seen[key])} and {'.'.join(leaf.path)} "
                    f"both have the key '{key}'"
                )
            seen[key] = leaf.path
    return leaves


def _assemble(cls, path: tuple, given: dict, defaults: dict, rename: dict):
    kwargs = {}
    for f in fields(cls):
        if "group" in f.metadata:
            spec = f.metadata["group"]
            kwargs[f.name] = _assemble(spec.cls, path + (f.name,), given, spec.defaults, spec.rename)
        elif path + (f.name,) in given:
            kwargs[f.name] = given[path + (f.name,)]
        elif f.name in defaults:
            kwargs[f.name] = defaults[f.name]
    try:
        return cls(**kwargs)
    except ConfigError as error:  # name the setting by its key here: `method` is `prune_method` in iterative
        renamed = spell(error.template, lambda name: option(rename.get(name, name)))
        raise ConfigError(renamed) from None


def build(cls, values: dict):
    """A config of class `cls` from flat keys; missing keys take their defaults, unknown keys are an error."""
    presets = getattr(cls, "PRESETS", {})
    if values.get("preset") in presets:  # a preset's values, unless given
        values = {**presets[values["preset"]], **values}
    leaves = {leaf.key: leaf for leaf in flatten(cls)}
    older = {alias: leaf.key for leaf in leaves.values() for alias in leaf.aliases}  # older spellings still work
    both = sorted(key for key in values if key in older and older[key] in values)
    if both:
        raise ConfigError(f"{', '.join(both)} and {', '.join(older[key] for key in both)} are one setting: give one")
    values = {older.get(key, key): value for key, value in values.items()}
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}; known ones are {', '.join(sorted(leaves))}")
    return _assemble(cls, (), {leaves[key].path: value for key, value in values.items()}, {}, {})


def default_of(cls, name: str):
    """The declared default of setting `name` of config class `cls`."""
    return _field_default(next(f for f in fields(cls) if f.name == name))


def get_path(config, path: tuple):
    for name in path:
        config = getattr(config, name)
    return config


def flat_values(config) -> dict:
    """Key -> value of every leaf setting of a built config (what a run records as MLflow params)."""
    return {leaf.key: get_path(config, leaf.path) for leaf in flatten(type(config))}
