"""Loading and saving causal LMs: aliases, the hub (offline: one line), device, dtype and the window."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from .config import EMBEDDED_MODELS, default_window
from .errors import ConfigError, UserError, option
from .experts import fused_experts, unfuse_experts
from .hub import offline_when_unreachable
from .outputs import os_error_behind

HUB_ALIASES = {  # short names of the hub models researchers prune; any other hub id works as is
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-2.7b": "facebook/opt-2.7b",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "gpt2": "openai-community/gpt2",
}
ASSETS = Path(__file__).parent / "assets"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_source(name: str, setting: str = "model") -> str:
    """Alias, embedded model, local directory or hub id -> what `from_pretrained` takes; a bad one is a
    ConfigError naming `setting` (--model, --teacher)."""
    if name in EMBEDDED_MODELS:
        if not (ASSETS / name / "config.json").exists():
            raise UserError(
                f"the embedded model is missing from {ASSETS / name}; reinstall the package or run "
                f"`python -m pipeline pretrain --arch {name.split('-')[0]}`"
            )
        return str(ASSETS / name)
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ConfigError(
                f"{option(setting)} {name} is a directory but holds no config.json: save the model there with "
                "save_pretrained()"
            )
        return name
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path:
        raise ConfigError(f"{option(setting)}: model directory {name} does not exist")
    if "/" not in name:
        known = ", ".join([*EMBEDDED_MODELS, *HUB_ALIASES])
        raise ConfigError(
            f"unknown model '{name}' ({option(setting)}): use one of {known}, a hub id (org/name) "
            "or a local directory saved with save_pretrained()"
        )
    return name


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA when there is one. Under `accelerate launch` each process gets its own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{option('device')} cuda was asked for but no CUDA device is available; use {option('device')} cpu"
        )
    if device == "cuda":
        rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if rank >= gpus:  # a launcher started more processes on this machine than it has GPUs
            raise ConfigError(
                f"process {rank + 1} of this machine wants a GPU of its own and the machine has {gpus}: launch at "
                f"most {gpus} per machine (accelerate launch --num_processes), or use {option('device')} cpu"
            )
        return torch.device("cuda", rank)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (half precision is slow and inexact there), the checkpoint's dtype on GPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return DTYPES[dtype]


def training_dtype(dtype: str) -> str:
    """`auto` for the commands that train means float32 weights: on CUDA the loop autocasts the compute to
    bf16, and AdamW's small updates would vanish in a half-precision weight (OPT checkpoints are fp16)."""
    return "float32" if dtype == "auto" else dtype


def _hub_unreachable(name: str, source: str, reason: str) -> UserError:
    return UserError(
        f"model '{name}' ({source}) is not in the local Hugging Face cache and the hub could not be "
        f"reached ({reason}); pass a local directory saved with save_pretrained(), "
        f"fill the HF cache on a machine with network access, or use {option('model')} opt-tiny "
        "(HF_HUB_OFFLINE=1 makes this fail fast)"
    )


def _refusal(name: str, source: str, error: Exception) -> UserError | None:
    """What transformers or torch refused to load, said in one line (None: not a refusal)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in text:
        return UserError(
            f"refused to load model '{name}': a pickled checkpoint in {source} holds Python objects "
            "besides tensors, which would run code as they load, so it was not loaded; use weights "
            "saved as safetensors (save_pretrained's default), or convert these where you trust "
            "their source"
        )
    if isinstance(error, ValueError) and "custom code" in text:
        return ConfigError(
            f"model '{name}' brings its own Python code ({source} asks for it to be run), which "
            f"was not run: pass {option('trust_remote_code')} if you trust that code"
        )
    return None


@contextlib.contextmanager
def _loading(name: str, source: str):
    """Within the block, hub failures and refusals become one UserError line."""
    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the one line an error gets
    with offline_when_unreachable() as unreachable:
        try:
            yield
        except UserError:
            raise
        except OSError as error:  # transformers reports "offline" and "not found" alike as OSError
            if os.path.isdir(source):
                raise UserError(f"could not load the model in {source}: {str(error).splitlines()[0]}") from None
            if unreachable:
                raise _hub_unreachable(name, source, unreachable) from None
            if "not a valid model identifier" in str(error):
                raise ConfigError(f"model '{name}' was not found on the hub; check the id") from None
            raise UserError(f"could not load model '{name}': {str(error).splitlines()[0]}") from None
        except (ValueError, RuntimeError, pickle.UnpicklingError) as error:
            refusal = _refusal(name, source, error)
            if refusal is None:
                raise
            raise refusal from None


CAUSAL_LM_CLASSES = ("ForCausalLM", "LMHeadModel")  # how transformers names a decoder-only LM with its head
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _not_a_causal_lm(config) -> str | None:
    """What the config is instead of a decoder-only causal LM, or None when it is one."""
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    saved_as = [a for a in getattr(config, "architectures", None) or [] if not a.endswith(CAUSAL_LM_CLASSES)]
    if saved_as:
        return f"a {saved_as[0]}"
    # a config saved without its class: an encoder is a type with a masked-LM head that is not a decoder
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "an encoder model"
    custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        return "not a causal LM"
    return None


def check_causal_lm(name: str, config, setting: str = "model") -> None:
    """Only decoder-only causal LMs: an encoder (BERT) would get a randomly initialized causal head, and an
    encoder-decoder (T5) has no single stack of decoder layers to prune."""
    kind = _not_a_causal_lm(config)
    if kind:
        raise ConfigError(
            f"{option(setting)} {name} is {kind} ({config.model_type}); this tool prunes decoder-only causal "
            "LMs (OPT, Llama, Mistral, Qwen, Phi, GPT-2, ...), whose checkpoint is a *ForCausalLM"
        )


def check_safetensors(path: Path) -> None:
    """A safetensors file's header read, and its size against what the header promises: a file cut short by
    a full disk or a broken copy is one line now, not a SafetensorError mid-run."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a readable safetensors file (damaged?): save the model there again")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise UserError(
            f"{path} is truncated: {size:,} of the {expected:,} bytes its header describes (a full disk or a "
            "broken copy?): save the model there again"
        )


def model_skeleton(name: str, trust_remote_code: bool = False, setting: str = "model") -> nn.Module:
    """The model's structure on the meta device: its config read, no weights loaded, no memory used. What can
    be checked before a run opens (the window, what is prunable, an N:M width) is checked on this, and a
    local directory's weight files are checked whole."""
    source = resolve_model_source(name, setting)
    with _loading(name, source):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        check_causal_lm(name, config, setting)
        for pickled in sorted(Path(source).glob("*.bin")) if os.path.isdir(source) else []:
            torch.load(pickled, map_location="cpu", weights_only=True, mmap=True)  # refused now, not mid-run
        for weights in sorted(Path(source).glob("*.safetensors")) if os.path.isdir(source) else []:
            check_safetensors(weights)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    unfuse_experts(skeleton)  # as load_model holds them
    return skeleton


def load_tokenizer(name: str, trust_remote_code: bool = False):
    source = resolve_model_source(name)
    if os.path.isdir(source) and not any((Path(source) / file).exists() for file in TOKENIZER_FILES):
        raise ConfigError(
            f"{option('model')} {name} holds no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): save the "
            "tokenizer beside the model (tokenizer.save_pretrained(directory))"
        )
    with _loading(name, source):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_model(
    name: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False, keep_on_cpu: bool = False
) -> nn.Module:
    """The model in eval mode on `device`, in the dtype chosen for that device; with keep_on_cpu it stays in
    host memory (SparseGPT moves one layer at a time to the device). Failures are one UserError line."""
    source = resolve_model_source(name)
    torch_device = resolve_device(device)
    with _loading(name, source):
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(dtype, torch_device), trust_remote_code=trust_remote_code
        )
    unfuse_experts(model)  # a fused mixture of experts: one Linear per expert and matrix (pipeline/experts.py)
    if not keep_on_cpu:
        model.to(torch_device)
    return model.eval()


def _reads_back_as(model: nn.Module, directory: Path) -> bool:
    """Whether `directory` loads (through transformers, converting its layout) into the very tensors of `model`."""
    hf_logging.disable_progress_bar()
    loaded = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype)  # fused, as `model` now
    ours, theirs = model.state_dict(), loaded.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k].cpu(), theirs[k]) for k in ours)


def verify_saved_model(model: nn.Module, directory: Path) -> None:
    """Reads back what save_pretrained wrote: every tensor's name and shape, none missing but tied ones; where
    transformers writes the model type in another layout than it holds in memory (Mixtral's and the other
    mixtures of experts' fused experts are written one matrix per expert), the files loaded back, every tensor
    equal."""
    saved = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            saved.update({key: list(handle.get_slice(key).get_shape()) for key in handle.keys()})
    state = model.state_dict()
    wrong = [k for k, shape in saved.items() if k not in state or list(state[k].shape) != shape]
    kept = {state[k].data_ptr() for k in saved if k in state}
    missing = [k for k, tensor in state.items() if k not in saved and tensor.data_ptr() not in kept]
    if not saved:
        raise UserError(f"the files in {directory} hold no weights: the write did not reach the disk")
    if (wrong or missing) and _reads_back_as(model, directory):
        return
    if wrong or missing:
        differences = [f"{len(wrong)} tensors it does not hold as saved, e.g. {', '.join(wrong[:2])}"] if wrong else []
        differences += [f"{len(missing)} of its tensors not saved, e.g. {', '.join(missing[:2])}"] if missing else []
        raise UserError(
            f"the files do not read back as the {model.config.model_type} model in memory ({'; '.join(differences)},"
            " and loaded back they differ from it)"
        )


MODEL_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")  # a save's weight files


def _save_failure(error: Exception) -> str:
    """What failed in a save, and what to do: space only where space ran out."""
    cause = os_error_behind(error)
    if isinstance(error, UserError):  # written, but not readable as the model
        return f"{error}; what the directory held before is intact"
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{cause.strerror}; what the directory held before is intact: free some space and run again"
    reason = (cause.strerror or str(cause)) if cause else f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return f"{reason}; what the directory held before is intact"


def save_model(model: nn.Module, tokenizer, directory: Path) -> Path:
    """save_pretrained (safetensors) of the model and its tokenizer, staged in a hidden directory inside
    `directory` and read back there, then renamed into place file by file: a save that fails (a full disk)
    leaves the model that was there before whole, never a mix of two. Nothing is reported saved that was not."""
    directory = Path(directory)
    staging = directory / f".saving-{os.getpid()}"
    for stale in directory.glob(".saving-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with fused_experts(model):  # written in transformers' own layout, and read back so
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            verify_saved_model(model, staging)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"could not save the model to {directory}: {_save_failure(error)}") from None
    written = {file.name for file in staging.iterdir()}
    for pattern in MODEL_FILES:  # the previous save's shards that this one does not replace
        for old in directory.glob(pattern):
            if old.name not in written:
                old.unlink()
    for file in staging.iterdir():
        os.replace(file, directory / file.name)  # a rename: it cannot run out of space
    staging.rmdir()
    return directory


def max_positions(model: nn.Module) -> int:
    return int(model.config.max_position_embeddings)


def resolve_seqlen(model: nn.Module, seqlen: int | None, setting: str = "seqlen") -> int:
    """The window: `seqlen`, or by default min(the model's positions, 2048); more than the positions is an
    error."""
    limit = max_positions(model)
    if seqlen is None:
        return default_window(None, model)
    if seqlen > limit:
        raise ConfigError(f"{option(setting)} {seqlen} is above the model's {limit} positions; use at most {limit}")
    return seqlen
