"""Mixtures of experts whose experts are fused into 3-D parameters, held as one Linear per expert while we work.

transformers 5 keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (and any family built the same way)
in one module with `gate_up_proj` [experts, 2I, H] and `down_proj` [experts, H, I], read from the model by that
shape. Loaded here, each such module is replaced by `ExpertLinears`: the same computation (the tokens routed to an
expert through its gate_up matrix, act(gate) * up, its down matrix, weighted by the router), but each expert's two
matrices are Linear modules of their own (`experts.gate_up.<e>`, `experts.down.<e>`). So every part of the tool
sees them as it sees any matrix: each expert is pruned to the target on its own, its calibration statistics are
those of exactly the tokens the router sent it (its Linear's inputs), its mask is kept in training, LoRA can adapt
it. The router stays dense (it is not a Linear of the experts). A save writes the experts back into their fused
module first, so the files are transformers' own layout.

Not this tool's: expert pruning (dropping or merging whole experts), which changes the routing rather than the
matrices.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

FUSED = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding its experts as 3-D parameters gate_up_proj and down_proj, and their activation."""
    return hasattr(module, "act_fn") and all(
        isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).ndim == 3 for name in FUSED
    )


def _linear(matrix: torch.Tensor) -> nn.Linear:
    """A Linear without bias whose weight is `matrix` [out, in] (a view of the fused storage: no copy)."""
    linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(matrix.detach(), requires_grad=matrix.requires_grad)
    return linear


class ExpertLinears(nn.Module):
    """Fused experts as one Linear per expert and matrix, computing what the fused module computes."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.num_experts = fused.gate_up_proj.shape[0]
        self.act_fn = fused.act_fn
        self.gate_up = nn.ModuleList(_linear(fused.gate_up_proj[e]) for e in range(self.num_experts))
        self.down = nn.ModuleList(_linear(fused.down_proj[e]) for e in range(self.num_experts))
        self._fused = (fused,)  # out of the module tree: what a save writes the experts back into

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():  # one class more, as transformers' own: an index past the experts routes nowhere
            hits = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for expert in hits[: self.num_experts].sum(dim=(-1, -2)).nonzero().flatten().tolist():
            position, tokens = torch.where(hits[expert])
            gate, up = self.gate_up[expert](hidden_states[tokens]).chunk(2, dim=-1)
            out = self.down[expert](self.act_fn(gate) * up) * top_k_weights[tokens, position, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final

    @torch.no_grad()
    def fused(self) -> nn.Module:
        """The fused module, its 3-D parameters holding the experts' current weights."""
        module = self._fused[0]
        for name, linears in (("gate_up_proj", self.gate_up), ("down_proj", self.down)):
            parameter = getattr(module, name)
            stacked = torch.stack([linear.weight.detach().to(parameter.device) for linear in linears])
            parameter.data = stacked.to(parameter.dtype)
        return module


def _replace(model: nn.Module, test, make) -> int:
    """Every submodule for which `test` holds replaced by `make(submodule)`; returns how many."""
    found = [(name, module) for name, module in model.named_modules() if test(module)]
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(module))
    return len(found)


def unfuse_experts(model: nn.Module) -> int:
    """Every fused experts module of `model` replaced by its ExpertLinears; returns how many."""
    return _replace(model, is_fused_experts, ExpertLinears)


@contextlib.contextmanager
def fused_experts(model: nn.Module):
    """Within the block the model holds its experts fused (as transformers writes and reads them), their weights
    the current ones; after it, one Linear per expert again."""
    held = {}

    def fuse(module: ExpertLinears) -> nn.Module:
        fused = module.fused()
        held[id(fused)] = module
        return fused

    count = _replace(model, lambda m: isinstance(m, ExpertLinears), fuse)
    try:
        yield model
    finally:
        if count:
            _replace(model, lambda m: id(m) in held, lambda m: held[id(m)])
