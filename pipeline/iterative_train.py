"""The Python entry point of SPEC §2: `iterative_training_wrapper(config_dict) -> history`."""

from __future__ import annotations

from dataclasses import fields

from .errors import UserError
from .iterative import IterativeConfig, iterative_command

# The seed's config keys, and the IterativeConfig field each one sets.
SEED_KEYS = {"model_name": "model", "target_sparsity": "target_sparsity", "prune_percentage": "prune_percentage",
             "epochs_per_iteration": "epochs_per_iteration", "max_iterations": "max_iterations",
             "batch_size": "batch_size", "lr": "lr", "train_steps": "max_steps", "seed": "seed",
             "save_model": "save_model"}


def iterative_training_wrapper(config: dict, resume: bool = False) -> list:
    """Runs iterative pruning from a config dict of the seed's keys (any IterativeConfig field works too).

    Unknown keys are an error naming them: a misspelt key must never silently fall back to a default.
    """
    known = set(SEED_KEYS) | {f.name for f in fields(IterativeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"unknown config keys: {', '.join(unknown)}; known keys are {', '.join(sorted(known))}", 2)
    resolved = {SEED_KEYS.get(key, key): value for key, value in config.items()}
    if "model" in resolved and resolved["model"] in ("facebook/opt-125m", "facebook/opt-350m",
                                                       "facebook/opt-1.3b", "facebook/opt-2.7b"):
        resolved["model"] = resolved["model"].split("/")[1]
    return iterative_command(IterativeConfig(**resolved), resume=resume)
