"""Iterative magnitude pruning with recovery training (SPEC §1), the main job.

    for k in 1..n:  prune to schedule[k]  ->  ppl_after_prune  ->  train E epochs  ->  ppl_after_train

After every iteration the weights, masks, history, RNG states, config and MLflow run id are written
atomically to the output directory; `--resume` continues from the last completed iteration, in the
same MLflow run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError, sigterm_as_interrupt

# Per-iteration metrics, one point per iteration (step = iteration; step 0 is the unpruned model).
ITERATION_METRICS = ("sparsity", "ppl_after_prune", "ppl_after_train", "recovery_pct", "train_loss",
                     "iteration_seconds", "train_seconds", "lr")
# Keys that may differ when resuming: where it runs, and what SPEC §6 advises changing mid-run.
RESUMABLE_CHANGES = {"device", "experiment", "save_model", "log_every", "max_iterations", "lr", "final_lr"}


@dataclass
class IterativeConfig:
    model: str = "opt-tiny"
    dataset: str = "pydocs"
    target_sparsity: float = 0.9
    prune_percentage: float = 0.1
    epochs_per_iteration: int = 3
    max_iterations: int = 25
    batch_size: int = 8
    lr: float = 1e-5
    final_lr: float | None = None
    max_steps: int | None = 2500
    seed: int = 42
    prune_method: str = "magnitude"
    scope: str = "layer"
    schedule: str = "geometric"
    nsamples: int = 128
    calibration_dataset: str | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    seqlen: int | None = None
    train_seqlen: int | None = None
    eval_split: str = "test"
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    device: str = "auto"
    output_dir: str | None = None
    save_model: bool = True
    log_every: int = 10
    experiment: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if not 0.0 < self.target_sparsity < 1.0:
            raise UserError(f"target sparsity {self.target_sparsity} is outside (0, 1): give the fraction "
                            "of zeros to reach, e.g. 0.9", 2)
        if not 0.0 < self.prune_percentage < 1.0:
            raise UserError(f"prune percentage {self.prune_percentage} is outside (0, 1): give the fraction "
                            "of the remaining weights pruned per iteration, e.g. 0.1", 2)
        for name in ("epochs_per_iteration", "max_iterations", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}", 2)
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"max-steps must be positive, got {self.max_steps}", 2)
        if self.lr <= 0 or (self.final_lr is not None and self.final_lr <= 0):
            raise UserError("learning rates must be positive", 2)
        from .pruning import PruneConfig
        from .schedules import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule '{self.schedule}': use {' or '.join(SCHEDULES)}", 2)
        PruneConfig(method=self.prune_method, sparsity=0.0, scope=self.scope)  # validates both

    @property
    def model_label(self) -> str:
        return Path(self.model).name

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        dataset = self.dataset.replace("text:", "text-").replace("/", "_")
        return Path("checkpoints") / (f"{self.model_label}-{dataset}-iterative-{self.prune_method}-"
                                      f"{self.scope}-{self.schedule}-{self.target_sparsity:.2f}")


def config_differences(saved: dict, current: dict) -> list:
    return sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


def planned_schedule(config: IterativeConfig) -> tuple[list, int]:
    """(per-iteration sparsity targets after the max_iterations cap, uncapped iteration count)."""
    from .schedules import sparsity_schedule

    full = sparsity_schedule(config.schedule, config.target_sparsity, config.prune_percentage)
    return full[: config.max_iterations], len(full)


def _print_summary(config: IterativeConfig, history: list, model_paths: list) -> None:
    base = history[0]["ppl_after_train"]
    final = history[-1]
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
          f"(vs Unpruned: {100 * (final['ppl_after_train'] - base) / base:+.1f}%)")
    for path in model_paths:
        print(f"  Model saved to {path}")
    print("=" * 60)


def _final_metrics(history: list) -> dict:
    base, final = history[0]["ppl_after_train"], history[-1]
    return {"final_perplexity": final["ppl_after_train"], "final_sparsity": final["sparsity"],
            "vs_unpruned_pct": 100.0 * (final["ppl_after_train"] - base) / base,
            "total_seconds": sum(h["iteration_seconds"] for h in history)}


def _backfill(logger, history: list) -> None:
    """Logs the history entries a kill kept out of MLflow (checkpoint written, metrics not yet sent)."""
    present = logger.logged_steps("ppl_after_train")
    for entry in history:
        if entry["iteration"] not in present:
            logger.log_dict({k: entry[k] for k in ITERATION_METRICS if k in entry}, step=entry["iteration"])
    logger.flush()


def run_iterative(config: IterativeConfig, logger, checkpoint: dict | None = None,
                  on_iteration: Callable[[dict], None] | None = None) -> list:
    """The IMP loop; returns the history (entry 0 is the unpruned model). `on_iteration(entry)` runs
    once an iteration is checkpointed and logged (`bench` times whole iterations with it)."""
    from .checkpoint import restore_rng_state, save_checkpoint
    from .data import calibration_windows, load_corpus, training_blocks
    from .distributed import is_main_process, sync_from_main
    from .evaluation import evaluate_on, resolve_seqlen
    from .models import load_model_and_tokenizer, resolve_device, training_dtype
    from .prune import default_calibration_dataset
    from .pruning import PruneConfig, prune_model
    from .pruning.masks import MaskKeeper, model_masks, prunable_linears, sparsity_of
    from .schedules import learning_rate_for
    from .training import NonFiniteLoss, TrainConfig, steps_per_epoch, train_causal_lm

    out = config.resolved_output_dir()
    schedule, uncapped = planned_schedule(config)
    n = len(schedule)
    if n < uncapped:
        print(f"note: --max-iterations {config.max_iterations} stops after {n} of the {uncapped} iterations "
              f"needed: the run will reach {schedule[-1]:.2%} sparsity, not {config.target_sparsity:.2%}")
    print(f"{config.schedule} schedule: {n} iterations to {schedule[-1]:.2%} sparsity "
          f"(pruning {config.prune_percentage:.0%} of the remaining weights per iteration)")

    device = resolve_device(config.device)
    model, tokenizer = load_model_and_tokenizer(config.model, training_dtype(config.dtype), config.device,
                                                config.trust_remote_code)
    corpus = load_corpus(config.dataset)
    logger.set_tags(corpus.describe())
    seqlen = resolve_seqlen(model, config.seqlen)
    train_seqlen = resolve_seqlen(model, config.train_seqlen or seqlen)
    blocks = training_blocks(corpus, tokenizer, train_seqlen)
    linears = prunable_linears(model)
    windows = None
    if config.prune_method in ("sparsegpt", "wanda"):
        calibration_name = config.calibration_dataset or default_calibration_dataset(config.model, config.dataset)
        calibration = corpus if calibration_name == config.dataset else load_corpus(calibration_name)
        windows = calibration_windows(calibration, tokenizer, config.nsamples, seqlen, seed=0)

    def evaluate() -> float:
        return evaluate_on(model, tokenizer, corpus, config.eval_split, seqlen, device).perplexity

    resolved = asdict(config)
    if checkpoint is None:
        started = time.perf_counter()
        dense = evaluate()
        history = [{"iteration": 0, "sparsity": sparsity_of(linears), "ppl_after_prune": dense,
                    "ppl_after_train": dense, "recovery_pct": 0.0, "train_loss": float("nan"),
                    "iteration_seconds": time.perf_counter() - started, "train_seconds": 0.0, "lr": 0.0}]
        print(f"Iteration 0 (unpruned): perplexity {dense:.2f}")
        if is_main_process():
            save_checkpoint(out, model_state=model.state_dict(), masks=model_masks(linears), iteration=0,
                            history=history, config=resolved, run_id=logger.run_id)
        _backfill(logger, history)
        if on_iteration is not None:
            on_iteration(history[0])
        first = 1
    else:
        model.load_state_dict(checkpoint["model"])
        for name, mask in checkpoint["masks"].items():
            if not torch.equal(linears[name].weight.detach().cpu() != 0, mask):
                raise UserError(f"checkpoint in {out} is inconsistent: the mask of {name} does not match "
                                "its weights; delete it to start over")
        history = checkpoint["history"]
        restore_rng_state(checkpoint["rng"])
        _backfill(logger, history)
        first = checkpoint["iteration"] + 1
        print(f"Resuming after iteration {checkpoint['iteration']} at {history[-1]['sparsity']:.2%} sparsity "
              f"(perplexity {history[-1]['ppl_after_train']:.2f})")

    per_epoch = steps_per_epoch(blocks.shape[0], TrainConfig(batch_size=config.batch_size,
                                                             grad_accum=config.grad_accum,
                                                             max_steps=config.max_steps))
    steps_per_iteration = per_epoch * config.epochs_per_iteration
    already_logged = max(logger.logged_steps("train_step_loss"), default=0)
    final_lr = config.final_lr if config.final_lr is not None else config.lr
    for k in range(first, n + 1):
        started = time.perf_counter()
        print(f"\n{'=' * 20} Iteration {k}/{n} {'=' * 20}")
        before = sparsity_of(linears)
        prune_model(model, PruneConfig(method=config.prune_method, sparsity=schedule[k - 1], scope=config.scope,
                                       nsamples=config.nsamples, blocksize=config.blocksize,
                                       percdamp=config.percdamp), windows, device)
        sync_from_main(model)
        sparsity = sparsity_of(linears)
        ppl_pruned = evaluate()
        print(f"Pruned {config.prune_method}: sparsity {before:.2%} -> {sparsity:.2%}; "
              f"perplexity after pruning {ppl_pruned:.2f}")
        lr = learning_rate_for(k, n, config.lr, final_lr)
        offset = (k - 1) * steps_per_iteration

        def log_step(step: int, loss: float, step_lr: float) -> None:
            if offset + step > already_logged:  # a resumed iteration does not log its steps twice
                logger.log_dict({"train_step_loss": loss, "train_lr": step_lr}, step=offset + step)

        keeper = MaskKeeper(linears)
        train_config = TrainConfig(lr=lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                                   schedule=config.lr_schedule, grad_clip=config.grad_clip,
                                   batch_size=config.batch_size, grad_accum=config.grad_accum,
                                   epochs=config.epochs_per_iteration, max_steps=config.max_steps,
                                   seed=config.seed + 1000 * k, gradient_checkpointing=config.gradient_checkpointing,
                                   log_every=config.log_every)
        try:
            result = train_causal_lm(model, blocks, train_config, mask_keeper=keeper, desc=f"Iteration {k}",
                                     on_log=log_step)
        except NonFiniteLoss as fault:
            raise UserError(f"iteration {k} stopped: the training loss became {fault.loss} at step {fault.step} "
                            f"(lr {lr:g}); the checkpoint of iteration {k - 1} in {out} is intact: lower --lr "
                            "(resuming may change it) and rerun with --resume") from None
        changed = keeper.changed_matrices()
        if changed:
            raise RuntimeError(f"the mask changed during training in {changed[:3]}: a bug, please report it")
        ppl_trained = evaluate()
        recovery = 100.0 * (ppl_pruned - ppl_trained) / ppl_pruned
        entry = {"iteration": k, "sparsity": sparsity, "ppl_after_prune": ppl_pruned,
                 "ppl_after_train": ppl_trained, "recovery_pct": recovery, "train_loss": result.final_loss,
                 "iteration_seconds": time.perf_counter() - started, "train_seconds": result.seconds, "lr": lr}
        history.append(entry)
        if is_main_process():
            save_checkpoint(out, model_state=model.state_dict(), masks=model_masks(linears), iteration=k,
                            history=history, config=resolved, run_id=logger.run_id)
        logger.log_dict({key: entry[key] for key in ITERATION_METRICS}, step=k)
        logger.flush()
        if on_iteration is not None:
            on_iteration(entry)
        done = [h["iteration_seconds"] for h in history[1:]]
        remaining = (n - k) * sum(done) / len(done)
        print(f"Iteration {k}: perplexity {ppl_pruned:.2f} -> {ppl_trained:.2f} after training "
              f"(recovery {recovery:.1f}%), {entry['iteration_seconds']:.0f}s; "
              f"about {remaining / 60:.1f} min left")

    model_paths = []
    if config.save_model and is_main_process():
        model_paths = save_final_model(model, tokenizer, config)
        logger.log_artifacts(model_paths[1], "model")
    logger.log_dict(_final_metrics(history))
    _print_summary(config, history, model_paths)
    return history


def save_final_model(model, tokenizer, config: IterativeConfig) -> list:
    """The seed's `pruned_models/<model>-iterative-<target>.pt` state dict, and a save_pretrained dir."""
    from .checkpoint import atomic_torch_save

    stem = Path("pruned_models") / f"{config.model_label}-iterative-{config.target_sparsity:.2f}"
    state_file = stem.parent / f"{stem.name}.pt"  # not with_suffix: "0.90" would be taken for a suffix
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, state_file)
    model.save_pretrained(stem)
    tokenizer.save_pretrained(stem)
    return [state_file, stem]


def iterative_command(config: IterativeConfig, resume: bool = False) -> list:
    from .checkpoint import load_checkpoint
    from .models import resolve_model_source
    from .tracking import tracked_run

    resolve_model_source(config.model)
    out = config.resolved_output_dir()
    checkpoint = load_checkpoint(out)
    if checkpoint is not None and not resume:
        raise UserError(f"{out} already holds a checkpoint (iteration {checkpoint['iteration']}): pass --resume "
                        "to continue it, or --output-dir to start a separate run", 2)
    if checkpoint is not None:
        differing = config_differences(checkpoint["config"], asdict(config))
        if differing:
            raise UserError(f"--resume refused: the checkpoint in {out} was made with different "
                            f"{', '.join(differing)}; use the same settings or another --output-dir", 2)
    elif resume:
        print(f"no checkpoint in {out}: starting from the beginning")
    params = {f.name: getattr(config, f.name) for f in fields(config)}
    params["output_dir"] = str(out)
    name = (f"iterative {config.prune_method} {config.model_label} {config.dataset} "
            f"-> {config.target_sparsity:.2f}")
    try:
        with sigterm_as_interrupt(), tracked_run(name, params, {"model": config.model, "dataset": config.dataset,
                                        "method": config.prune_method, "kind": "iterative"},
                         config.experiment, resume_run_id=checkpoint["run_id"] if checkpoint else None,
                         journal_dir=out) as logger:
            return run_iterative(config, logger, checkpoint)
    except KeyboardInterrupt:
        print(f"\nStopped. Completed iterations are saved in {out}; continue with the same command "
              "plus --resume", flush=True)
        raise
