"""The iterative job: one IMP run (imp.py) in its checkpoint directory and its MLflow run, continued
from its last completed iteration with `resume`, and the final model saved."""

from __future__ import annotations

import time
from pathlib import Path

from ..adapters import check_lora
from ..checkpoint import atomic_torch_save, load_checkpoint
from ..config import IterativeConfig, unset_since
from ..distributed import check_launch, is_main_process
from ..errors import ConfigError, UserError, option
from ..imp import ImpRun, planned_schedule
from ..methods import trained_method_of
from ..models import save_model
from ..outputs import check_no_saved_model, check_writable_dir
from ..pruning.masks import prunable_linears
from ..reporting.numbers import change_pct
from ..settings import flat_values
from ..tracking.store import run_in_store, tracking_uri
from ..workload import check_inputs
from ..zeroshot import check_tasks
from . import job_run

# Settings that may differ when resuming: where it runs, and what the README advises changing mid-run.
RESUMABLE_CHANGES = {
    "device",
    "log_models",
    "experiment",
    "save_model",
    "model_dir",
    "log_every",
    "max_iterations",
    "lr",
    "final_lr",
    "resume",
    "overwrite",
}


def config_differences(saved: dict, current: dict) -> list:
    """The settings a checkpoint was made with other than these (a setting that came after it, at its "as
    before" value, is the same)."""
    return sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES
        and saved.get(k) != current.get(k)
        and not (k not in saved and unset_since(k, current.get(k)))
    )


def checkpoint_to_continue(config: IterativeConfig, out: Path) -> dict | None:
    """The checkpoint in `out` when resuming, after checking it was made with these settings."""
    checkpoint = load_checkpoint(out)
    if checkpoint is not None and not config.resume:
        raise ConfigError(
            f"{out} already holds a checkpoint (iteration {checkpoint['iteration']}): pass "
            f"{option('resume')} to continue it, or {option('output_dir')} to start a separate run"
        )
    if checkpoint is not None and checkpoint["run_id"] and not run_in_store(checkpoint["run_id"]):
        raise UserError(
            f"{option('resume')} refused: the checkpoint in {out} continues MLflow run {checkpoint['run_id']}, "
            f"which the tracking store {tracking_uri()} does not hold (it was made with "
            f"{checkpoint.get('tracking_uri', 'another store')}); resume it with that store as "
            f"MLFLOW_TRACKING_URI, or give another {option('output_dir')}; the checkpoint is left as it is"
        )
    if checkpoint is not None:
        differing = config_differences(checkpoint["config"], flat_values(config))
        if differing:
            raise ConfigError(
                f"{option('resume')} refused: the checkpoint in {out} was made with different "
                f"{', '.join(differing)}; use the same settings or another {option('output_dir')}"
            )
    elif config.resume:
        print(f"no checkpoint in {out}: starting from the beginning")
    return checkpoint


def check_rewind_point(config: IterativeConfig) -> None:
    """iteration:K rewinds to the weights after iteration K, so some iteration must follow K."""
    point, iterations = config.rewind_iteration, len(planned_schedule(config.schedule)[0])
    if point and point >= iterations:
        valid = f"use K from 1 to {iterations - 1}" if iterations > 1 else "use dense or none"
        raise ConfigError(
            f"{option('rewind')} iteration:{point} rewinds to the weights after iteration {point}, but the schedule "
            f"has {iterations} iteration{'s' if iterations > 1 else ''}: {valid}"
        )


def checks(config: IterativeConfig):
    check_rewind_point(config)
    if is_main_process() and config.save_model:
        check_writable_dir(config.resolved("model_dir"), "model_dir")
        # a resumed run replaces what it saved itself, if it had got that far
        check_no_saved_model(config.resolved("model_dir"), config.saved_model.overwrite or config.resume, "model_dir")
    inputs = check_inputs(
        config.model,
        config.data,
        eval_split=(config.eval_split, "validation") if config.validate else config.eval_split,
        training=True,
        train_seqlen=config.resolved("train_seqlen"),
        prune=config.prune,
    )
    if config.train.train_params == "lora":
        linears = prunable_linears(inputs.skeleton, config.prune.include, config.prune.exclude)
        check_lora(linears, config.train.lora_rank, config.train.lora_targets)
    check_tasks(config.tasks)
    return inputs


def save_final_model(imp: ImpRun, config: IterativeConfig) -> list:
    """`pruned_models/<model>-iterative-<target>.pt` (a state dict, as the original script saved it) and a
    save_pretrained directory beside it, read back; the directory is the run's `model` artifact (and a
    registered version, if asked)."""
    stem = Path(config.resolved("model_dir"))
    state_file = stem.parent / f"{stem.name}.pt"  # not with_suffix: "0.90" would be taken for a suffix
    atomic_torch_save({k: v.detach().cpu() for k, v in imp.model.state_dict().items()}, state_file)
    save_model(imp.model, imp.work.tokenizer, stem)
    final = imp.history[-1]
    imp.tracker.log_model_dir(
        stem,
        config.saved_model.register_model,
        {
            "sparsity": final["sparsity"],
            "perplexity": final["ppl_after_train"],
            "method": config.prune.method,
            "schedule": config.schedule.schedule,
        },
    )
    return [state_file, stem]


def final_metrics(history: list) -> dict:
    """The run's summary; train_tokens/steps/flops need none: their last point (step = the last iteration)
    is the run's total."""
    base, final = history[0]["ppl_after_train"], history[-1]
    return {
        "final_perplexity": final["ppl_after_train"],
        "final_sparsity": final["sparsity"],
        "vs_unpruned_pct": change_pct(final["ppl_after_train"], base),
        "total_seconds": sum(h["iteration_seconds"] for h in history),
    }


def print_summary(history: list, model_paths: list) -> None:
    base, final = history[0]["ppl_after_train"], history[-1]
    print("\n" + "=" * 60)
    print("Iterative pruning complete")
    print(f"  Total iterations: {len(history) - 1}")
    print(f"  Final sparsity:   {final['sparsity']:.2%}")
    print(f"  Unpruned perplexity: {base:.2f}")
    print("  History:")
    print(f"    {'iter':>4} {'sparsity':>9} {'ppl pruned':>11} {'ppl trained':>12} {'recovery':>9}")
    for h in history:
        print(
            f"    {h['iteration']:>4} {h['sparsity']:>9.2%} {h['ppl_after_prune']:>11.2f} "
            f"{h['ppl_after_train']:>12.2f} {h['recovery_pct']:>8.1f}%"
        )
    print(
        f"  Final perplexity: {final['ppl_after_train']:.2f} "
        f"(vs Unpruned: {change_pct(final['ppl_after_train'], base):+.1f}%)"
    )
    for path in model_paths:
        print(f"  Model saved to {path}")
    print("=" * 60)


def run_iterative(config: IterativeConfig, tags: dict | None = None, shared_pruning: Path | None = None) -> list:
    """Checks, then the IMP run in one MLflow run (reopened when resuming), the checkpoint directory owned by
    this run throughout; returns the history (entry 0: the unpruned model). `shared_pruning`: a directory
    where the first pruning step is shared with other runs that would prune the same (shared_pruning.py)."""
    check_launch(config.train.batch_size)  # first, on every process alike, before the launcher stops them
    started = time.perf_counter()
    out = Path(config.resolved("output_dir"))
    name = (
        f"iterative {config.prune.method} {Path(config.model.model).name} {config.data.dataset} "
        f"-> {config.schedule.target_sparsity:.2f}"
    )
    with job_run(
        name,
        params=flat_values(config),
        tags={
            "model": config.model.model,
            "dataset": config.data.dataset,
            "method": config.prune.method,
            "kind": "iterative",
            **(tags or {}),
        },
        tracking=config.tracking,
        output_dir=out,
        checks=lambda: checks(config),
        resume=lambda directory: checkpoint_to_continue(config, directory),
        stop_hint=f"Stopped. Completed iterations are saved in {out}; continue with the same settings "
        f"plus {option('resume')}",
        fault_hint=f"lower {option('lr')} (resuming may change it) and rerun with {option('resume')}",
    ) as job:
        method = (tags or {}).get("cell_method") or method_of_run(config)
        imp = ImpRun.create(config, job.tracker, out, job.resumed, job.inputs, shared_pruning, method)
        earlier = sum(entry["iteration_seconds"] for entry in imp.history)  # what the processes before ran
        history = imp.run()
        model_paths = save_final_model(imp, config) if config.save_model and is_main_process() else []
        # the final model's LoggedModel (with --log-models every, the last iteration's, logged already)
        final = None
        if config.save_model and config.saved_model.log_models != "none":
            final = imp.log_model(history[-1]["iteration"], Path(config.resolved("model_dir")))
        job.tracker.log_dict(final_metrics(history), model=final, dataset=imp.eval_dataset)
        if config.validate:
            validation = imp.work.evaluate("validation").perplexity
            print(f"Final perplexity on the validation split: {validation:.2f}")
            dataset = imp.work.dataset_of("validation")
            job.tracker.log_dict({"final_val_perplexity": validation}, model=final, dataset=dataset)
        # the cell's own time: this process's and the restored iterations', not the time between a stop and a
        # resume, which the MLflow run's start and end include
        job.tracker.log_dict({"cell_seconds": earlier + time.perf_counter() - started})
        print_summary(history, model_paths)
    return history


def method_of_run(config: IterativeConfig) -> str:
    """The grid method an iterative run's settings make: `iterative`, `X+ft` for a one-shot schedule,
    `dense+ft` for one that never prunes (what its LoggedModels are named after outside a grid)."""
    return trained_method_of(config.schedule.schedule, config.prune.method, config.prune.sparsity_profile)
