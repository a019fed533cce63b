"""The iterative job: the IMP loop of imp.py with a checkpoint after every iteration and one MLflow run.

After every iteration the weights, masks, history, RNG states, config and MLflow run id are written
atomically to the output directory; `resume` continues from the last completed iteration, in the
same MLflow run, logging no step twice.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import atomic_torch_save, load_checkpoint, restore_rng_state, save_checkpoint
from ..config import IterativeConfig, ScheduleConfig
from ..distributed import check_launch, is_main_process
from ..errors import ConfigError, UserError, option, sigterm_as_interrupt
from ..imp import ITERATION_METRICS, ImpPlan, dense_record, rewind_weights, run_imp
from ..models import save_model
from ..outputs import check_writable_dir, owned_output_dir
from ..perplexity import change_pct
from ..pruning import prune_model
from ..pruning.masks import already_at, model_masks, prunable_linears, sparsity_of
from ..schedules import learning_rate_for, sparsity_schedule
from ..settings import flat_values
from ..tracking import tracked_run
from ..tracking.store import check_tracking_store
from ..training import NonFiniteLoss, steps_per_epoch
from ..workload import Inputs, check_inputs, load_workload
from ..zeroshot import check_tasks, log_tasks

# Settings that may differ when resuming: where it runs, and what the README advises changing mid-run.
RESUMABLE_CHANGES = {"device", "experiment", "save_model", "model_dir", "log_every", "max_iterations", "lr",
                     "final_lr", "resume"}


def output_dir_of(config: IterativeConfig) -> Path:
    if config.output_dir:
        return Path(config.output_dir)
    dataset = config.data.dataset.replace("text:", "text-").replace("/", "_")
    return Path("checkpoints") / (f"{Path(config.model.model).name}-{dataset}-iterative-{config.prune.method}-"
                                  f"{config.prune.scope}-{config.schedule.schedule}-"
                                  f"{config.schedule.target_sparsity:.2f}")


def planned_schedule(schedule: ScheduleConfig) -> tuple[list, int]:
    """(per-iteration sparsity targets after the max_iterations cap, uncapped iteration count)."""
    full = sparsity_schedule(schedule.schedule, schedule.target_sparsity, schedule.prune_percentage)
    return full[: schedule.max_iterations], len(full)


def config_differences(saved: dict, current: dict) -> list:
    return sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


def _backfill(logger, history: list) -> None:
    """Logs the history entries a kill kept out of MLflow (checkpoint written, metrics not yet sent)."""
    present = logger.logged_steps("ppl_after_train")
    for entry in history:
        if entry["iteration"] not in present:
            _log_iteration(logger, entry)
    logger.flush()


def _final_metrics(history: list) -> dict:
    base, final = history[0]["ppl_after_train"], history[-1]
    return {"final_perplexity": final["ppl_after_train"], "final_sparsity": final["sparsity"],
            "vs_unpruned_pct": change_pct(final["ppl_after_train"], base),
            "total_seconds": sum(h["iteration_seconds"] for h in history)}
    # train_tokens/steps/flops: their last point (step = the last iteration) is the run's total


def _log_iteration(logger, entry: dict) -> None:
    """The iteration's metrics at step = iteration, and the perplexity against the training tokens so far
    (`ppl_at_tokens`, from the first pruning step at 0 tokens on), so the UI overlays runs of one budget
    (iterative, one-shot + training, dense + training) on one axis."""
    logger.log_dict({key: entry[key] for key in ITERATION_METRICS if key in entry}, step=entry["iteration"])
    if entry["iteration"] == 1:
        logger.log_dict({"ppl_at_tokens": entry["ppl_after_prune"]}, step=0)
    if entry["iteration"] >= 1:
        logger.log_dict({"ppl_at_tokens": entry["ppl_after_train"]}, step=int(entry["train_tokens"]))


def _print_summary(history: list, model_paths: list) -> None:
    base, final = history[0]["ppl_after_train"], history[-1]
    print("\n" + "=" * 60)
    print("Iterative pruning complete")
    print(f"  Total iterations: {len(history) - 1}")
    print(f"  Final sparsity:   {final['sparsity']:.2%}")
    print(f"  Unpruned perplexity: {base:.2f}")
    print("  History:")
    print(f"    {'iter':>4} {'sparsity':>9} {'ppl pruned':>11} {'ppl trained':>12} {'recovery':>9}")
    for h in history:
        print(f"    {h['iteration']:>4} {h['sparsity']:>9.2%} {h['ppl_after_prune']:>11.2f} "
              f"{h['ppl_after_train']:>12.2f} {h['recovery_pct']:>8.1f}%")
    print(f"  Final perplexity: {final['ppl_after_train']:.2f} "
          f"(vs Unpruned: {change_pct(final['ppl_after_train'], base):+.1f}%)")
    for path in model_paths:
        print(f"  Model saved to {path}")
    print("=" * 60)


def final_model_dir(config: IterativeConfig) -> Path:
    return Path(config.model_dir or Path("pruned_models") / f"{Path(config.model.model).name}-iterative-"
                                                           f"{config.schedule.target_sparsity:.2f}")


def save_final_model(work, config: IterativeConfig, logger, history: list) -> list:
    """`pruned_models/<model>-iterative-<target>.pt` (a state dict, as the user's script saved it) and a
    save_pretrained directory beside it, read back; the directory is the run's `model` artifact (and a
    registered version, if asked)."""
    stem = final_model_dir(config)
    state_file = stem.parent / f"{stem.name}.pt"  # not with_suffix: "0.90" would be taken for a suffix
    atomic_torch_save({k: v.detach().cpu() for k, v in work.model.state_dict().items()}, state_file)
    save_model(work.model, work.tokenizer, stem)
    logger.log_model_dir(stem, config.registry.register_model,
                         {"sparsity": history[-1]["sparsity"], "perplexity": history[-1]["ppl_after_train"],
                          "method": config.prune.method, "schedule": config.schedule.schedule})
    return [state_file, stem]


def _announce(schedule: ScheduleConfig, targets: list, uncapped: int) -> None:
    n = len(targets)
    if n < uncapped:
        print(f"note: the cap of {schedule.max_iterations} iterations stops the run after {n} of the {uncapped} "
              f"iterations needed: it will reach {targets[-1]:.2%} sparsity, not {schedule.target_sparsity:.2%}")
    if schedule.schedule in ("geometric", "cubic"):
        print(f"{schedule.schedule} schedule: {n} iterations to {targets[-1]:.2%} sparsity "
              f"(pruning {schedule.prune_percentage:.0%} of the remaining weights per iteration)")
    else:
        print(f"{schedule.schedule} schedule: {'pruned to ' + format(targets[-1], '.2%') + ' at once' if targets[-1] else 'never pruned'}, "
              f"then {n} iterations of training (as many as pruning {schedule.prune_percentage:.0%} of the remaining "
              "weights per iteration would take)")


def _restore(checkpoint: dict, model, linears: dict, out: Path) -> list:
    """Loads the checkpoint's weights and RNG states into place; returns its history."""
    model.load_state_dict(checkpoint["model"])
    for name, mask in checkpoint["masks"].items():
        if not torch.equal(linears[name].weight.detach().cpu() != 0, mask):
            raise UserError(f"checkpoint in {out} is inconsistent: the mask of {name} does not match "
                            "its weights; delete it to start over")
    restore_rng_state(checkpoint["rng"])
    return checkpoint["history"]


class Rewind:
    """The rewind point of `config.rewind` and its use: before iteration k trains, after the point."""

    def __init__(self, config: IterativeConfig, out: Path, start):
        self.iteration = config.rewind_iteration
        self.path = out / f"rewind-iteration-{self.iteration}.pt"  # iteration:K's weights, for resuming
        self.state = None
        if self.iteration == 0:  # the starting model's own tensors: it is never trained, so no second copy
            self.state = start.state_dict()
        elif self.iteration is not None and self.path.exists():
            self.state = torch.load(self.path, map_location="cpu", weights_only=True)

    def remember(self, iteration: int, model) -> None:
        if self.iteration and iteration == self.iteration:
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if is_main_process():
                atomic_torch_save(self.state, self.path)

    def __call__(self, k: int, model, linears: dict) -> None:
        if self.state is not None and k > self.iteration:
            rewind_weights(model, linears, self.state)
            print(f"Rewound the surviving weights to {'the dense model' if self.iteration == 0 else f'iteration {self.iteration}'}")


def _step_logger(logger, steps_per_iteration: int) -> Callable[[int], Callable]:
    """on_step(k): logs iteration k's training steps at global step numbers, none twice after a resume."""
    already_logged = max(logger.logged_steps("train_step_loss"), default=0)

    def on_step(k: int):
        offset = (k - 1) * steps_per_iteration

        def log_step(step: int, metrics: dict) -> None:
            if offset + step > already_logged:
                names = {"loss": "train_step_loss", "lr": "train_lr"}  # and the loss's parts as they are
                logger.log_dict({names.get(k, k): v for k, v in metrics.items()}, step=offset + step)
        return log_step
    return on_step


def iterate(config: IterativeConfig, logger, checkpoint: dict | None = None,
            on_iteration: Callable[[dict], None] | None = None, inputs: Inputs | None = None) -> list:
    """Runs (or continues, from `checkpoint`) the IMP loop in `logger`'s run; returns the history (entry 0
    is the unpruned model). `on_iteration(entry)` runs once an iteration is checkpointed and logged."""
    out = output_dir_of(config)
    targets, uncapped = planned_schedule(config.schedule)
    _announce(config.schedule, targets, uncapped)
    work = load_workload(config.model, config.data, inputs, training=True)
    logger.set_tags(work.corpus.describe())
    blocks = work.training_blocks(config.train_seqlen)
    linears = prunable_linears(work.model, config.prune.include, config.prune.exclude)
    windows, calibration = work.calibration(config.prune)
    work.record_inputs(logger, evaluation=config.eval_split, training=blocks, calibration=(windows, calibration))
    resolved = flat_values(config)

    def evaluate() -> float:
        return work.evaluate(config.eval_split).perplexity

    def after_iteration(entry: dict) -> None:
        k = entry["iteration"]
        rewind.remember(k, work.model)
        if is_main_process():
            save_checkpoint(out, model_state=work.model.state_dict(), masks=model_masks(linears), iteration=k,
                            history=history, config=resolved, run_id=logger.run_id)
        _log_iteration(logger, entry)
        every = config.eval_tasks_every
        if config.tasks.tasks and is_main_process() and (k == len(targets) or (every and k % every == 0)):
            log_tasks(logger, work.model, work.tokenizer, config.tasks, step=k,
                      artifact=f"lm_eval/iteration-{k}.json")
        logger.flush()
        if on_iteration is not None:
            on_iteration(entry)

    # the starting model: the teacher a distilling recovery learns from, and the `dense` rewind point
    start = copy.deepcopy(work.model) if config.train.distill != "none" or config.rewind == "dense" else None
    rewind = Rewind(config, out, start)

    if checkpoint is None:
        started = time.perf_counter()
        history = [dense_record(sparsity_of(linears), evaluate(), time.perf_counter() - started)]
        print(f"Iteration 0 (unpruned): perplexity {history[0]['ppl_after_train']:.2f}")
        after_iteration(history[0])
    else:
        history = _restore(checkpoint, work.model, linears, out)
        _backfill(logger, history)
        print(f"Resuming after iteration {checkpoint['iteration']} at {history[-1]['sparsity']:.2%} sparsity "
              f"(perplexity {history[-1]['ppl_after_train']:.2f})")

    final_lr = config.schedule.final_lr or config.train.lr

    def prune_to(sparsity: float) -> None:
        if not already_at(linears, sparsity, config.prune.scope):  # one-shot prunes once, dense never
            prune_model(work.model, replace(config.prune, sparsity=sparsity), windows, work.device)

    plan = ImpPlan(
        targets,
        prune_to=prune_to,
        evaluate=evaluate,
        train_config=lambda k: replace(config.train, lr=learning_rate_for(k, len(targets), config.train.lr, final_lr),
                                       seed=config.train.seed + 1000 * k),
        teacher=start if config.train.distill != "none" else None,
        before_training=lambda k: rewind(k, work.model, linears))
    steps_per_iteration = steps_per_epoch(blocks.shape[0], config.train) * config.train.epochs
    try:
        run_imp(work.model, linears, blocks, plan, history, after_iteration,
                _step_logger(logger, steps_per_iteration))
    except NonFiniteLoss as fault:
        k = len(history)
        raise UserError(f"iteration {k} stopped: the training loss became {fault.loss} at step {fault.step} "
                        f"(lr {plan.train_config(k).lr:g}); the checkpoint of iteration {k - 1} in {out} is "
                        f"intact: lower {option('lr')} (resuming may change it) and rerun with "
                        f"{option('resume')}") from None

    model_paths = save_final_model(work, config, logger, history) if config.save_model and is_main_process() else []
    logger.log_dict(_final_metrics(history))
    _print_summary(history, model_paths)
    return history


def _checkpoint_to_continue(config: IterativeConfig, out: Path) -> dict | None:
    """The checkpoint in `out` when resuming, after checking it was made with these settings."""
    checkpoint = load_checkpoint(out)
    if checkpoint is not None and not config.resume:
        raise ConfigError(f"{out} already holds a checkpoint (iteration {checkpoint['iteration']}): pass "
                          f"{option('resume')} to continue it, or {option('output_dir')} to start a separate run")
    if checkpoint is not None:
        differing = config_differences(checkpoint["config"], flat_values(config))
        if differing:
            raise ConfigError(f"{option('resume')} refused: the checkpoint in {out} was made with different "
                              f"{', '.join(differing)}; use the same settings or another {option('output_dir')}")
    elif config.resume:
        print(f"no checkpoint in {out}: starting from the beginning")
    return checkpoint


def run_iterative(config: IterativeConfig, tags: dict | None = None) -> list:
    """The iterative job: checks, then the IMP loop in one MLflow run (reopened when resuming), the output
    directory owned by this run throughout."""
    check_launch(config.train.batch_size)
    main = is_main_process()
    out = check_writable_dir(output_dir_of(config)) if main else output_dir_of(config)
    if main and config.save_model:
        check_writable_dir(final_model_dir(config), "model_dir")
    check_tracking_store()
    inputs = check_inputs(config.model, config.data, eval_split=config.eval_split, training=True,
                          train_seqlen=config.train_seqlen, prune=config.prune)  # bad input opens no run
    check_tasks(config.tasks)
    params = {**flat_values(config), "output_dir": str(out)}
    name = (f"iterative {config.prune.method} {Path(config.model.model).name} {config.data.dataset} "
            f"-> {config.schedule.target_sparsity:.2f}")
    tags = {"model": config.model.model, "dataset": config.data.dataset, "method": config.prune.method,
            "kind": "iterative", **(tags or {})}
    try:
        with sigterm_as_interrupt(), owned_output_dir(out) if main else contextlib.nullcontext():
            checkpoint = _checkpoint_to_continue(config, out)
            with tracked_run(name, params, tags, config.tracking.experiment,
                             resume_run_id=checkpoint["run_id"] if checkpoint else None, journal_dir=out,
                             system_metrics=config.tracking.system_metrics) as logger:
                return iterate(config, logger, checkpoint, inputs=inputs)
    except KeyboardInterrupt as stop:
        stop.hint = (f"Stopped. Completed iterations are saved in {out}; continue with the same settings plus "
                     f"{option('resume')}")
        raise
