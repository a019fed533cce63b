"""What a job works on: the model, its tokenizer, the corpus and the window, loaded once from the configs,
plus the calibration windows of SparseGPT and Wanda."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import EMBEDDED_MODEL, DataConfig, ModelConfig, PruneConfig
from .data import Corpus, calibration_windows, load_corpus, training_blocks
from .models import load_model_and_tokenizer, resolve_device, resolve_seqlen, training_dtype
from .perplexity import PerplexityResult, evaluate_on


def calibration_dataset_for(model_name: str, dataset: str, explicit: str | None = None) -> str:
    """Hub models calibrate on C4, as the reference; the embedded model on pydocs, the corpus it knows;
    a local directory on the evaluation dataset's train split (it may not know C4 either)."""
    if explicit:
        return explicit
    if model_name == EMBEDDED_MODEL:
        return "pydocs"
    return dataset if os.path.isdir(model_name) else "c4"


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

    def training_blocks(self, seqlen: int | None = None) -> torch.Tensor:
        return training_blocks(self.corpus, self.tokenizer, resolve_seqlen(self.model, seqlen or self.seqlen))

    def calibration(self, prune: PruneConfig) -> tuple[torch.Tensor | None, Corpus | None]:
        """(windows, the corpus they come from) for a calibrated method; (None, None) for magnitude."""
        if not prune.calibrated:
            return None, None
        name = calibration_dataset_for(self.model_config.model, self.data_config.dataset, prune.calibration_dataset)
        corpus = self.corpus if name == self.data_config.dataset else load_corpus(name)
        return calibration_windows(corpus, self.tokenizer, prune.nsamples, self.seqlen, prune.calibration_seed), corpus


def load_workload(model: ModelConfig, data: DataConfig, *, training: bool = False,
                  keep_on_cpu: bool = False) -> Workload:
    """`training`: float32 weights under `--dtype auto` (see models.training_dtype); `keep_on_cpu`: the
    model stays in host memory (SparseGPT moves one layer at a time to the device)."""
    dtype = training_dtype(model.dtype) if training else model.dtype
    lm, tokenizer = load_model_and_tokenizer(model.model, dtype, model.device, model.trust_remote_code, keep_on_cpu)
    seqlen = resolve_seqlen(lm, data.seqlen)  # a bad window fails before the corpus is built
    return Workload(lm, tokenizer, load_corpus(data.dataset), seqlen, resolve_device(model.device), model, data)
