"""The iterative magnitude pruning loop (Han et al. 2015; the user's recipe in the README):

    for k in 1..n:  prune to targets[k]  ->  ppl_after_prune  ->  train  ->  ppl_after_train

`run_iteration` is the loop's body and returns the iteration's record; `run_imp` is the loop. What must
happen after an iteration (a checkpoint, tracking, timing) is the caller's, passed in as a callback,
so the loop knows nothing of files or MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import TrainConfig
from .distributed import sync_from_main
from .pruning.masks import sparsity_of
from .training import train_keeping_masks

# One point per iteration of each (step = iteration; step 0 is the unpruned model). The train_* budget is
# cumulative: tokens that went into optimizer steps (all processes), optimizer steps, and their FLOPs.
ITERATION_METRICS = ("sparsity", "ppl_after_prune", "ppl_after_train", "recovery_pct", "train_loss",
                     "iteration_seconds", "train_seconds", "lr", "train_tokens", "train_steps", "train_flops")


@dataclass
class ImpPlan:
    targets: list                                  # the sparsity each iteration prunes to
    prune_to: Callable[[float], None]              # prunes the model to a sparsity; a zero stays a zero
    evaluate: Callable[[], float]                  # perplexity of the model as it is now
    train_config: Callable[[int], TrainConfig]     # iteration k's recovery training
    teacher: nn.Module | None = None               # the frozen model a distilling recovery learns from
    before_training: Callable[[int], None] | None = None  # e.g. rewinding the surviving weights


def dense_record(sparsity: float, perplexity: float, seconds: float) -> dict:
    """Iteration 0: the unpruned model, as the history's first entry."""
    return {"iteration": 0, "sparsity": sparsity, "ppl_after_prune": perplexity, "ppl_after_train": perplexity,
            "recovery_pct": 0.0, "train_loss": float("nan"), "iteration_seconds": seconds, "train_seconds": 0.0,
            "lr": 0.0, "train_tokens": 0, "train_steps": 0, "train_flops": 0.0}


@torch.no_grad()
def rewind_weights(model: nn.Module, linears: dict, state: dict) -> None:
    """Every weight back to its value in `state`, keeping the zeros pruning has just made: the surviving
    weights rewound, the mask the current one (taken from the trained weights)."""
    masks = {name: module.weight != 0 for name, module in linears.items()}
    model.load_state_dict(state)
    for name, module in linears.items():
        module.weight.mul_(masks[name])


def recovery_pct(ppl_after_prune: float, ppl_after_train: float) -> float:
    """(ppl_after_prune - ppl_after_train) / ppl_after_prune, in percent: 32.45 -> 28.67 is 11.7%."""
    return 100.0 * (ppl_after_prune - ppl_after_train) / ppl_after_prune


def run_iteration(k: int, model: nn.Module, linears: dict, blocks: torch.Tensor, plan: ImpPlan, previous: dict,
                  on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Prune to targets[k-1], evaluate, train with the mask kept, evaluate; returns the iteration's record.
    A pruning step that changes nothing (one-shot's later iterations, dense) is not evaluated again."""
    started = time.perf_counter()
    before = sparsity_of(linears)
    plan.prune_to(plan.targets[k - 1])
    sync_from_main(model)  # every process holds the main one's mask, whatever its own calibration gave
    sparsity = sparsity_of(linears)
    ppl_pruned = plan.evaluate() if sparsity != before else previous["ppl_after_train"]
    print(f"Pruned: sparsity {before:.2%} -> {sparsity:.2%}; perplexity after pruning {ppl_pruned:.2f}")
    if plan.before_training is not None:
        plan.before_training(k)
    config = plan.train_config(k)
    result = train_keeping_masks(model, linears, blocks, config, teacher=plan.teacher, desc=f"Iteration {k}",
                                 on_log=on_step)
    ppl_trained = plan.evaluate()
    return {"iteration": k, "sparsity": sparsity, "ppl_after_prune": ppl_pruned, "ppl_after_train": ppl_trained,
            "recovery_pct": recovery_pct(ppl_pruned, ppl_trained), "train_loss": result.final_loss,
            "iteration_seconds": time.perf_counter() - started, "train_seconds": result.seconds,
            "lr": config.lr, "train_tokens": previous["train_tokens"] + result.tokens,
            "train_steps": previous["train_steps"] + result.steps,
            "train_flops": previous["train_flops"] + result.flops}


def run_imp(model: nn.Module, linears: dict, blocks: torch.Tensor, plan: ImpPlan, history: list,
            on_iteration: Callable[[dict], None], on_step: Callable[[int], Callable] | None = None) -> list:
    """Runs the iterations the history (entry 0: the unpruned model) does not hold yet, calling
    `on_iteration(record)` after each and `on_step(k)(step, metrics)` as iteration k trains."""
    n = len(plan.targets)
    for k in range(len(history), n + 1):
        print(f"\n{'=' * 20} Iteration {k}/{n} {'=' * 20}")
        record = run_iteration(k, model, linears, blocks, plan, history[-1], on_step(k) if on_step else None)
        history.append(record)
        on_iteration(record)
        done = [h["iteration_seconds"] for h in history[1:]]
        remaining = (n - k) * sum(done) / len(done)
        print(f"Iteration {k}: perplexity {record['ppl_after_prune']:.2f} -> {record['ppl_after_train']:.2f} after "
              f"training (recovery {record['recovery_pct']:.1f}%), {record['iteration_seconds']:.0f}s; "
              f"about {remaining / 60:.1f} min left")
    return history
