"""Every setting of the pipeline, by concern, each declared once with its default, help and checks.

A command's config composes the concerns it needs (`group`); the CLI's flags, the Python API's keys
and the params each MLflow run records all come from these fields. This module imports nothing heavy,
so `--help` and a bad flag value answer at once.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from .errors import ConfigError, option
from .methods import (
    CRITERIA,
    CRITERION_NAMES,
    DEFAULT_CRITERION,
    DEFAULT_GRID,
    GRID_METHODS,
    METHODS,
    Criterion,
    criterion,
)
from .schedules import SPARSITY_SCHEDULES, iterations_to_reach
from .settings import Settings, Tokens, default_of, group, setting

EMBEDDED_MODEL = "opt-tiny"
EMBEDDED_MODELS = ("opt-tiny", "llama-tiny")  # shipped in pipeline/assets: everything runs offline
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("test", "validation")
# geometric and cubic prune step by step; one-shot prunes to the target at once and dense never prunes,
# both then training as many iterations as geometric would: the equal-budget controls of `compare`
LR_SCHEDULES = ("constant", "cosine")
SPARSITY_PROFILES = ("uniform", "owl")  # how a target sparsity is spread over the decoder layers
TRAIN_PARAMS = ("all", "norms-biases", "lora")  # what a recovery trains
RECOVERIES = ("finetune", "reconstruct")  # how: the whole model on the language-model loss, or block by block
DISTILL_MODES = ("none", "logits", "squarehead")  # the recovery loss: cross-entropy alone, or with a teacher
LOG_MODELS = ("none", "final", "every")  # which of a run's models are logged as MLflow LoggedModels
REWIND_HELP = (
    "after each pruning step, reset the surviving weights to their values at a point, then train: none; "
    "dense (the starting model, as lottery-ticket studies of pretrained models do); iteration:K (after "
    "iteration K's training: late rewinding, Frankle et al. 2020, Renda et al. 2020)"
)
PRETRAIN_ARCHES = ("opt", "llama")
DEFAULT_EXPERIMENT = "llm-pruning"
REPORTS = Path("reports")  # where each experiment's report folder goes by default
# A seed seeds torch's 64-bit generators, offset by the iteration and the epoch: every value in this range
# is used exactly, and none two seeds share a draw.
SEED_RANGE = {"at_least": 0, "at_most": 2**63 - 1, "hint": "give a whole number from 0 to 2^63 - 1"}
DEFAULT_WINDOW = 2048  # the SparseGPT paper's window; Llama-3's 131072 positions are no window to evaluate


# --- the rules of computed defaults (each declared with its setting below; `--help` prints the docstring) ---


def default_window(data, model) -> int:
    """the model's positions, at most 2048"""
    return min(int(model.config.max_position_embeddings), DEFAULT_WINDOW)


def default_experiment(tracking) -> str:
    """llm-pruning"""
    return DEFAULT_EXPERIMENT


def default_sparsity(prune) -> float:
    """0.5; an N:M pattern makes it N/M"""
    return prune.n_m[0] / prune.n_m[1] if prune.n_m else 0.5


def default_calibration_dataset(prune, model_name: str, dataset: str) -> str:
    """c4 for hub models, as the reference; pydocs for the embedded models, the corpus they know; the
    --dataset for a local directory, which may not know C4 either"""
    if model_name in EMBEDDED_MODELS:
        return "pydocs"
    return dataset if os.path.isdir(model_name) else "c4"


# float32 logits held at once, which decides the windows per forward. A GPU gains from wide batches; a
# CPU loses: logits beyond its caches cost more memory traffic than the batching saves (measured by
# `bench`: on opt-tiny 64 windows per forward ran at 0.86x the one-window loop, 2 windows at 1.1x).
LOGITS_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}


def windows_per_forward(seqlen: int, vocab_size: int, device) -> int:
    """Evaluation windows whose float32 logits fit the device's budget (`device`: a torch.device)."""
    budget = LOGITS_BUDGET_BYTES.get(device.type, LOGITS_BUDGET_BYTES["cuda"])
    return max(1, budget // (seqlen * vocab_size * 4))


def default_eval_batch_size(evaluate, model, seqlen: int, device) -> int:
    """as many windows as fit the memory"""
    return windows_per_forward(seqlen, model.config.vocab_size, device)


def default_final_lr(schedule, lr: float) -> float:
    """--lr"""
    return lr


def model_stem(model: str) -> str:
    return Path(model).name


def default_pruned_dir(config) -> Path:
    """pruned_models/<model>-<method>-<sparsity>"""
    return Path("pruned_models") / f"{model_stem(config.model.model)}-{config.prune.label}"


def default_trained_dir(config) -> Path:
    """pruned_models/<model>-trained"""
    return Path("pruned_models") / f"{model_stem(config.model.model)}-trained"


def default_checkpoint_dir(config) -> Path:
    """checkpoints/<model>-<dataset>-iterative-<method>-<scope>-<schedule>-<target>"""
    dataset = config.data.dataset.replace("text:", "text-").replace("/", "_")
    return Path("checkpoints") / (
        f"{model_stem(config.model.model)}-{dataset}-iterative-{config.prune.method}-"
        f"{config.prune.scope}-{config.schedule.schedule}-"
        f"{config.schedule.target_sparsity:.2f}"
    )


def default_final_model_dir(config) -> Path:
    """pruned_models/<model>-iterative-<target>"""
    return Path("pruned_models") / f"{model_stem(config.model.model)}-iterative-{config.schedule.target_sparsity:.2f}"


def default_train_seqlen(config):
    """--seqlen"""
    return config.data.seqlen


def folder_name(name: str) -> str:
    """One folder name for any experiment name, and another for every other name: `%`-encoded, as in a URL,
    except letters, digits, `-_.~` and spaces, so `opt-tiny-tuned` stays as it is while `a/../b` is
    `a%2F..%2Fb` and `..` is `%2E.`: never a path of several parts, never outside its parent."""
    encoded = quote(name, safe=" ")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def default_report_dir(config, experiment_name: str) -> Path:
    """reports/<experiment>, the name %-encoded where it is not a plain folder name"""
    return REPORTS / folder_name(experiment_name)


def default_pretrained_dir(config) -> Path:
    """pretrained/<arch>-tiny"""
    return Path("pretrained") / config.name


def default_bench_dir(config) -> Path:
    """reports/bench"""
    return Path("reports") / "bench"


def default_kv_heads(config) -> int:
    """opt: the attention heads; llama: half of them"""
    return config.num_heads if config.arch == "opt" else max(1, config.num_heads // 2)


def default_ffn(config) -> int:
    """4 x hidden for opt, 8/3 x hidden for llama, whose SwiGLU has three matrices: the same parameters"""
    return 4 * config.hidden_size if config.arch == "opt" else 8 * config.hidden_size // 3


def check_regex(name: str, regex: str | None) -> None:
    """A setting that takes a regex (searched in matrix names) compiles, or is refused in one line."""
    if regex:
        try:
            re.compile(regex)
        except re.error as error:
            raise ConfigError(f"{option(name)} '{regex}' is not a valid regex: {error}") from None


# --- model and data ------------------------------------------------------------------------------


@dataclass
class ModelConfig(Settings):
    model: str = setting(
        EMBEDDED_MODEL,
        "opt-tiny or llama-tiny (embedded), an alias (opt-125m ... opt-2.7b, "
        "llama-3.2-1b, qwen2.5-0.5b, ...: see the README), a hub id or a local directory",
    )
    dtype: str = setting(
        "auto",
        "auto: float32 on CPU; on CUDA the checkpoint's dtype to evaluate and prune, "
        "float32 weights with bf16 autocast to train",
        choices=DTYPES,
        noun="dtype",
    )
    device: str = setting("auto", "auto: CUDA when there is one", choices=DEVICES, noun="device")
    trust_remote_code: bool = setting(False, "allow a hub model's own Python code to run")


@dataclass
class DataConfig(Settings):
    dataset: str = setting("pydocs", "wikitext2, ptb, c4, pydocs (embedded) or text:PATH")
    seqlen: int | None = setting(None, "evaluation and calibration window", at_least=2, rule=default_window)


@dataclass
class TrackingConfig(Settings):
    experiment: str | None = setting(None, "MLflow experiment (ignored under `mlflow run`)", rule=default_experiment)
    system_metrics: bool = setting(
        True,
        "record CPU, memory and GPU use in the run's System metrics (MLflow's "
        "monitor: psutil, and nvidia-ml-py on CUDA)",
        negatable=True,
    )

    def check(self) -> None:
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError(f"{option('experiment')} is empty: give a name, or leave it out for {DEFAULT_EXPERIMENT}")


@dataclass
class SavedModelConfig(Settings):
    """What becomes of the model a job saves."""

    register_model: str | None = setting(
        None,
        "register the saved model in MLflow's Model Registry under this name, "
        "its sparsity and perplexity as version tags",
    )
    overwrite: bool = setting(False, "replace a model already saved where this one goes (never done unasked)")
    log_models: str = setting(
        "final",
        "which models become MLflow LoggedModels of the run (the Models tab; `python -m pipeline models`): none; "
        "final (the saved model, no extra disk); every (each IMP iteration's too, its weights kept in "
        "<output dir>/iterations/<k>: a model's size on disk per iteration)",
        choices=LOG_MODELS,
        noun="log-models choice",
    )

    def check(self) -> None:
        if self.register_model is None:
            return
        from mlflow.exceptions import MlflowException  # deferred: only when a name is given
        from mlflow.utils.validation import _validate_model_name

        try:
            _validate_model_name(self.register_model)
        except MlflowException as error:
            raise ConfigError(
                f"{option('register_model')} '{self.register_model}' is not a name MLflow's Model Registry takes "
                f"({str(error.message).splitlines()[0]}); give a plain name such as opt-tiny-pruned"
            ) from None


# --- pruning -------------------------------------------------------------------------------------


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for unstructured, (N, M) for 'N:M' with 0 < N < M."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern or "")
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(f"{option('pattern')} '{pattern}' is not 'unstructured' or N:M with 0 < N < M (e.g. 2:4)")
    return int(match[1]), int(match[2])


@dataclass
class SparseGPTSettings(Settings):
    """SparseGPT's own settings (its criterion's `settings` group in the method registry)."""

    blocksize: int = setting(128, "SparseGPT: columns per block", at_least=1)
    percdamp: float = setting(0.01, "SparseGPT: dampening, a fraction of the Hessian's mean diagonal", at_least=0)


@dataclass
class OwlSettings(Settings):
    """OWL's own settings (--sparsity-profile owl)."""

    owl_m: float = setting(5.0, "owl: a score counts as an outlier above M times its layer's mean", above=0)
    owl_lambda: float = setting(
        0.08, "owl: the layers' sparsities span 2 x lambda around the target", at_least=0, below=0.5
    )


@dataclass
class PruneConfig(Settings):
    method: str = setting(
        DEFAULT_CRITERION,
        "pruning criterion; ria: relative importance and activations (Zhang et al. 2024); dsnot: Wanda's mask, then "
        "training-free prune-and-grow cycles (Zhang et al. 2024); random: a uniformly random mask of the same size, "
        "the control that shows whether a criterion's choice carries information",
        choices=CRITERION_NAMES,
        noun="pruning method",
    )
    sparsity: float | None = setting(
        None,
        "fraction of zeros, in [0, 1)",
        at_least=0,
        below=1,
        hint="give the fraction of zeros, e.g. 0.5",
        rule=default_sparsity,
    )
    pattern: str = setting("unstructured", "unstructured or N:M, e.g. 2:4")
    scope: str = setting(
        "layer",
        "magnitude: every matrix to the same sparsity, or one threshold over all",
        choices=("layer", "global"),
        noun="scope",
    )
    include: str | None = setting(None, "regex: prune only matrices whose name matches")
    exclude: str | None = setting(None, "regex: never prune matrices whose name matches")
    nsamples: int = setting(128, "calibration windows (SparseGPT, Wanda)", at_least=1)
    calibration_dataset: str | None = setting(
        None, "where SparseGPT and Wanda draw their calibration windows", rule=default_calibration_dataset
    )
    calibration_batch_size: int = setting(8, "calibration windows per layer forward", at_least=1)
    seed: int = setting(
        0,
        "the pruning draw: SparseGPT's and Wanda's calibration windows (0 draws the reference's "
        "windows), or the random mask",
        **SEED_RANGE,
    )
    sparsity_profile: str = setting(
        "uniform",
        "how the sparsity is spread over the decoder layers: uniform (each layer, each matrix at the target) or owl "
        "(outlier-weighed, Yin et al. 2024: a layer with more outlier activations is pruned less, the whole set "
        "exactly at the target; needs calibration windows, magnitude included)",
        choices=SPARSITY_PROFILES,
        noun="sparsity profile",
    )
    sparsegpt: SparseGPTSettings = group(SparseGPTSettings)
    owl: OwlSettings = group(OwlSettings)

    def check(self) -> None:
        self.n_m = parse_pattern(self.pattern)
        if self.n_m and self.sparsity is not None and not math.isclose(self.sparsity, self.n_m[0] / self.n_m[1]):
            raise ConfigError(
                f"{option('sparsity')} {self.sparsity:g} and {option('pattern')} {self.pattern} disagree: "
                f"an N:M pattern prunes N of every M weights ({self.n_m[0] / self.n_m[1]:g}); give one "
                "of the two"
            )
        if self.n_m and not self.criterion.patterns:
            raise ConfigError(
                f"{option('pattern')} {self.pattern}: {self.method} prunes unstructured only; use "
                f"{option('sparsity')}, or a criterion that prunes N:M "
                f"({', '.join(c.name for c in CRITERIA if c.patterns)})"
            )
        if self.scope == "global" and (not self.criterion.global_scope or self.n_m):
            raise ConfigError(f"{option('scope')} global is for unstructured magnitude pruning only")
        if self.uses_owl and (self.n_m or self.scope == "global"):
            raise ConfigError(
                f"{option('sparsity_profile')} owl gives each decoder layer its own sparsity, which an N:M "
                f"{option('pattern')} (N of every M in every layer) and {option('scope')} global (one threshold "
                "over all) leave no room for: use one of them, or the uniform profile"
            )
        for name in ("include", "exclude"):
            check_regex(name, getattr(self, name))

    @property
    def criterion(self) -> Criterion:
        """The pruning criterion's registry entry: whether it calibrates, whether it draws at random."""
        return criterion(self.method)

    @property
    def uses_owl(self) -> bool:
        return self.sparsity_profile == "owl"

    @property
    def calibrates(self) -> bool:
        """Whether it reads calibration windows: its criterion does (SparseGPT, Wanda), or OWL's outlier ratios."""
        return self.criterion.calibrates or self.uses_owl

    @property
    def fraction(self) -> float:
        """The fraction of zeros this prunes to."""
        if self.n_m:
            return self.n_m[0] / self.n_m[1]
        return self.resolved("sparsity")

    @property
    def label(self) -> str:
        amount = self.pattern if self.n_m else f"{self.fraction:.2f}"
        return (
            f"{self.method}-{amount}"
            + ("-global" if self.scope == "global" else "")
            + ("-owl" if self.uses_owl else "")
        )


# --- training ------------------------------------------------------------------------------------


@dataclass
class TrainConfig(Settings):
    epochs: int = setting(1, "epochs of training (each capped at --max-steps optimizer steps)", above=0)
    batch_size: int = setting(8, "global batch: sequences per optimizer step, split over the processes", above=0)
    lr: float = setting(1e-5, "AdamW learning rate", above=0)
    max_steps: int | None = setting(2500, "cap on optimizer steps per epoch", above=0)
    seed: int = setting(42, "data order", **SEED_RANGE)
    grad_accum: int = setting(1, "micro-batches per optimizer step", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norms)", at_least=0)
    warmup_steps: int = setting(0, "linear warmup steps", at_least=0)
    lr_schedule: str = setting(
        "constant", "within each training run, after the warmup", choices=LR_SCHEDULES, noun="lr schedule"
    )
    min_lr_ratio: float = setting(0.1, "cosine: the last step's lr as a fraction of --lr", at_least=0, at_most=1)
    grad_clip: float = setting(1.0, "maximal gradient norm (0: no clipping)", at_least=0)
    gradient_checkpointing: bool = setting(False, "trade compute for activation memory")
    autocast: str = setting(
        "auto",
        "the training compute's precision, weights staying float32: auto (bf16 on CUDA, "
        "float32 on CPU), bf16 (also on CPU) or none",
        choices=("auto", "bf16", "none"),
        noun="autocast",
    )
    log_every: int = setting(10, "steps between train_loss points in MLflow", at_least=1)
    distill: str = setting(
        "none",
        "recovery loss: none (cross-entropy); logits (+ distillation of a frozen "
        "teacher's logits: the dense model); squarehead (+ its decoder layers' outputs, Kurtic et "
        "al. 2023)",
        choices=DISTILL_MODES,
        noun="distillation",
    )
    distill_alpha: float = setting(
        0.5, "the logits term's weight: (1 - alpha) CE + alpha T^2 KL(teacher || student)", at_least=0, at_most=1
    )
    distill_temperature: float = setting(2.0, "the softmax temperature T of the logits term", above=0)
    train_params: str = setting(
        "all",
        "what a recovery trains: all (every parameter); norms-biases (the norms' weights and biases and every "
        "bias: matrices frozen); lora (low-rank adapters on the prunable matrices, their update masked so the "
        "zeros stay, merged after each training phase)",
        choices=TRAIN_PARAMS,
        noun="train-params mode",
    )
    lora_rank: int = setting(8, "lora: the adapters' rank r", above=0)
    lora_alpha: float = setting(16.0, "lora: the update is scaled by alpha / r", above=0)
    lora_targets: str | None = setting(None, "lora: regex of the prunable matrices that get an adapter (default: all)")
    recovery: str = setting(
        "finetune",
        "how a pruned model recovers: finetune (the whole model on the language-model loss); reconstruct (no "
        "language-model loss: block by block each pruned decoder block fitted to the dense model's block on the "
        "same training sequences, steps and lr, its mask kept)",
        choices=RECOVERIES,
        noun="recovery",
    )

    def check(self) -> None:
        check_regex("lora_targets", self.lora_targets)
        if self.recovery == "reconstruct" and (self.distill != "none" or self.train_params != "all"):
            given = option("distill") if self.distill != "none" else option("train_params")
            raise ConfigError(
                f"{option('recovery')} reconstruct fits every parameter of each block to the dense block's output, "
                f"so {given} has nothing to act on: leave {given} out, or use {option('recovery')} finetune"
            )


@dataclass
class ScheduleConfig(Settings):
    target_sparsity: float = setting(
        0.9, "fraction of zeros to reach", above=0, below=1, hint="give the fraction of zeros to reach, e.g. 0.9"
    )
    prune_percentage: float = setting(
        0.1,
        "fraction of the remaining non-zeros pruned per iteration",
        above=0,
        below=1,
        hint="give the fraction of the remaining weights pruned per iteration, e.g. 0.1",
    )
    max_iterations: int = setting(25, "safety cap", above=0)
    schedule: str = setting(
        "geometric",
        "sparsity after each iteration: geometric (--prune-percentage of the "
        "remaining weights) or cubic (Zhu & Gupta); one-shot (the target at once) and dense "
        "(never pruned) train as many iterations as geometric would",
        choices=SPARSITY_SCHEDULES,
        noun="schedule",
    )
    final_lr: float | None = setting(None, "last iteration's lr; geometric in between", above=0, rule=default_final_lr)
    budget: Tokens | None = setting(
        None,
        "training tokens of the whole run (k and M accepted: 320k, 1.3M), in place of --epochs and --max-steps: "
        "the budget over the tokens of one optimizer step (batch x window) is its steps, rounded to the nearest "
        "whole step and split evenly over the iterations (the last ones one step more where it does not divide); "
        "one-shot and dense train them all in one iteration after their pruning",
        above=0,
        hint="give a positive count of tokens, e.g. 320k",
    )


@dataclass
class TasksConfig(Settings):
    tasks: list[str] = setting(
        [],
        "comma-separated zero-shot tasks of lm-evaluation-harness: names (pydocs-cloze "
        "runs offline; piqa, arc_easy, ... need their data from the hub) or directories of "
        "task YAMLs",
    )
    num_fewshot: int | None = setting(None, "examples in each task's prompt (default: the task's own)", at_least=0)
    limit: int | None = setting(None, "at most this many examples per task (default: all)", at_least=1)
    tasks_batch_size: int = setting(8, "examples per forward for the tasks", at_least=1)

    def check(self) -> None:
        for name in ("limit", "num_fewshot"):
            if getattr(self, name) is not None and not self.tasks:
                raise ConfigError(
                    f"{option(name)} applies to {option('tasks')}, and none are given: give "
                    f"{option('tasks')} (e.g. pydocs-cloze) or leave {option(name)} out"
                )


# --- one config per command ----------------------------------------------------------------------


def changed(settings: Settings, names: tuple | None = None) -> list[str]:
    """The settings of `settings` (all its own, or `names`) whose value is not their declared default."""
    own = [f.name for f in fields(settings) if "check" in f.metadata and (names is None or f.name in names)]
    return [name for name in own if getattr(settings, name) != default_of(type(settings), name)]


def refuse_ignored(names: list, owner: str, reason: str) -> None:
    """Settings given where nothing reads them are refused, naming each, whose they are and why they go unread."""
    if names:
        given = ", ".join(option(name) for name in names)
        raise ConfigError(f"{given} {'is' if len(names) == 1 else 'are'} {owner}, and {reason}: leave {given} out")


LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_targets")


def refuse_unused_owl(prune: PruneConfig, used: bool) -> None:
    """OWL's settings where nothing prunes with OWL's layer sparsities."""
    if not used:
        refuse_ignored(changed(prune.owl), "OWL's", f"nothing here prunes with {option('sparsity_profile')} owl")


def refuse_unused_lora(train: TrainConfig, used: bool) -> None:
    """LoRA's settings where nothing trains adapters."""
    if not used:
        reason = f"nothing here trains with {option('train_params')} lora"
        refuse_ignored(changed(train, LORA_SETTINGS), "LoRA's", reason)


def refuse_float16_training(model: ModelConfig) -> None:
    if model.dtype == "float16":
        raise ConfigError(
            f"{option('dtype')} float16 cannot train: AdamW's small updates vanish in float16 weights "
            f"and the loss becomes nan at any lr; use {option('dtype')} auto (float32 weights, bf16 "
            "autocast on CUDA) or float32"
        )


@dataclass
class RunConfig(Settings):
    """What every command that loads a model has: the model, the data and the MLflow experiment."""

    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    tracking: TrackingConfig = group(TrackingConfig)


@dataclass
class EvaluateConfig(RunConfig):
    tasks: TasksConfig = group(TasksConfig)
    split: str = setting("test", "split to evaluate", choices=SPLITS, noun="split")
    eval_batch_size: int | None = setting(
        None, "windows per forward", at_least=1, rule=default_eval_batch_size, aliases=("batch_size",)
    )


@dataclass
class PruneRunConfig(RunConfig):
    prune: PruneConfig = group(
        PruneConfig,
        defaults={"method": "sparsegpt"},
        rename={"method": "prune_method", "seed": "prune_seed"},
        aliases={"prune_method": ("method",), "prune_seed": ("seed",)},
    )
    tasks: TasksConfig = group(TasksConfig)
    saved_model: SavedModelConfig = group(SavedModelConfig)
    output_dir: str | None = setting(None, "where the pruned model goes", rule=default_pruned_dir)

    def check(self) -> None:
        refuse_unused_owl(self.prune, self.prune.uses_owl)


@dataclass
class TrainRunConfig(RunConfig):
    train: TrainConfig = group(TrainConfig)
    tasks: TasksConfig = group(TasksConfig)
    saved_model: SavedModelConfig = group(SavedModelConfig)
    output_dir: str | None = setting(None, "where the trained model goes", rule=default_trained_dir)
    teacher: str | None = setting(
        None,
        "the model --distill learns from, or --recovery reconstruct fits each block to (default for --distill: the "
        "model as loaded; give the dense one when training a pruned model)",
    )

    def check(self) -> None:
        refuse_float16_training(self.model)
        refuse_unused_lora(self.train, self.train.train_params == "lora")
        if self.train.recovery == "reconstruct" and not self.teacher:
            raise ConfigError(
                f"{option('recovery')} reconstruct fits each block to the unpruned model's: give {option('teacher')} "
                "(the model before pruning, e.g. opt-tiny)"
            )
        if self.teacher and self.train.distill == "none" and self.train.recovery == "finetune":
            raise ConfigError(
                f"{option('teacher')} is what {option('distill')} learns from, and {option('distill')} "
                f"is none: add {option('distill')} logits or squarehead, or leave {option('teacher')} out"
            )


@dataclass
class IterativeConfig(RunConfig):
    schedule: ScheduleConfig = group(ScheduleConfig)
    train: TrainConfig = group(TrainConfig, rename={"epochs": "epochs_per_iteration"}, defaults={"epochs": 3})
    prune: PruneConfig = group(
        PruneConfig, rename={"method": "prune_method", "seed": "prune_seed"}, exclude=("sparsity", "pattern")
    )
    tasks: TasksConfig = group(TasksConfig, rename={"tasks": "eval_tasks"})
    saved_model: SavedModelConfig = group(SavedModelConfig)
    eval_tasks_every: int = setting(
        1,
        "run --eval-tasks on the dense model and after every N-th iteration and the last; 0: after the last only",
        at_least=0,
    )
    eval_every: int = setting(
        1,
        "measure the perplexity after every N-th iteration's pruning and training, and always after the last; 0: "
        "after the last only (the iterations between log no perplexity; their models are the same)",
        at_least=0,
    )
    train_seqlen: int | None = setting(None, "training window", at_least=2, rule=default_train_seqlen)
    eval_split: str = setting(
        "test", "split evaluated after each pruning and each training step", choices=SPLITS, noun="split"
    )
    validate: bool = setting(
        False,
        "also measure the final model on the validation split (final_val_perplexity: what a learning-rate "
        "sweep selects on, never the test split)",
    )
    output_dir: str | None = setting(None, "checkpoint directory", rule=default_checkpoint_dir)
    resume: bool = setting(False, "continue from the last completed iteration in --output-dir")
    save_model: bool = setting(True, "save the final model", negatable=True)
    rewind: str = setting("none", REWIND_HELP)
    model_dir: str | None = setting(
        None,
        "where the final model goes: a save_pretrained directory, and a state dict beside it as <dir>.pt",
        rule=default_final_model_dir,
    )

    def check(self) -> None:
        refuse_float16_training(self.model)
        refuse_unused_owl(self.prune, self.prune.uses_owl)
        refuse_unused_lora(self.train, self.train.train_params == "lora")
        if not re.fullmatch(r"none|dense|iteration:\d+", self.rewind):
            raise ConfigError(
                f"{option('rewind')} '{self.rewind}' is not none, dense or iteration:K (e.g. iteration:1)"
            )

    @property
    def rewind_iteration(self) -> int | None:
        """The iteration whose trained weights survivors are reset to (0: the dense model), or None."""
        return None if self.rewind == "none" else 0 if self.rewind == "dense" else int(self.rewind.split(":")[1])


@dataclass
class GridConfig(Settings):
    sparsities: list[float] = setting(
        [0.5, 0.9],
        "comma-separated target sparsities",
        above=0,
        below=1,
        min_items=1,
        hint="give fractions of zeros, e.g. 0.5,0.9",
    )
    methods: list[str] = setting(
        list(DEFAULT_GRID),
        "comma-separated methods: one-shot sparsegpt, magnitude, wanda (untrained); "
        "iterative; X+ft = one-shot X then the iterative cell's training budget; dense+ft = "
        "the unpruned model trained as long; X-owl, X-owl+ft, iterative-owl = the same with OWL's layer "
        "sparsities (--owl-m, --owl-lambda)",
        choices=GRID_METHODS,
        min_items=1,
        noun="method",
        hint="give at least one, e.g. sparsegpt,iterative",
    )
    seeds: list[int] = setting(
        [0],
        "comma-separated seeds: each repeats every stochastic cell (calibration draw, "
        "data order); 0 draws the reference's calibration windows",
        min_items=1,
        at_least=0,
        at_most=SEED_RANGE["at_most"],
        hint="give whole numbers from 0 to 2^63 - 1, at least one, e.g. 0,1,2",
    )
    patterns: list[str] = setting(
        [], "comma-separated N:M patterns: the one-shot methods also prune to each, e.g. 2:4 (untrained)"
    )
    distill: list[str] = setting(
        ["none"],
        "comma-separated recovery losses of the trained cells, each a cell of its "
        "own: none (cross-entropy), logits (+ the dense model's logits), squarehead (+ its "
        "layers' outputs)",
        choices=DISTILL_MODES,
        min_items=1,
        noun="distillation",
        hint="give at least one, e.g. none",
        aliases=("recoveries",),
        value_aliases={"ce": "none"},
    )
    train_params: list[str] = setting(
        ["all"],
        "comma-separated: what each trained cell trains, each a cell of its own: all, norms-biases or lora "
        "(--lora-rank, --lora-alpha, --lora-targets)",
        choices=TRAIN_PARAMS,
        min_items=1,
        noun="train-params mode",
        hint="give at least one, e.g. all",
    )
    recovery: list[str] = setting(
        ["finetune"],
        "comma-separated: how each trained cell recovers, each a cell of its own: finetune (the language-model "
        "loss) or reconstruct (block by block, each pruned block fitted to the dense block's output; with --train-"
        "params all and --distill none only: the grid makes no other combination of it)",
        choices=RECOVERIES,
        min_items=1,
        noun="recovery",
        hint="give at least one, e.g. finetune",
    )
    lrs: list[float] = setting(
        [],
        "comma-separated learning rates of a sweep: every trained cell runs at each (each method gets the same "
        "grid); per method, target and recovery loss the report uses the one with the lowest mean validation "
        "perplexity over the seeds; --final-lr scales with it; empty: --lr alone",
        above=0,
        hint="give positive learning rates, e.g. 1e-4,3e-4,1e-3",
    )
    extend_lrs: int = setting(
        0,
        "where the lr selected for a method, target and recovery is the smallest or largest of those tried, run "
        "one more rung of the --lrs ladder past it (1e-4,3e-4,1e-3 goes on 3e-3, 1e-2 or 3e-5, 1e-5), every seed, "
        "and select again: at most N rungs per edge; 0: the sweep as given",
        at_least=0,
    )
    budgets: list[Tokens] = setting(
        [],
        "comma-separated training budgets, each a cell of its own: the training tokens of every trained cell "
        "(k and M accepted: 80k,320k,1.3M; --budget of each cell); iterative splits its budget evenly over its "
        "iterations, X+ft and dense+ft train it in one run after their pruning; empty: --max-steps per iteration",
        above=0,
        hint="give positive counts of tokens, e.g. 80k,320k",
    )
    prune_percentages: list[float] = setting(
        [],
        "comma-separated step sizes of the methods that prune step by step (iterative, iterative-sparsegpt, ...), "
        "each a cell of its own: the fraction of the remaining weights pruned per iteration (0.1 reaches 90% in "
        "22 steps); needs --budgets, so that every step size trains the same tokens; empty: --prune-percentage",
        above=0,
        below=1,
        hint="give fractions of the remaining weights, e.g. 0.1,0.3",
    )
    eval_every: int = setting(
        1,
        "each trained cell measures its perplexity after every N-th iteration and the last; 0: the last only (a "
        "grid read for its final models runs faster; the per-iteration curves then hold the last point alone)",
        at_least=0,
    )
    force: bool = setting(False, "rerun cells that already have a finished run")
    output_dir: str | None = setting(None, "where the grid's tables and report go", rule=default_report_dir)
    report: bool = setting(True, "write the report when the grid is done", negatable=True)


EXECUTORS = ("local", "submitit")


# Settings that came after runs were first made, each with the value that means "as before": at that value a
# setting is no part of a grid cell's key, so a cell made before it existed keeps its key and is reused, and a
# checkpoint made before it existed resumes.
SINCE = {"budget": None, "recovery": "finetune", "eval_every": 1}


def unset_since(key: str, value) -> bool:
    """Whether `key` is a setting that came later and `value` is its "as before"."""
    return key in SINCE and value == SINCE[key]


def default_threads_per_cell(executor) -> int:
    """this machine's cores split over --parallel; in the compare process itself, its threads as they are"""
    return max(1, (os.cpu_count() or 1) // executor.parallel)


@dataclass
class ExecutorConfig(Settings):
    """Where a grid's cells run."""

    executor: str = setting(
        "local",
        "local: this machine; submitit: each cell a job of a Slurm job array (submitit's local executor off a cluster)",
        choices=EXECUTORS,
        noun="executor",
    )
    parallel: int = setting(
        1, "cells at a time, each a process of its own when above 1 (submitit: the array's parallelism)", at_least=1
    )
    gpus_per_cell: int = setting(
        1, "GPUs of each cell's own (CUDA_VISIBLE_DEVICES); above 1 the cell runs under accelerate launch", at_least=1
    )
    threads_per_cell: int | None = setting(None, "CPU threads of each cell", at_least=1, rule=default_threads_per_cell)
    shard: str | None = setting(
        None, "K/N: run only the K-th of N fixed slices of the grid's cells (by cell key) and write no report"
    )
    wait: bool = setting(
        True, "wait for the submitted cells (--no-wait: return at once; a later compare collects them)", negatable=True
    )
    slurm_partition: str | None = setting(None, "Slurm partition of the cell jobs")
    slurm_time: int = setting(240, "minutes each cell job may run (Slurm's time limit)", at_least=1)
    slurm_setup: list[str] = setting(
        [], "comma-separated shell lines each cell job runs first, e.g. 'source venv/bin/activate'"
    )
    slurm_requeue: bool = setting(False, "a cell job Slurm stops (preemption, time limit) is requeued and resumes")
    executor_config: str | None = setting(
        None, "a YAML file of further submitit parameters, e.g. slurm_mem_gb: 32, slurm_constraint: a100"
    )

    def check(self) -> None:
        if self.shard is not None:
            match = re.fullmatch(r"(\d+)/(\d+)", self.shard)
            if not match or not 1 <= int(match[1]) <= int(match[2]):
                raise ConfigError(f"{option('shard')} '{self.shard}' is not K/N with 1 <= K <= N (e.g. 1/4)")
        if self.executor == "local":
            given = [name for name in ("slurm_partition", "executor_config") if getattr(self, name)]
            given += ["slurm_setup"] if self.slurm_setup else []
            given += ["slurm_requeue"] if self.slurm_requeue else []
            if given:
                raise ConfigError(
                    f"{', '.join(option(name) for name in given)} {'is' if len(given) == 1 else 'are'} for "
                    f"{option('executor')} submitit; the cells run on this machine"
                )
        if self.executor == "local" and not self.wait:
            raise ConfigError(
                f"returning before the cells finish ({option('wait')} off) is for {option('executor')} submitit: "
                "local cells are this process's own children"
            )
        if self.executor_config and not os.path.isfile(self.executor_config):
            raise ConfigError(f"{option('executor_config')} {self.executor_config} is not a file")

    @property
    def in_process(self) -> bool:
        """The cells one after another in the compare process itself (the default: nothing to start or wait for)."""
        return self.executor == "local" and self.parallel == 1

    @property
    def shard_numbers(self) -> tuple[int, int]:
        k, n = self.shard.split("/")
        return int(k), int(n)


# The settings each `compare --preset` changes unless given; MLproject's `main` and `tuned` entry points run
# `compare --preset demo` and `--preset tuned` with these values as their defaults (a test holds them equal).
PRESETS = {
    # the main job: the whole comparison on opt-tiny in 11 to 18 minutes on 2 cores, one lr (its report says so)
    "demo": {
        "prune_percentage": 0.3,
        "epochs_per_iteration": 1,
        "max_steps": 40,
        "batch_size": 16,
        "lr": 1e-3,
        "tasks": ["pydocs-cloze"],
        "tasks_batch_size": 16,
    },
}
# every trained method at the lr its validation perplexity selects from five spanning 100x (wide enough that
# each pruned method's optimum on the embedded models lies inside; a selection at an edge is reported), three
# seeds, three targets: 225 trained cells, so each trains a quarter of the demo's tokens (half its steps of half
# its batch) and no task runs, about two hours on 2 cores
PRESETS["tuned"] = {
    **PRESETS["demo"],
    "max_steps": 20,
    "batch_size": 8,
    "tasks": [],
    "sparsities": [0.5, 0.7, 0.9],
    "methods": ["sparsegpt", "magnitude", "wanda", "iterative", "magnitude+ft", "sparsegpt+ft", "wanda+ft", "dense+ft"],
    "seeds": [0, 1, 2],
    "lrs": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
}


# where iterating pays: every method at three budgets spanning 16x (8, 32 and 128 steps of 8 x 256 tokens), the
# step-by-step methods at three step sizes, five targets to 95%, three lrs around the tuned optima, three seeds;
# only the final models are measured. 1,107 trained cells, about nine hours on 2 cores alone (docs/commands.md)
PRESETS["crossover"] = {
    **PRESETS["tuned"],
    "sparsities": [0.5, 0.7, 0.8, 0.9, 0.95],
    "methods": [
        "sparsegpt",
        "magnitude",
        "iterative",
        "iterative-sparsegpt",
        "sparsegpt+ft",
        "magnitude+ft",
        "dense+ft",
    ],
    "lrs": [1e-4, 3e-4, 1e-3],
    "extend_lrs": 2,  # where a selection is at an edge: two rungs more at most (3e-3, 1e-2 or 3e-5, 1e-5)
    "budgets": [16384, 65536, 262144],
    "prune_percentages": [0.1, 0.3, 0.5],
    "max_iterations": 29,  # 0.1 of the remainder per step reaches 95% in 29
    "eval_every": 0,
}


# how to recover after SparseGPT: every parameter, LoRA inside the mask, the norms and biases, or block-by-block
# reconstruction, each at five lrs spanning 100x, at one budget (32 steps of 8 x 256 tokens), three targets, three
# seeds: 180 trained cells, about an hour on 2 cores
PRESETS["recovery-modes"] = {
    **PRESETS["tuned"],
    "methods": ["sparsegpt", "sparsegpt+ft"],
    "train_params": ["all", "lora", "norms-biases"],
    "recovery": ["finetune", "reconstruct"],
    "lrs": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "budgets": [65536],
}


def _preset_value(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_help() -> str:
    """What each preset sets, written from PRESETS itself."""
    described = "; ".join(
        f"{name}: " + ", ".join(f"{key.replace('_', '-')} {_preset_value(value)}" for key, value in values.items())
        for name, values in PRESETS.items()
    )
    return (
        "settings a preset changes unless given (demo: the MLproject's main entry point; tuned: its `tuned` entry "
        "point, each method's lr selected on validation; crossover: its `crossover` entry point, every trained method "
        "at three budgets and the step-by-step ones at three step sizes; recovery-modes: its `recovery-modes` entry "
        f"point, SparseGPT then four ways of recovering, each at its own lr) - {described}"
    )


@dataclass
class CompareConfig(RunConfig):
    PRESETS: ClassVar[dict] = PRESETS

    grid: GridConfig = group(GridConfig)
    schedule: ScheduleConfig = group(ScheduleConfig, exclude=("target_sparsity", "budget"))
    train: TrainConfig = group(
        TrainConfig,
        rename={"epochs": "epochs_per_iteration"},
        defaults={"epochs": 3},
        exclude=("seed", "distill", "train_params", "recovery"),
    )
    prune: PruneConfig = group(
        PruneConfig,
        exclude=("method", "sparsity", "pattern", "scope", "include", "exclude", "seed", "sparsity_profile"),
    )
    tasks: TasksConfig = group(TasksConfig)
    executor: ExecutorConfig = group(ExecutorConfig)
    saved_model: SavedModelConfig = group(SavedModelConfig, exclude=("register_model", "overwrite"))
    preset: str | None = setting(None, preset_help(), choices=tuple(PRESETS), noun="preset")

    def check(self) -> None:
        for pattern in self.grid.patterns:
            try:
                n_m = parse_pattern(pattern)
            except ConfigError:
                n_m = None
            if n_m is None:
                raise ConfigError(f"{option('patterns')} takes N:M patterns with 0 < N < M (e.g. 2:4), not {pattern}")
        trained = [name for name in self.grid.methods if METHODS[name].kind == "trained"]
        if trained:
            refuse_float16_training(self.model)
        self.check_budgets(trained)
        self.check_recoveries()
        refuse_unused_owl(self.prune, any(METHODS[name].profile == "owl" for name in self.grid.methods))
        refuse_unused_lora(self.train, bool(trained) and "lora" in self.grid.train_params)
        if self.grid.extend_lrs and len(self.grid.lrs) < 2:
            raise ConfigError(
                f"{option('extend_lrs')} {self.grid.extend_lrs} continues the ladder of an lr sweep past its edges, "
                f"which needs {option('lrs')} with two learning rates or more, e.g. 1e-4,3e-4,1e-3"
            )
        if not trained and self.grid.lrs:
            raise ConfigError(
                f"{option('lrs')} {','.join(f'{lr:g}' for lr in self.grid.lrs)} are the trained cells' learning "
                f"rates, and {option('methods')} has none: add iterative or an X+ft method, or leave "
                f"{option('lrs')} out"
            )
        for name, value, plain, what in (
            ("distill", self.grid.distill, ["none"], "the recovery loss"),
            ("train_params", self.grid.train_params, ["all"], "what a recovery trains"),
            ("recovery", self.grid.recovery, ["finetune"], "how a recovery trains"),
        ):
            if not trained and value != plain:
                raise ConfigError(
                    f"{option(name)} {','.join(value)} is {what} of the trained cells, and {option('methods')} has "
                    f"none: add iterative or an X+ft method, or leave {option(name)} out"
                )
        if self.schedule.schedule not in ("geometric", "cubic"):
            raise ConfigError(
                f"{option('schedule')} {self.schedule.schedule} is for the iterative cells, which "
                "prune step by step: use geometric or cubic (the +ft cells are the one-shot ones)"
            )

    def check_recoveries(self) -> None:
        """Reconstruction goes with every parameter and the language-model loss only (the grid makes no cell of
        it with lora, norms-biases or a distillation loss): each value given must make a cell."""
        grid = self.grid
        if "reconstruct" not in grid.recovery:
            return
        others = {"distill": ("none", grid.distill), "train_params": ("all", grid.train_params)}
        for name, (plain, values) in others.items():
            if plain not in values:
                raise ConfigError(
                    f"{option('recovery')} reconstruct fits every parameter of each block to the dense block's "
                    f"output, so it makes no cell with {option(name)} {','.join(values)}: add {plain} to "
                    f"{option(name)}, or run reconstruct in a grid of its own"
                )
            if grid.recovery == ["reconstruct"] and values != [plain]:
                raise ConfigError(
                    f"{option(name)} {','.join(v for v in values if v != plain)} makes no cell with "
                    f"{option('recovery')} reconstruct alone: add finetune to {option('recovery')}"
                )

    def check_budgets(self, trained: list) -> None:
        """Budgets are the trained cells'; step sizes are the step-by-step methods', and compare at one budget."""
        budgets = ",".join(map(str, self.grid.budgets))
        if self.grid.budgets and not trained:
            raise ConfigError(
                f"{option('budgets')} {budgets} are the trained cells' training tokens, and {option('methods')} "
                f"has none: add iterative or an X+ft method, or leave {option('budgets')} out"
            )
        if not self.grid.prune_percentages:
            return
        steps = ",".join(f"{p:g}" for p in self.grid.prune_percentages)
        if not any(METHODS[name].prunes_step_by_step for name in trained):
            raise ConfigError(
                f"{option('prune_percentages')} {steps} are the step sizes of the methods that prune step by step, "
                f"and {option('methods')} has none: add iterative, or leave {option('prune_percentages')} out"
            )
        if not self.grid.budgets:
            raise ConfigError(
                f"{option('prune_percentages')} {steps} needs {option('budgets')}: at a fixed number of steps per "
                f"iteration each step size would train a different number of tokens; give {option('budgets')} "
                "(e.g. 80k,320k)"
            )
        needed = max(iterations_to_reach(s, p) for s in self.grid.sparsities for p in self.grid.prune_percentages)
        if needed > self.schedule.max_iterations:
            raise ConfigError(
                f"{option('prune_percentages')} {steps} needs {needed} iterations to reach "
                f"{max(self.grid.sparsities):g}, above {option('max_iterations')} {self.schedule.max_iterations}: "
                f"give {option('max_iterations')} {needed} or more, or larger step sizes"
            )


@dataclass
class ReportConfig(Settings):
    experiment: str | None = setting(None, "MLflow experiment to report on (default: the one the report run goes to)")
    output_dir: str | None = setting(None, "where the report goes", rule=default_report_dir)


@dataclass
class ModelsConfig(Settings):
    experiment: str = setting(DEFAULT_EXPERIMENT, "MLflow experiment whose logged models to list")
    sparsity: float | None = setting(None, "only the models pruned to this target sparsity", at_least=0, below=1)
    method: str | None = setting(None, "only the models of this method (as the grid names it, e.g. sparsegpt+ft)")

    def check(self) -> None:
        if not self.experiment.strip():
            raise ConfigError(f"{option('experiment')} is empty: give the experiment's name")


@dataclass
class SyncConfig(Settings):
    paths: list[str] = setting(
        [], "journal files, or directories to search (default: the current directory)", argument=True
    )
    tracking_uri: str | None = setting(None, "default: MLFLOW_TRACKING_URI, else the store the run started in")


@dataclass
class MemoryConfig(Settings):
    measure: bool = setting(
        True,
        "also train small random OPT and Llama models on the CPU and compare their peak memory with the formula",
        negatable=True,
    )


@dataclass
class PretrainConfig(Settings):
    arch: str = setting(
        "opt",
        "opt: OPTForCausalLM (learned positions, LayerNorm, ReLU MLP); llama: LlamaForCausalLM "
        "(RoPE, RMSNorm, SwiGLU MLP, grouped-query attention)",
        choices=PRETRAIN_ARCHES,
        noun="arch",
    )
    vocab_size: int = setting(4096, "byte-level BPE vocabulary", at_least=300)
    hidden_size: int = setting(192, "model width", at_least=8)
    num_layers: int = setting(4, "decoder layers", at_least=1)
    num_heads: int = setting(4, "attention heads", at_least=1)
    num_kv_heads: int | None = setting(None, "key/value heads", at_least=1, rule=default_kv_heads)
    ffn_dim: int | None = setting(None, "MLP width", at_least=8, rule=default_ffn)
    max_positions: int = setting(256, "positions, which is also the training window", at_least=8)
    lr: float = setting(3e-3, "peak learning rate (cosine decay)", above=0)
    warmup_steps: int = setting(50, "linear warmup steps", at_least=0)
    steps: int = setting(1800, "optimizer steps", at_least=1)
    batch_size: int = setting(16, "sequences per optimizer step", at_least=1)
    weight_decay: float = setting(0.1, "AdamW weight decay", at_least=0)
    seed: int = setting(0, "initialization and data order", **SEED_RANGE)
    output_dir: str | None = setting(
        None, "where the model, its tokenizer and its card go", rule=default_pretrained_dir
    )
    tracking: TrackingConfig = group(TrackingConfig)

    def check(self) -> None:
        kv = self.resolved("num_kv_heads")
        if self.hidden_size % self.num_heads or self.num_heads % kv:
            raise ConfigError(
                f"{option('hidden_size')} {self.hidden_size}, {option('num_heads')} {self.num_heads} and "
                f"{option('num_kv_heads')} {kv} do not divide: the heads must split the width and the "
                "key/value heads the heads"
            )

    @property
    def name(self) -> str:
        return f"{self.arch}-tiny"


@dataclass
class BenchConfig(RunConfig):
    # MLflow's system-metrics monitor samples in a thread of its own, which would compete with what is timed
    tracking: TrackingConfig = group(TrackingConfig, defaults={"system_metrics": False})
    batch_size: int = setting(16, "sequences per training step (the demo's: 16 x 256 tokens on opt-tiny)", at_least=1)
    quick: bool = setting(False, "a smoke run in seconds: tiny sizes, figures not meaningful")
    output_dir: str | None = setting(None, "where the tables go", rule=default_bench_dir)
    steps: int = setting(10, "training steps per timed run (a, b)", at_least=1, cli=False)
    repeats: int = setting(9, "timed runs per variant, alternated; the median counts", at_least=1, cli=False)
    eval_windows: int | None = setting(
        None, "cap on evaluation windows (c); default the whole test split", at_least=1, cli=False
    )
    calibration_samples: int = setting(32, "SparseGPT calibration windows (d)", at_least=1, cli=False)
    logged_steps: int = setting(2000, "simulated training steps of metrics (e)", at_least=1, cli=False)
    imp_steps: int = setting(40, "training steps per IMP iteration (f), the demo's --max-steps", at_least=1, cli=False)

    def check(self) -> None:
        if self.quick:
            self.steps, self.repeats, self.eval_windows = 2, 1, 4
            self.calibration_samples, self.logged_steps, self.imp_steps = 4, 200, 2
            self.data.seqlen = self.data.seqlen or 64
            self.batch_size = min(self.batch_size, 8)
