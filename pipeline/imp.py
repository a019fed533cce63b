"""One iterative magnitude pruning run (Han et al. 2015), as `ImpRun`:

    for k in 1..n:  prune to targets[k] -> evaluate -> [rewind] -> train -> evaluate -> checkpoint

Each phase is a method that skips itself when there is nothing to do: a pruning step that changes no
weight (the one-shot schedule after its first iteration, the dense one always) prunes nothing and is
not evaluated again; without a rewind point nothing is rewound. The run's state (the model, its
prunable matrices, the history so far, the rewind point) lives on the object. What an iteration
records goes to `tracker`, the run's metric interface (an MLflow run, or `NullTracker`).

The checkpoint after every iteration holds the weights, masks, history, RNG states, settings and the
tracked run's id, written atomically: a run created from it continues after its last completed
iteration, logging no step twice.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_torch_save, restore_rng_state, save_checkpoint
from .config import IterativeConfig, ScheduleConfig, TrainConfig
from .dense_cache import dense_perplexity
from .distributed import is_main_process, sync_from_main
from .errors import Continuable, UserError
from .logged_models import model_name, model_record
from .methods import SPARSITY_SCHEDULES_ONCE
from .models import save_model
from .pruning import prune_model
from .pruning.masks import already_at, model_masks, prunable_linears, sparsity_of, sparsity_report
from .pruning.owl import layer_sparsity_metrics
from .recovery import recover
from .schedules import budget_steps, learning_rate_for, sparsity_schedule, split_steps
from .settings import flat_values
from .shared_pruning import prune_starting_model
from .tracking.store import tracking_uri
from .training import NonFiniteLoss, TrainResult, steps_per_epoch
from .workload import Inputs, load_workload
from .zeroshot import log_tasks

PERPLEXITIES = ("ppl_after_prune", "ppl_after_train", "recovery_pct")  # what an iteration measures (--eval-every)

# One point per iteration of each (step = iteration; step 0 is the unpruned model). The train_* budget is
# cumulative: tokens that went into optimizer steps (all processes), optimizer steps, and their FLOPs.
ITERATION_METRICS = (
    "sparsity",
    "ppl_after_prune",
    "ppl_after_train",
    "recovery_pct",
    "train_loss",
    "iteration_seconds",
    "eval_seconds",
    "train_seconds",
    "lr",
    "train_tokens",
    "train_steps",
    "train_flops",
    "trained_parameters",
    "peak_memory_bytes",
)
STEP_METRIC_NAMES = {"loss": "train_step_loss", "lr": "train_lr"}  # the loss's parts keep their own names


def planned_schedule(schedule: ScheduleConfig) -> tuple[list, int]:
    """(per-iteration sparsity targets after the max_iterations cap, uncapped iteration count). With a budget,
    one-shot and dense train in one iteration: nothing is pruned between their iterations, so splitting their
    training would only restart the optimizer."""
    full = sparsity_schedule(schedule.schedule, schedule.target_sparsity, schedule.prune_percentage)
    if schedule.budget is not None and schedule.schedule in SPARSITY_SCHEDULES_ONCE:
        full = full[-1:]
    return full[: schedule.max_iterations], len(full)


def _ppl(value: float) -> str:
    """A perplexity as the console shows it; an iteration --eval-every skips was not measured."""
    return "not measured (--eval-every)" if math.isnan(value) else f"{value:.2f}"


def recovery_pct(ppl_after_prune: float, ppl_after_train: float) -> float:
    """(ppl_after_prune - ppl_after_train) / ppl_after_prune, in percent: 32.45 -> 28.67 is 11.7%."""
    return 100.0 * (ppl_after_prune - ppl_after_train) / ppl_after_prune


def dense_record(sparsity: float, perplexity: float, seconds: float) -> dict:
    """Iteration 0: the unpruned model, as the history's first entry."""
    return {
        "iteration": 0,
        "sparsity": sparsity,
        "ppl_after_prune": perplexity,
        "ppl_after_train": perplexity,
        "recovery_pct": 0.0,
        "train_loss": float("nan"),
        "iteration_seconds": seconds,
        "train_seconds": 0.0,
        "lr": 0.0,
        "train_tokens": 0,
        "train_steps": 0,
        "train_flops": 0.0,
    }


def iteration_record(
    k: int,
    sparsity: float,
    ppl_pruned: float,
    ppl_trained: float,
    trained: TrainResult,
    lr: float,
    seconds: float,
    eval_seconds: float,
    previous: dict,
) -> dict:
    return {
        "iteration": k,
        "sparsity": sparsity,
        "ppl_after_prune": ppl_pruned,
        "ppl_after_train": ppl_trained,
        "recovery_pct": recovery_pct(ppl_pruned, ppl_trained),
        "train_loss": trained.final_loss,
        "iteration_seconds": seconds,
        "eval_seconds": eval_seconds,  # the perplexity evaluations within the iteration
        "train_seconds": trained.seconds,
        "lr": lr,
        "train_tokens": previous["train_tokens"] + trained.tokens,
        "train_steps": previous["train_steps"] + trained.steps,
        "train_flops": previous["train_flops"] + trained.flops,
        "trained_parameters": trained.trained_parameters,  # what the optimizer updated (--train-params)
        # the highest so far: the run's peak is the most any of its recoveries took
        "peak_memory_bytes": max(previous.get("peak_memory_bytes", 0), trained.peak_memory_bytes),
    }


@torch.no_grad()
def rewind_weights(model: nn.Module, linears: dict, state: dict) -> None:
    """Every weight back to its value in `state`, keeping the zeros pruning has just made: the surviving
    weights rewound, the mask the current one (taken from the trained weights)."""
    masks = {name: module.weight != 0 for name, module in linears.items()}
    model.load_state_dict(state)
    for name, module in linears.items():
        module.weight.mul_(masks[name])


def log_iteration(tracker, entry: dict, model: str | None = None, dataset: tuple = (None, None)) -> None:
    """The iteration's metrics at step = iteration (linked to its LoggedModel `model`, if it has one, and the
    evaluation `dataset`), and the perplexity against the training tokens so far (`ppl_at_tokens`, from the
    first pruning step at 0 tokens on), so the UI overlays runs of one budget (iterative, one-shot + training,
    dense + training) on one axis."""
    unmeasured = {key for key in PERPLEXITIES if math.isnan(entry.get(key, 0.0))}  # --eval-every skipped them
    measured = {key: value for key, value in entry.items() if key not in unmeasured}
    metrics = {key: measured[key] for key in ITERATION_METRICS if key in measured}
    tracker.log_dict(metrics, step=entry["iteration"], model=model, dataset=dataset)
    if entry.get("layer_sparsities"):
        tracker.log_dict(layer_sparsity_metrics(entry["layer_sparsities"]), step=entry["iteration"])
    if entry["iteration"] == 1 and "ppl_after_prune" in measured:
        tracker.log_dict({"ppl_at_tokens": entry["ppl_after_prune"]}, step=0)
    if entry["iteration"] >= 1 and "ppl_after_train" in measured:
        tracker.log_dict({"ppl_at_tokens": entry["ppl_after_train"]}, step=int(entry["train_tokens"]))


class ImpRun:
    """One IMP run over a loaded model: `ImpRun.create(...)` loads (or restores) it, `run()` runs the
    iterations its history does not hold yet."""

    def __init__(
        self,
        config: IterativeConfig,
        work,
        tracker,
        out: Path,
        history: list | None = None,
        shared_pruning: Path | None = None,
        method: str | None = None,
    ):
        self.config, self.work, self.tracker, self.out = config, work, tracker, Path(out)
        self.method = method or config.prune.method  # what its LoggedModels are called after (a grid's method)
        self.shared_pruning = shared_pruning  # a grid's: the first pruning step and the dense perplexity, shared
        self.model = work.model
        self.targets, self.uncapped = planned_schedule(config.schedule)
        self.blocks = work.training_blocks(config.resolved("train_seqlen"))
        self.linears = prunable_linears(self.model, config.prune.include, config.prune.exclude)
        self.windows, calibration = work.calibration(config.prune)
        work.record_inputs(
            tracker, evaluation=config.eval_split, training=self.blocks, calibration=(self.windows, calibration)
        )
        self.eval_dataset = work.dataset_of(config.eval_split)  # what the iterations' perplexities measure
        # the starting model: the teacher a distilling recovery learns from, the blocks a reconstruction fits to,
        # and the `dense` rewind point
        needs_start = config.train.distill != "none" or config.train.recovery == "reconstruct"
        needs_start = needs_start or config.rewind_iteration == 0
        self.start = copy.deepcopy(self.model) if needs_start else None
        self.rewind_state = self._saved_rewind_point()
        self.history = history or []
        self.eval_seconds = 0.0  # spent on perplexity evaluations in the iteration being run
        self.steps = self.planned_steps()  # each iteration's optimizer steps
        self.already_logged = max(tracker.logged_steps("train_step_loss"), default=0)  # a resumed run's steps

    @classmethod
    def create(
        cls,
        config: IterativeConfig,
        tracker,
        out: Path,
        checkpoint: dict | None = None,
        inputs: Inputs | None = None,
        shared_pruning: Path | None = None,
        method: str | None = None,
    ) -> ImpRun:
        """Loads the model (the checkpoint's weights, RNG states and history, when continuing one)."""
        work = load_workload(config.model, config.data, inputs, training=True)
        imp = cls(config, work, tracker, out, shared_pruning=shared_pruning, method=method)
        tracker.set_tags(imp.work.corpus.describe())
        if checkpoint is not None:
            imp.restore(checkpoint)
        return imp

    # --- the algorithm ------------------------------------------------------------------------------

    def run(self, on_iteration: Callable[[dict], None] | None = None) -> list:
        """Runs the iterations the history does not hold yet; returns the history (entry 0: the unpruned
        model). `on_iteration(entry)` runs once an iteration is checkpointed and logged."""
        self.announce()
        if not self.history:
            self.history.append(self.evaluate_dense())
            self.checkpoint(on_iteration)
        n = len(self.targets)
        for k in range(len(self.history), n + 1):
            print(f"\n{'=' * 20} Iteration {k}/{n} {'=' * 20}")
            started, self.eval_seconds = time.perf_counter(), 0.0
            before = sparsity_of(self.linears)
            sparsity = self.prune(k)
            measured = self.measures(k)
            ppl_pruned = self.history[-1]["ppl_after_train"] if sparsity == before else self.evaluate(measured)
            print(f"Pruned: sparsity {before:.2%} -> {sparsity:.2%}; perplexity after pruning {_ppl(ppl_pruned)}")
            self.rewind(k)
            trained = self.train(k)
            ppl_trained = self.evaluate(measured)
            self.history.append(
                iteration_record(
                    k,
                    sparsity,
                    ppl_pruned,
                    ppl_trained,
                    trained,
                    self.lr(k),
                    time.perf_counter() - started,
                    self.eval_seconds,
                    self.history[-1],
                )
            )
            self.history[-1]["layer_sparsities"] = sparsity_report(self.model, self.linears)["layers"]
            self.checkpoint(on_iteration)
            self.report_progress()
        return self.history

    # --- the phases ---------------------------------------------------------------------------------

    def measures(self, k: int) -> bool:
        """Whether iteration k's perplexities are measured: every --eval-every-th iteration's, and the last's."""
        every = self.config.eval_every
        return k == len(self.targets) or bool(every and k % every == 0)

    def evaluate(self, measured: bool = True) -> float:
        if not measured:
            return math.nan
        result = self.work.evaluate(self.config.eval_split)
        self.eval_seconds += result.seconds
        return result.perplexity

    def evaluate_dense(self) -> dict:
        started = time.perf_counter()
        if self.shared_pruning is None:
            perplexity = self.evaluate()
        else:  # a grid's cells all start from the same model: its perplexity is measured once per grid
            perplexity, read = dense_perplexity(self.work, self.config.eval_split, self.dense_scope())
            self.tracker.set_tags({"dense_shared": "read" if read else "computed"})
        record = dense_record(sparsity_of(self.linears), perplexity, time.perf_counter() - started)
        print(f"Iteration 0 (unpruned): perplexity {record['ppl_after_train']:.2f}")
        return record

    def dense_scope(self) -> str:
        """What the unpruned model's perplexity depends on besides the model, data, split, window and dtype
        setting (dense_cache's key): the grid (its shared directory, of one store's experiment), the weights'
        dtype and device, and the threads (a sum in another order differs in the last bits)."""
        parameter = next(self.model.parameters())
        shared = Path(self.shared_pruning).resolve()
        return f"{shared}|{parameter.dtype}|{self.work.device.type}|{torch.get_num_threads()}"

    def prune(self, k: int) -> float:
        """Prunes to the schedule's k-th target (a zero stays a zero); returns the sparsity reached."""
        target = self.targets[k - 1]
        prune = replace(self.config.prune, sparsity=target)
        # the count that says whether a step is due: OWL's layers differ, only the whole set is at the target
        scope = "global" if self.config.prune.uses_owl else self.config.prune.scope
        if already_at(self.linears, target, scope):  # one-shot prunes once, dense never
            pass
        elif k == 1:  # the untouched starting model: the same pruning as other cells' (a sweep's), done once
            _, loaded = prune_starting_model(
                self.model, self.config.model.model, prune, self.windows, self.work.device, self.shared_pruning
            )
            if self.shared_pruning is not None:
                self.tracker.set_tags({"pruning_shared": "read" if loaded else "computed"})
            if loaded:
                print(f"Read the same pruning of the starting model from {self.shared_pruning}")
        else:
            prune_model(self.model, prune, self.windows, self.work.device)
        sync_from_main(self.model)  # every process holds the main one's mask, whatever its own calibration gave
        return sparsity_of(self.linears)

    def rewind(self, k: int) -> None:
        """Survivors back to the rewind point (`--rewind`), once the run is past it."""
        point = self.config.rewind_iteration
        if self.rewind_state is None or k <= point:
            return
        rewind_weights(self.model, self.linears, self.rewind_state)
        print(f"Rewound the surviving weights to {'the dense model' if point == 0 else f'iteration {point}'}")

    def lr(self, k: int) -> float:
        """Iteration k's learning rate: from --lr at the first to --final-lr at the last, geometrically."""
        train = self.config.train
        return learning_rate_for(k, len(self.targets), train.lr, self.config.schedule.resolved("final_lr", train.lr))

    def planned_steps(self) -> list[int]:
        """Each iteration's optimizer steps: --epochs of --max-steps each, or the budget's steps split evenly."""
        budget, train = self.config.schedule.budget, self.config.train
        if budget is None:
            return [steps_per_epoch(self.blocks.shape[0], train) * train.epochs] * len(self.targets)
        tokens_per_step = train.batch_size * train.grad_accum * self.blocks.shape[1]
        return split_steps(budget_steps(budget, tokens_per_step), len(self.targets))

    def train_config(self, k: int) -> TrainConfig:
        # each iteration its own data order, reproducible from --seed alone
        return replace(self.config.train, lr=self.lr(k), seed=self.config.train.seed + 1000 * k)

    def train(self, k: int) -> TrainResult:
        """Recovery training with the mask kept; a non-finite loss stops the run with the last checkpoint
        intact."""
        steps = self.steps[k - 1] if self.config.schedule.budget is not None else None
        try:
            return recover(
                self.model,
                self.linears,
                self.blocks,
                self.train_config(k),
                dense=self.start,
                steps=steps,
                desc=f"Iteration {k}",
                on_log=self.step_logger(k),
            )
        except NonFiniteLoss as fault:
            raise Continuable(
                f"iteration {k} stopped: the training loss became {fault.loss} at step {fault.step} "
                f"(lr {self.lr(k):g}); the checkpoint of iteration {k - 1} in {self.out} is intact"
            ) from None

    def checkpoint(self, on_iteration: Callable[[dict], None] | None = None) -> None:
        """After an iteration: the rewind point (if this is it), the checkpoint, the metrics, the zero-shot
        tasks when due."""
        entry = self.history[-1]
        k = entry["iteration"]
        self.remember_rewind_point(k)
        if is_main_process():
            save_checkpoint(
                self.out,
                model_state=self.model.state_dict(),
                masks=model_masks(self.linears),
                iteration=k,
                history=self.history,
                config=flat_values(self.config),
                run_id=self.tracker.run_id,
                tracking_uri=tracking_uri(),
            )
        model = self.log_iteration_model(k) if self.config.saved_model.log_models == "every" else None
        log_iteration(self.tracker, entry, model, self.eval_dataset)
        if self.tasks_due(k):
            log_tasks(
                self.tracker,
                self.model,
                self.work.tokenizer,
                self.config.tasks,
                step=k,
                artifact=f"lm_eval/iteration-{k}.json",
                logged_model=model,
            )
        self.tracker.flush()
        if on_iteration is not None:
            on_iteration(entry)

    def log_model(self, k: int, weights: Path) -> str:
        """Iteration k's model as a LoggedModel of the run (once: a resumed run does not log it again), its
        weights in `weights`; returns its name."""
        name = model_name(self.method, self.config.schedule.target_sparsity, k)
        made_by = {
            "method": self.method,
            "target_sparsity": f"{self.config.schedule.target_sparsity:.4f}",
            "iteration": k,
            "lr": self.lr(k),
            "seed": self.config.train.seed,
        }
        where = {"checkpoint": str(self.out.resolve())}
        self.tracker.log_model(name, *model_record(self.linears, weights, made_by, where))
        return name

    def log_iteration_model(self, k: int) -> str | None:
        """--log-models every: iteration k's weights kept in <output dir>/iterations/<k> (the last one's in the
        final model's directory, saved at the end, when the run saves one and --max-iterations cuts no iteration
        that a resume could add after it), and its LoggedModel."""
        if k == 0:
            return None
        last = k == len(self.targets) == self.uncapped and self.config.save_model
        weights = Path(self.config.resolved("model_dir")) if last else self.out / "iterations" / str(k)
        if not last and is_main_process():
            save_model(self.model, self.work.tokenizer, weights)
        return self.log_model(k, weights)

    # --- what the phases need -----------------------------------------------------------------------

    def step_logger(self, k: int) -> Callable[[int, dict], None]:
        """Logs iteration k's training steps at global step numbers, none twice after a resume."""
        offset = sum(self.steps[: k - 1])

        def log_step(step: int, metrics: dict) -> None:
            if offset + step > self.already_logged:
                self.tracker.log_dict(
                    {STEP_METRIC_NAMES.get(key, key): value for key, value in metrics.items()}, step=offset + step
                )

        return log_step

    def tasks_due(self, k: int) -> bool:
        every = self.config.eval_tasks_every
        return (
            bool(self.config.tasks.tasks)
            and is_main_process()
            and (k == len(self.targets) or (every and k % every == 0))
        )

    @property
    def rewind_path(self) -> Path:
        return self.out / f"rewind-iteration-{self.config.rewind_iteration}.pt"  # iteration:K's, for resuming

    def _saved_rewind_point(self) -> dict | None:
        point = self.config.rewind_iteration
        if point == 0:  # the starting model's own tensors: it is never trained, so no second copy
            return self.start.state_dict()
        if point is not None and self.rewind_path.exists():
            return torch.load(self.rewind_path, map_location="cpu", weights_only=True)
        return None

    def remember_rewind_point(self, k: int) -> None:
        if self.config.rewind_iteration and k == self.config.rewind_iteration:
            self.rewind_state = {key: v.detach().cpu().clone() for key, v in self.model.state_dict().items()}
            if is_main_process():
                atomic_torch_save(self.rewind_state, self.rewind_path)

    def restore(self, checkpoint: dict) -> None:
        """The checkpoint's weights, RNG states and history; what a kill kept out of the tracked run is
        logged now."""
        self.model.load_state_dict(checkpoint["model"])
        for name, mask in checkpoint["masks"].items():
            if not torch.equal(self.linears[name].weight.detach().cpu() != 0, mask):
                raise UserError(
                    f"checkpoint in {self.out} is inconsistent: the mask of {name} does not match "
                    "its weights; delete it to start over"
                )
        restore_rng_state(checkpoint["rng"])
        self.history = checkpoint["history"]
        logged = self.tracker.logged_steps("sparsity")  # every iteration logs it, measured or not
        for entry in self.history:
            if entry["iteration"] not in logged:
                log_iteration(self.tracker, entry)
        self.tracker.flush()
        print(
            f"Resuming after iteration {checkpoint['iteration']} at {self.history[-1]['sparsity']:.2%} sparsity "
            f"(perplexity {self.history[-1]['ppl_after_train']:.2f})"
        )

    def announce(self) -> None:
        schedule, n = self.config.schedule, len(self.targets)
        if n < self.uncapped:
            print(
                f"note: the cap of {schedule.max_iterations} iterations stops the run after {n} of the "
                f"{self.uncapped} iterations needed: it will reach {self.targets[-1]:.2%} sparsity, not "
                f"{schedule.target_sparsity:.2%}"
            )
        if schedule.schedule in ("geometric", "cubic"):
            print(
                f"{schedule.schedule} schedule: {n} iterations to {self.targets[-1]:.2%} sparsity "
                f"(pruning {schedule.prune_percentage:.0%} of the remaining weights per iteration)"
            )
        else:
            pruned = f"pruned to {self.targets[-1]:.2%} at once" if self.targets[-1] else "never pruned"
            print(
                f"{schedule.schedule} schedule: {pruned}, then {n} iterations of training (as many as pruning "
                f"{schedule.prune_percentage:.0%} of the remaining weights per iteration would take)"
            )

    def report_progress(self) -> None:
        record, n = self.history[-1], len(self.targets)
        done = [h["iteration_seconds"] for h in self.history[1:]]
        remaining = (n - record["iteration"]) * sum(done) / len(done)
        measured = not math.isnan(record["ppl_after_train"])
        print(
            f"Iteration {record['iteration']}: "
            + (
                f"perplexity {_ppl(record['ppl_after_prune'])} -> {record['ppl_after_train']:.2f} after training "
                f"(recovery {record['recovery_pct']:.1f}%), "
                if measured
                else "trained, "
            )
            + f"{record['iteration_seconds']:.0f}s; about {remaining / 60:.1f} min left"
        )
