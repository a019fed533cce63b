"""The Python entry point: `iterative_training_wrapper(config_dict) -> history`, with the keys of the original
IMP script's config dict."""

from __future__ import annotations

from .config import IterativeConfig
from .errors import ConfigError
from .jobs.iterative import run_iterative
from .settings import build, flatten

# The original script's config keys that are not the settings' own keys.
USER_KEYS = {"model_name": "model", "train_steps": "max_steps"}
HUB_OPT = ("facebook/opt-125m", "facebook/opt-350m", "facebook/opt-1.3b", "facebook/opt-2.7b")


def iterative_training_wrapper(config: dict, resume: bool = False) -> list:
    """Runs iterative pruning from a config dict of the original script's keys (model_name, target_sparsity,
    prune_percentage, epochs_per_iteration, max_iterations, batch_size, lr, train_steps, seed, save_model);
    every other setting of `iterative` works too, under its flag's name with underscores.

    Unknown keys are an error naming them: a misspelt key must never silently fall back to a default.
    """
    if not isinstance(config, dict):
        raise ConfigError(
            f"iterative_training_wrapper takes a dict of settings, e.g. {{'model_name': 'opt-tiny', "
            f"'target_sparsity': 0.5}}, not a {type(config).__name__}"
        )
    known = set(USER_KEYS) | {leaf.key for leaf in flatten(IterativeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
    values = {USER_KEYS.get(key, key): value for key, value in config.items()}
    if values.get("model") in HUB_OPT:
        values["model"] = values["model"].split("/")[1]
    return run_iterative(build(IterativeConfig, {**values, "resume": resume or values.get("resume", False)}))
