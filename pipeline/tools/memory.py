"""Peak memory of recovery training and of SparseGPT, from a formula, and measured on CPU to check it.

The formula reads the model's shape from a copy built on the meta device (no memory used), so it holds
for every family: GQA (k and v narrower than q), gated MLPs (gate and up: SwiGLU), untied heads.
h = hidden width, kv = width of k and v, f = MLP width, L = layers, V = vocabulary.

Training, per process (DDP keeps a full replica on every GPU):
    weights + gradients + AdamW's two moments      4 * P * param_bytes
    masks (MaskKeeper, in the weight dtype)        P_prunable * param_bytes
    under FSDP over N processes, both of these / N, plus the all-gathered weights and gradients of the
    two largest wrapped units (the root with the embeddings, and one decoder layer)
    activations kept for backward, per token       L * ((7h + 2kv + m f) * act_bytes + d)   m = 2 (fc1, its
                                                   activation) or 4 (gate, up, activation, product); d = 2h
                                                   bytes of dropout masks when dropout is on; SDPA attention.
                                                   With --gradient-checkpointing: L * h * act_bytes plus one
                                                   layer's full set
    logits, their float32 copy and its gradient    V * (act_bytes + 8)  per token
    with --distill, the teacher: its weights         P * param_bytes (FSDP: / N), and per token its logits
                                                   V * act_bytes (its forward keeps nothing for backward; the
                                                   distillation loss goes through the logits in chunks and keeps
                                                   one float32 gradient, where the plain loss keeps a float32
                                                   copy and log-probabilities); with squarehead also
                                                   (L + 1) * h * act_bytes of its hidden states and L * h * 4
                                                   of float32 differences the layer term keeps for backward;
                                                   and the loss's working set, five chunks of rows of float32
                                                   logits (4 MiB each on CPU, 256 MiB on CUDA)
SparseGPT on the device (the model stays in CPU memory; one decoder layer at a time moves over):
    one layer's weights + the calibration activations in and out (2 * n * seqlen * h * act_bytes)
    + a float32 Hessian per prunable matrix (its inputs squared) + the factorization's two copies of
    the largest
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

from ..adapters import norm_and_bias_parameters
from ..architecture import decoder_layout, in_features, prunable_modules
from ..config import TrainConfig
from ..distillation import CHUNK_BYTES, LIVE_CHUNKS
from ..peak_memory import PeakSampler, rss
from ..pruning.magnitude import magnitude_prune_layerwise
from ..pruning.masks import prunable_linears
from ..training import train_keeping_masks

# name: (hidden, layers, ffn, heads, word_embed_proj_dim) of the published OPT checkpoints
OPT_SIZES = {
    "opt-125m": (768, 12, 3072, 12, 768),
    "opt-350m": (1024, 24, 4096, 16, 512),
    "opt-1.3b": (2048, 24, 8192, 32, 2048),
    "opt-2.7b": (2560, 32, 10240, 32, 2560),
}
GIB = 2**30


def opt_config(
    hidden: int, layers: int, ffn: int, heads: int, proj: int | None = None, vocab: int = 50272, positions: int = 2048
):
    return OPTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        word_embed_proj_dim=proj or hidden,
        vocab_size=vocab,
        max_position_embeddings=positions,
    )


def published_configs() -> dict:
    """The README's table: the OPT sizes, and Llama-3.2-1B, Qwen2.5-0.5B and Llama-2-7B from their published
    config.json values (tied embeddings for the first two, an untied head for Llama-2)."""
    configs = {
        name: opt_config(h, layers, ffn, heads, proj) for name, (h, layers, ffn, heads, proj) in OPT_SIZES.items()
    }
    configs["llama-3.2-1b"] = LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    )
    configs["qwen2.5-0.5b"] = Qwen2Config(
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    configs["llama-2-7b"] = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return configs


@dataclass(frozen=True)
class Shape:
    """What the formula needs, read from a model built on the meta device."""

    params: int  # all parameters, a tied head counted once
    prunable: int  # weights of the prunable matrices
    layers: int
    hidden: int
    kv: int  # width of k and v: kv heads x head dim (GQA)
    ffn: int
    gated: bool  # gate and up projections (SwiGLU)
    dropout: bool
    layer_params: int  # one decoder layer
    layer_inputs: tuple  # the input width of each prunable matrix of a layer: a Hessian each
    vocab: int


def shape_of(config) -> Shape:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = decoder_layout(model).layers[0]
    prefix = decoder_layout(model).layer_prefix + ".0."
    first = {name: m for name, m in prunable_modules(model).items() if name.startswith(prefix)}
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    ffn = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_dim", None)
        or getattr(config, "n_inner", None)
        or 4 * h
    )
    dropout = any((getattr(config, key, 0.0) or 0.0) > 0 for key in ("dropout", "attention_dropout", "resid_pdrop"))
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        prunable=sum(m.weight.numel() for m in prunable_linears(model).values()),
        layers=config.num_hidden_layers,
        hidden=h,
        kv=kv,
        ffn=ffn,
        gated=any("gate" in name for name in first),
        dropout=dropout,
        layer_params=sum(p.numel() for p in layer.parameters()),
        layer_inputs=tuple(in_features(m) for m in first.values()),
        vocab=config.vocab_size,
    )


def parameter_counts(config) -> tuple[int, int]:
    """(all parameters, prunable decoder weights), counted on the meta device: no memory used."""
    shape = shape_of(config)
    return shape.params, shape.prunable


def trained_counts(config, lora_rank: int = 8) -> dict:
    """Parameter elements each --train-params mode trains: all; the norms and biases; LoRA's A and B on every
    prunable matrix (r x (in + out) each)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = prunable_linears(model)
    return {
        "all": sum(p.numel() for p in model.parameters()),
        "norms-biases": sum(p.numel() for p in norm_and_bias_parameters(model)),
        "lora": sum(lora_rank * sum(m.weight.shape) for m in linears.values()),
    }


def training_bytes(
    config,
    batch: int,
    seqlen: int,
    param_bytes: int,
    act_bytes: int,
    gradient_checkpointing: bool = False,
    train_params: str = "all",
    lora_rank: int = 8,
) -> dict:
    """all: weights, gradients and AdamW's two moments of every parameter, and the masks in the weight dtype.
    norms-biases: the weights, and gradients and moments of the norms and biases only; no masks to keep
    (frozen matrices keep their zeros). Every mode also keeps a bool copy of the masks to check them after.
    lora: the weights, the adapters' weights, gradients and moments, a bool mask
    per prunable matrix, and the effective weight W + (B A) * M of each, which the forward makes and keeps
    for backward (in the compute dtype). Activations and logits the same in every mode."""
    shape = shape_of(config)
    h, tokens = shape.hidden, batch * seqlen
    per_layer = (7 * h + 2 * shape.kv + (4 if shape.gated else 2) * shape.ffn) * act_bytes + (
        2 * h if shape.dropout else 0
    )
    if gradient_checkpointing:
        activations = tokens * (shape.layers * h * act_bytes + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    trained = trained_counts(config, lora_rank)[train_params]
    parts = {
        "states": (shape.params + 3 * trained + (trained if train_params == "lora" else 0)) * param_bytes,
        # the masks the training keeps (all: in the weight dtype; lora: bool), and the bool copy it checks after
        "masks": shape.prunable * ({"all": param_bytes, "norms-biases": 0, "lora": 1}[train_params] + 1),
        "effective weights": shape.prunable * act_bytes if train_params == "lora" else 0,
        "activations": activations,
        "logits": tokens * shape.vocab * (act_bytes + 8),
    }
    parts["total"] = sum(parts.values())
    return parts


def teacher_bytes(
    config,
    batch: int,
    seqlen: int,
    param_bytes: int,
    act_bytes: int,
    processes: int = 1,
    features: bool = False,
    device: str = "cuda",
) -> int:
    """What --distill adds: the frozen teacher's weights (sharded under FSDP), its logits and the loss's
    working set; with `features` (SquareHead) also its hidden states and the float32 differences the layer
    term keeps for backward."""
    shape = shape_of(config)
    tokens, per_token = batch * seqlen, shape.vocab * act_bytes
    if features:
        per_token += (shape.layers + 1) * shape.hidden * act_bytes + shape.layers * shape.hidden * 4
    working_set = LIVE_CHUNKS * min(CHUNK_BYTES[device], tokens * shape.vocab * 4)
    return shape.params * param_bytes // processes + tokens * per_token + working_set


def fsdp_state_bytes(config, processes: int, param_bytes: int) -> int:
    """Weights, gradients, AdamW moments and masks held by one of `processes` FSDP processes."""
    shape = shape_of(config)
    root = shape.params - shape.layers * shape.layer_params
    return (4 * shape.params + shape.prunable) * param_bytes // processes + 2 * (
        root + shape.layer_params
    ) * param_bytes


def sparsegpt_device_bytes(config, nsamples: int, seqlen: int, act_bytes: int) -> int:
    shape = shape_of(config)
    hessians = sum(width * width for width in shape.layer_inputs) * 4
    factorization = 2 * max(shape.layer_inputs) ** 2 * 4
    return shape.layer_params * act_bytes + 2 * nsamples * seqlen * shape.hidden * act_bytes + hessians + factorization


@contextlib.contextmanager
def measuring_pool(fresh_process_per_task: bool = True):
    """One spawned worker, a fresh process per task, so memory peaks do not mix. glibc keeps freed blocks
    below its (growing) mmap threshold inside the process, so resident memory reflects the allocation
    history (160-221 MiB for the same 8-layer SparseGPT run) rather than what is live; a fixed 64 KiB
    threshold hands every tensor-sized block back to the system when it is freed."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the workers' C library at their start
    try:
        with multiprocessing.get_context("spawn").Pool(
            1, maxtasksperchild=1 if fresh_process_per_task else None
        ) as pool:
            yield pool
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def _train_two_steps(
    config_dict: dict,
    batch: int,
    seqlen: int,
    gradient_checkpointing: bool,
    distill: str = "none",
    train_params: str = "all",
) -> None:
    torch.manual_seed(0)
    blocks = torch.randint(0, config_dict["vocab_size"], (2 * batch, seqlen))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict))
    teacher = copy.deepcopy(model) if distill != "none" else None
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    train_keeping_masks(
        model,
        linears,
        blocks,
        TrainConfig(
            lr=1e-5,
            batch_size=batch,
            max_steps=2,
            log_every=2,
            gradient_checkpointing=gradient_checkpointing,
            distill=distill,
            train_params=train_params,
        ),
        teacher=teacher,
        show_progress=False,
    )


def measure_training_peak(
    config_dict: dict,
    batch: int,
    seqlen: int,
    gradient_checkpointing: bool,
    distill: str = "none",
    train_params: str = "all",
) -> int:
    """Runs in a fresh process: resident memory added by building a float32 model (and its teacher) and
    training two steps."""
    tiny = {
        **config_dict,
        "hidden_size": 8,
        "ffn_dim": 8,
        "intermediate_size": 8,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "num_hidden_layers": 1,
        "word_embed_proj_dim": 8,
        "vocab_size": 16,
    }
    # imports and one-time state are not the model's
    _train_two_steps(tiny, 1, 8, gradient_checkpointing, distill, train_params)
    before = rss()
    sampler = PeakSampler(rss)
    _train_two_steps(config_dict, batch, seqlen, gradient_checkpointing, distill, train_params)
    return sampler.stop() - before


PUBLISHED_HEADER = [
    "| model | params | weights+grads+AdamW+masks, fp32 | same, FSDP over 8 GPUs, per GPU "
    "| same, --train-params norms-biases / lora (r 8), one GPU "
    "| activations + logits per 2048-token sequence, bf16 | same, gradient checkpointing "
    "| + teacher for --distill logits / squarehead (fp32 weights, one sequence) "
    "| SparseGPT device peak (fp16, 128 x 2048) |",
    "|---|---|---|---|---|---|---|---|---|",
]
# (width, gradient checkpointing, family, --distill, --train-params) of the small models measured against the formula
MEASURED_SHAPES = (
    (128, False, "opt", "none", "all"),
    (256, False, "opt", "none", "all"),
    (512, False, "opt", "none", "all"),
    (512, True, "opt", "none", "all"),
    (256, False, "opt", "logits", "all"),
    (256, False, "llama", "none", "all"),
    (512, False, "llama", "none", "all"),
    (512, False, "llama", "squarehead", "all"),
    (512, False, "opt", "none", "norms-biases"),
    (512, False, "opt", "none", "lora"),
    (512, False, "llama", "none", "norms-biases"),
    (512, False, "llama", "none", "lora"),
)


def published_row(name: str, config) -> str:
    """One published size's row of the formula's table."""
    fp32 = training_bytes(config, 1, 2048, 4, 2)
    checkpointed = training_bytes(config, 1, 2048, 4, 2, gradient_checkpointing=True)

    def efficient(mode: str) -> int:  # weights, trained states, masks, lora's effective weights
        parts = training_bytes(config, 1, 2048, 4, 2, train_params=mode)
        return parts["states"] + parts["masks"] + parts["effective weights"]

    return (
        f"| {name} | {parameter_counts(config)[0] / 1e6:.0f} M | {(fp32['states'] + fp32['masks']) / GIB:.1f} GiB"
        f" | {fsdp_state_bytes(config, 8, 4) / GIB:.1f} GiB"
        f" | {efficient('norms-biases') / GIB:.1f} / {efficient('lora') / GIB:.1f} GiB"
        f" | {(fp32['activations'] + fp32['logits']) / GIB:.2f} GiB"
        f" | {(checkpointed['activations'] + checkpointed['logits']) / GIB:.2f} GiB"
        f" | {teacher_bytes(config, 1, 2048, 4, 2) / GIB:.2f} / "
        f"{teacher_bytes(config, 1, 2048, 4, 2, features=True) / GIB:.2f} GiB"
        f" | {sparsegpt_device_bytes(config, 128, 2048, 2) / GIB:.2f} GiB |"
    )


def small_config(family: str, hidden: int):
    """A 2-layer model of the family at this width, 4096 words, 256 positions."""
    if family == "opt":
        return opt_config(hidden, 2, 4 * hidden, 4, vocab=4096, positions=256)
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        intermediate_size=8 * hidden // 3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=256,
    )


def measured_row(hidden: int, checkpointing: bool, family: str, distill: str, mode: str) -> str:
    """The formula against the peak memory of training a small model in a fresh process."""
    config = small_config(family, hidden)
    predicted = training_bytes(config, 4, 256, 4, 4, checkpointing, mode)["total"]
    if distill != "none":
        predicted += teacher_bytes(config, 4, 256, 4, 4, features=distill == "squarehead", device="cpu")
    with measuring_pool() as pool:
        measured = pool.apply(measure_training_peak, (config.to_dict(), 4, 256, checkpointing, distill, mode))
    label = (
        f"{family} {hidden} x 2{', checkpointing' if checkpointing else ''}"
        f"{f', --distill {distill}' if distill != 'none' else ''}"
        f"{f', --train-params {mode}' if mode != 'all' else ''}"
    )
    return f"| {label} | {predicted / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | {measured / predicted:.2f} |"


def memory_table(measure: bool = True) -> str:
    """The memory tables (docs/scale.md): the formula for published sizes, and formula vs measurement on small
    widths."""
    lines = PUBLISHED_HEADER + [published_row(name, config) for name, config in published_configs().items()]
    if measure:
        lines += [
            "",
            "| width x layers, batch 4 x 256, float32 on CPU | formula | measured peak RSS | measured / formula |",
            "|---|---|---|---|",
            *[measured_row(*shape) for shape in MEASURED_SHAPES],
        ]
    return "\n".join(lines)
