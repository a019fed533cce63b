"""Peak memory of recovery training and of SparseGPT, from a formula, and measured on CPU to check it.

Training, per process (DDP keeps a full replica on every GPU):
    weights + gradients + AdamW's two moments      4 * P * param_bytes
    masks (MaskKeeper, in the weight dtype)        P_prunable * param_bytes
    under FSDP over N processes, both of these / N, plus the all-gathered weights and gradients of the
    two largest wrapped units (the root with the embeddings, and a decoder layer: wrap OPTDecoderLayer)
    activations kept for backward, per token       L * ((9h + 2 ffn) * act_bytes + 2h)     (SDPA attention,
                                                   dropout masks 1 byte; with --gradient-checkpointing only
                                                   L * h * act_bytes plus one layer's full set)
    logits, their float32 copy and its gradient    V * (act_bytes + 8)  per token
SparseGPT on the device (the model stays in CPU memory; one decoder layer at a time moves over):
    one layer's weights + the calibration activations in and out (2 * n * seqlen * h * act_bytes)
    + the layer's six Hessians in float32 (5 h^2 + ffn^2) * 4 + the factorization's copies (2 * ffn^2 * 4)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, OPTConfig

from .config import TrainConfig
from .pruning.magnitude import magnitude_prune_layerwise
from .pruning.masks import MaskKeeper, prunable_linears
from .training import train_causal_lm

# name: (hidden, layers, ffn, heads, word_embed_proj_dim) of the published OPT checkpoints
OPT_SIZES = {"opt-125m": (768, 12, 3072, 12, 768), "opt-350m": (1024, 24, 4096, 16, 512),
             "opt-1.3b": (2048, 24, 8192, 32, 2048), "opt-2.7b": (2560, 32, 10240, 32, 2560)}
GIB = 2 ** 30


def opt_config(hidden: int, layers: int, ffn: int, heads: int, proj: int | None = None, vocab: int = 50272,
               positions: int = 2048):
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
                     word_embed_proj_dim=proj or hidden, vocab_size=vocab, max_position_embeddings=positions)


def parameter_counts(config) -> tuple[int, int]:
    """(all parameters, prunable decoder Linear weights), counted on the meta device: no memory used."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return (sum(p.numel() for p in model.parameters()),
            sum(m.weight.numel() for m in prunable_linears(model).values()))


def training_bytes(config, batch: int, seqlen: int, param_bytes: int, act_bytes: int,
                   gradient_checkpointing: bool = False) -> dict:
    params, prunable = parameter_counts(config)
    h, ffn, layers = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    tokens = batch * seqlen
    per_layer = (9 * h + 2 * ffn) * act_bytes + 2 * h
    if gradient_checkpointing:
        activations = tokens * (layers * h * act_bytes + per_layer)
    else:
        activations = tokens * layers * per_layer
    parts = {"states": 4 * params * param_bytes, "masks": prunable * param_bytes, "activations": activations,
             "logits": tokens * config.vocab_size * (act_bytes + 8)}
    parts["total"] = sum(parts.values())
    return parts


def fsdp_state_bytes(config, processes: int, param_bytes: int) -> int:
    """Weights, gradients, AdamW moments and masks held by one of `processes` FSDP processes."""
    params, prunable = parameter_counts(config)
    h, ffn = config.hidden_size, config.ffn_dim
    layer = 4 * h * h + 2 * h * ffn + 9 * h + ffn
    root = params - config.num_hidden_layers * layer
    return (4 * params + prunable) * param_bytes // processes + 2 * (root + layer) * param_bytes


def sparsegpt_device_bytes(config, nsamples: int, seqlen: int, act_bytes: int) -> int:
    h, ffn = config.hidden_size, config.ffn_dim
    layer = (4 * h * h + 2 * h * ffn) * act_bytes
    return layer + 2 * nsamples * seqlen * h * act_bytes + (5 * h * h + ffn * ffn) * 4 + 2 * ffn * ffn * 4


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples this process's resident memory every 2 ms: the CPU counterpart of max_memory_allocated."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = rss(), threading.Event()
        self.start()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss())


@contextlib.contextmanager
def measuring_pool(fresh_process_per_task: bool = True):
    """One spawned worker, a fresh process per task, so memory peaks do not mix. glibc keeps freed blocks
    below its (growing) mmap threshold inside the process, so resident memory reflects the allocation
    history (160-221 MiB for the same 8-layer SparseGPT run) rather than what is live; a fixed 64 KiB
    threshold hands every tensor-sized block back to the system when it is freed."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the workers' C library at their start
    try:
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1 if fresh_process_per_task else None) as pool:
            yield pool
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def _train_two_steps(config_dict: dict, batch: int, seqlen: int, gradient_checkpointing: bool) -> None:
    torch.manual_seed(0)
    blocks = torch.randint(0, config_dict["vocab_size"], (2 * batch, seqlen))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict))
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    train_causal_lm(model, blocks, TrainConfig(lr=1e-5, batch_size=batch, max_steps=2, log_every=2,
                                               gradient_checkpointing=gradient_checkpointing),
                    mask_keeper=MaskKeeper(linears), show_progress=False)


def measure_training_peak(config_dict: dict, batch: int, seqlen: int, gradient_checkpointing: bool) -> int:
    """Runs in a fresh process: resident memory added by building a float32 model and training two steps."""
    tiny = {**config_dict, "hidden_size": 8, "ffn_dim": 8, "num_attention_heads": 1, "num_hidden_layers": 1,
            "word_embed_proj_dim": 8, "vocab_size": 16}
    _train_two_steps(tiny, 1, 8, gradient_checkpointing)  # imports and one-time state are not the model's
    before = rss()
    sampler = PeakRSS()
    _train_two_steps(config_dict, batch, seqlen, gradient_checkpointing)
    return sampler.stop() - before


def memory_table(measure: bool = True) -> str:
    """The README's memory table: formula for OPT-125m...2.7b, and formula vs measurement on small widths."""
    lines = ["| model | params | weights+grads+AdamW+masks, fp32 | same, FSDP over 8 GPUs, per GPU "
             "| activations + logits per 2048-token sequence, bf16 | same, gradient checkpointing "
             "| SparseGPT device peak (fp16, 128 x 2048) |",
             "|---|---|---|---|---|---|---|"]
    for name, (h, layers, ffn, heads, proj) in OPT_SIZES.items():
        config = opt_config(h, layers, ffn, heads, proj)
        fp32 = training_bytes(config, 1, 2048, 4, 2)
        checkpointed = training_bytes(config, 1, 2048, 4, 2, gradient_checkpointing=True)
        lines.append(f"| {name} | {parameter_counts(config)[0] / 1e6:.0f} M | {(fp32['states'] + fp32['masks']) / GIB:.1f} GiB"
                     f" | {fsdp_state_bytes(config, 8, 4) / GIB:.1f} GiB"
                     f" | {(fp32['activations'] + fp32['logits']) / GIB:.2f} GiB"
                     f" | {(checkpointed['activations'] + checkpointed['logits']) / GIB:.2f} GiB"
                     f" | {sparsegpt_device_bytes(config, 128, 2048, 2) / GIB:.2f} GiB |")
    if not measure:
        return "\n".join(lines)
    lines += ["", "| width x layers, batch 4 x 256, float32 on CPU | formula | measured peak RSS | measured / formula |",
              "|---|---|---|---|"]
    for hidden, checkpointing in ((128, False), (256, False), (512, False), (512, True)):
        config = opt_config(hidden, 2, 4 * hidden, 4, vocab=4096, positions=256)
        predicted = training_bytes(config, 4, 256, 4, 4, checkpointing)["total"]
        with measuring_pool() as pool:
            measured = pool.apply(measure_training_peak, (config.to_dict(), 4, 256, checkpointing))
        label = f"{hidden} x 2{', checkpointing' if checkpointing else ''}"
        lines.append(f"| {label} | {predicted / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | {measured / predicted:.2f} |")
    return "\n".join(lines)
