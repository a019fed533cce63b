"""The one place that knows how a causal LM is built, read from the model itself rather than per family.

- The decoder layers: the `nn.ModuleList` whose items are of a class the model names in
  `_no_split_modules` (every Hugging Face causal LM declares its decoder-layer class there, for
  device maps and FSDP wrapping): OPTDecoderLayer, LlamaDecoderLayer, Qwen3DecoderLayer, GPT2Block, ...
- What is prunable: every `nn.Linear` inside those layers, and GPT-2's `Conv1D`, whose weight is stored
  [in, out]; the pruning methods see each as an [out, in] matrix (`matrix_of`), so N:M groups run
  along the inputs and Wanda compares within output rows, as the SparseGPT reference does for Conv1D.
  Never embeddings, positions, norms, biases or lm_head, tied or not: they live outside the layers.
- What runs before layer 0 (embeddings, positions, rotary embeddings): whatever holds parameters or
  buffers outside the layers.
- Which layers see which attention mask: `config.layer_types` where a model mixes sliding-window and
  full attention (Qwen2/3 with sliding layers, ...); one kind otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

PRUNABLE_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class DecoderLayout:
    layers: nn.ModuleList
    layer_prefix: str  # qualified name of the layer list, e.g. "model.decoder.layers"
    layer_types: tuple  # per layer: the kind of attention it gets a mask for (None: one kind)

    @property
    def layer_class(self) -> str:
        return type(self.layers[0]).__name__


def decoder_layout(model: nn.Module) -> DecoderLayout:
    classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in classes
    ]
    if len(lists) != 1:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"model type '{model_type}' is not supported: its decoder layers could not be found (no "
            f"single list of the layer classes it declares, {sorted(classes) or 'none'})"
        )
    prefix, layers = lists[0]
    types = tuple(getattr(model.config, "layer_types", None) or ())
    return DecoderLayout(layers, prefix, types if len(types) == len(layers) else (None,) * len(layers))


def modules_outside_layers(model: nn.Module, layout: DecoderLayout) -> list[nn.Module]:
    """The modules with parameters or buffers of their own outside the decoder layers: what the input passes
    through before layer 0 (and the final norm and lm_head, which are not run by the capture)."""
    inside = {id(m) for m in layout.layers.modules()}
    return [
        m
        for m in model.modules()
        if id(m) not in inside
        and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))
    ]


def is_router(name: str) -> bool:
    """A Linear named `...gate` (not `gate_proj`) decides where tokens go (a mixture of experts' router, Qwen2-MoE's
    shared-expert gate): it stays dense."""
    return name.rsplit(".", 1)[-1].endswith("gate")


def prunable_modules(model: nn.Module) -> dict:
    """Qualified name -> every Linear / Conv1D inside the decoder layers (each expert's own, pipeline/experts.py;
    no router), in layer order."""
    layout = decoder_layout(model)
    found = {}
    for index, layer in enumerate(layout.layers):
        for name, module in layer.named_modules():
            if isinstance(module, PRUNABLE_TYPES) and not is_router(name):
                found[f"{layout.layer_prefix}.{index}.{name}"] = module
    return found


def matrix_of(module: nn.Module) -> torch.Tensor:
    """The weight as an [out, in] matrix: a view, so in-place changes reach the module."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Replaces the weight's values with an [out, in] matrix."""
    module.weight.data = matrix.t().contiguous() if isinstance(module, Conv1D) else matrix


def in_features(module: nn.Module) -> int:
    return matrix_of(module).shape[1]


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every normalization layer: torch's LayerNorm / RMSNorm, and the families' own RMSNorm classes
    (LlamaRMSNorm, Qwen2RMSNorm, ...), which every family names `...Norm`."""
    return [
        m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm")
    ]
