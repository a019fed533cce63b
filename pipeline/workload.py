"""What a job works on: the model, its tokenizer, the corpus and the window, loaded once from the configs,
plus the calibration windows of SparseGPT and Wanda; and what of these can be checked before a run opens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .caching import cache_dir
from .config import DataConfig, ModelConfig, PruneConfig
from .data import Corpus, calibration_windows, eval_tokens, load_corpus, training_blocks
from .errors import ConfigError, option
from .models import load_model, load_tokenizer, model_skeleton, resolve_device, resolve_seqlen, training_dtype
from .perplexity import PerplexityResult, evaluate_on
from .pruning import check_prunable


@dataclass
class Inputs:
    """What was checked before a run opened: the model's structure (meta device, no weights), its
    tokenizer and the corpus."""

    skeleton: nn.Module
    tokenizer: object
    corpus: Corpus


def check_inputs(
    model: ModelConfig,
    data: DataConfig,
    *,
    eval_split: str | tuple | None = "test",
    train_seqlen: int | None = None,
    training: bool = False,
    prune: PruneConfig | None = None,
) -> Inputs:
    """Everything that fails on bad input, checked without loading weights: the cache, the model's source
    and structure, the window(s), what `prune` would prune, and that each split holds a whole window."""
    cache_dir()
    resolve_device(model.device)
    skeleton = model_skeleton(model.model, model.trust_remote_code)
    seqlen = resolve_seqlen(skeleton, data.seqlen)
    if prune is not None:
        check_prunable(skeleton, prune)
    tokenizer = load_tokenizer(model.model, model.trust_remote_code)
    corpus = load_corpus(data.dataset)
    token_ids = []
    for split in (eval_split,) if isinstance(eval_split, str) else eval_split or ():
        token_ids.append(eval_tokens(corpus, tokenizer, split, seqlen))
    if training:
        window = resolve_seqlen(skeleton, train_seqlen, "train_seqlen") if train_seqlen else seqlen
        token_ids.append(training_blocks(corpus, tokenizer, window))
    check_vocabulary(skeleton, model.model, token_ids, data.dataset)
    return Inputs(skeleton, tokenizer, corpus)


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the input embedding: the ids the model can read (its config's vocab_size may say otherwise)."""
    return model.get_input_embeddings().num_embeddings


def check_vocabulary(skeleton: nn.Module, name: str, token_ids: list, dataset: str) -> None:
    """Every token id the data holds has an embedding row: a tokenizer that does not belong to the model
    is one line now, not an IndexError mid-run."""
    highest = max((int(ids.max()) for ids in token_ids if ids.numel()), default=-1)
    if highest >= vocabulary_size(skeleton):
        raise ConfigError(
            f"{option('model')} {name} reads token ids below {vocabulary_size(skeleton)}, but its tokenizer gives "
            f"{dataset} ids up to {highest}: the tokenizer saved with the model is not the model's own"
        )


def check_teacher(
    student: nn.Module, teacher: str, distill: str, trust_remote_code: bool = False, recovery: str = "finetune"
) -> nn.Module:
    """The teacher a distilling recovery learns from, checked on skeletons: the logits term compares the two
    models' logits token by token (one vocabulary); SquareHead also compares each decoder layer's output
    (the same depth and width)."""
    skeleton = model_skeleton(teacher, trust_remote_code, setting="teacher")
    if vocabulary_size(skeleton) != vocabulary_size(student):
        raise ConfigError(
            f"{option('teacher')} {teacher} has a vocabulary of {vocabulary_size(skeleton)} tokens and the model "
            f"{vocabulary_size(student)}: distillation compares their logits token by token, so they must share "
            "one vocabulary (and tokenizer)"
        )
    if distill == "squarehead" or recovery == "reconstruct":
        shapes = [(m.config.num_hidden_layers, m.config.hidden_size) for m in (skeleton, student)]
        what = f"{option('recovery')} reconstruct" if recovery == "reconstruct" else f"{option('distill')} squarehead"
        if shapes[0] != shapes[1]:
            raise ConfigError(
                f"{what} compares each decoder layer's output, but {option('teacher')} "
                f"{teacher} has {shapes[0][0]} layers of width {shapes[0][1]} and the model {shapes[1][0]} of "
                f"{shapes[1][1]}: use a teacher of the same shape, or {option('distill')} logits"
            )
    return skeleton


@dataclass
class Workload:
    model: nn.Module
    tokenizer: object
    corpus: Corpus
    seqlen: int
    device: torch.device
    model_config: ModelConfig
    data_config: DataConfig

    def evaluate(self, split: str = "test", batch_size: int | None = None) -> PerplexityResult:
        return evaluate_on(self.model, self.tokenizer, self.corpus, split, self.seqlen, self.device, batch_size)

    def record_inputs(
        self,
        tracker,
        evaluation: str | None = None,
        training: torch.Tensor | None = None,
        calibration: tuple | None = None,
    ) -> None:
        """The datasets the run reads, in MLflow's Datasets: an evaluation split, training blocks, and
        (windows, corpus) of a calibration draw."""
        if evaluation:
            tokens = eval_tokens(self.corpus, self.tokenizer, evaluation, self.seqlen).numel()
            tracker.log_input(**self.corpus.dataset_input(evaluation, tokens, "evaluation"))
        if training is not None:
            tracker.log_input(**self.corpus.dataset_input("train", training.numel(), "training"))
        if calibration is not None and calibration[0] is not None:
            windows, corpus = calibration
            tracker.log_input(**corpus.dataset_input("train", windows.numel(), "calibration"))

    def dataset_of(self, split: str, context: str = "evaluation") -> tuple[str, str]:
        """(name, digest) of the dataset `record_inputs` logs for a split: what metrics measured on it link to."""
        described = self.corpus.dataset_input(split, 0, context)
        return described["name"], described["digest"]

    def training_blocks(self, seqlen: int | None = None) -> torch.Tensor:
        return training_blocks(self.corpus, self.tokenizer, resolve_seqlen(self.model, seqlen or self.seqlen))

    def calibration(self, prune: PruneConfig) -> tuple[torch.Tensor | None, Corpus | None]:
        """(windows, the corpus they come from) for a calibrated method or profile; (None, None) for magnitude."""
        if not prune.calibrates:
            return None, None
        name = prune.resolved("calibration_dataset", self.model_config.model, self.data_config.dataset)
        corpus = self.corpus if name == self.data_config.dataset else load_corpus(name)
        return calibration_windows(corpus, self.tokenizer, prune.nsamples, self.seqlen, prune.seed), corpus


def load_workload(
    model: ModelConfig,
    data: DataConfig,
    inputs: Inputs | None = None,
    *,
    training: bool = False,
    keep_on_cpu: bool = False,
) -> Workload:
    """`training`: float32 weights under `--dtype auto` (see models.training_dtype); `keep_on_cpu`: the
    model stays in host memory (SparseGPT moves one layer at a time to the device)."""
    inputs = inputs or check_inputs(model, data, eval_split=None)
    dtype = training_dtype(model.dtype) if training else model.dtype
    lm = load_model(model.model, dtype, model.device, model.trust_remote_code, keep_on_cpu)
    return Workload(
        lm, inputs.tokenizer, inputs.corpus, resolve_seqlen(lm, data.seqlen), resolve_device(model.device), model, data
    )
