"""Mixtures of experts with fused experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): each expert pruned exactly on its
own, the router dense, each expert calibrated on the tokens routed to it, an expert no token reached pruned by
magnitude, and the save in transformers' own layout reading back as the model."""

from __future__ import annotations

import copy

import pytest
import torch
from loading import load_model_and_tokenizer
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from pipeline.config import PruneConfig
from pipeline.experts import ExpertLinears, unfuse_experts
from pipeline.models import load_model, save_model
from pipeline.pruning import prune_model
from pipeline.pruning.masks import prunable_linears
from pipeline.pruning.sequential import prune_sequentially

SHAPE = dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SHAPE.update(max_position_embeddings=64, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": lambda: MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=4),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **SHAPE, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24, num_experts=4),
    "olmoe": lambda: OlmoeConfig(**SHAPE, intermediate_size=48, num_experts=4),
}


def fused_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():
        for parameter in model.parameters():  # weights of a trained model's spread, not transformers' zeros
            if parameter.ndim >= 2:
                parameter.normal_(0, 0.2)
    return model.eval()


def windows(n: int = 6, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(3, 400, (n, seqlen), generator=torch.Generator().manual_seed(1))


def routers(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("gate.weight")}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_linear_per_expert_computes_what_the_fused_experts_do(family):
    fused = fused_model(family)
    unfused = copy.deepcopy(fused)
    assert unfuse_experts(unfused) == 2  # one experts module per decoder layer
    with torch.no_grad():
        assert torch.allclose(unfused(windows()).logits, fused(windows()).logits, atol=1e-5)
    names = list(prunable_linears(unfused))
    assert sum(".experts.gate_up." in n for n in names) == sum(".experts.down." in n for n in names) == 2 * 4
    assert not [n for n in names if n.endswith("gate")]  # routers and Qwen2-MoE's shared-expert gate stay dense


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_model_and_tokenizer(str(tiny_model_dir))[1]


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "wanda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_pruned_exactly_and_the_save_reads_back(tmp_path, tokenizer, family, method):
    fused_model(family).save_pretrained(tmp_path / "dense")
    model = load_model(str(tmp_path / "dense"))
    assert any(isinstance(m, ExpertLinears) for m in model.modules())
    before = routers(model)
    assert len(before) == 2 * (2 if family == "qwen2_moe" else 1)  # the routers, and Qwen2-MoE's shared gates
    prune_model(model, PruneConfig(method=method, sparsity=0.6), windows())
    for name, module in prunable_linears(model).items():
        assert int((module.weight == 0).sum()) == round(0.6 * module.weight.numel()), name
        assert torch.isfinite(module.weight).all(), name
    assert all(torch.equal(before[name], after) for name, after in routers(model).items())
    save_model(model, tokenizer, tmp_path / "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")  # transformers' own, fused
    ours = dict(model.named_modules())
    for name, module in reloaded.named_modules():
        if hasattr(module, "gate_up_proj"):
            for e in range(4):
                assert torch.equal(module.gate_up_proj[e], ours[f"{name}.gate_up.{e}"].weight), (name, e)
                assert torch.equal(module.down_proj[e], ours[f"{name}.down.{e}"].weight), (name, e)
    with torch.no_grad():
        assert torch.allclose(reloaded(windows()).logits, model(windows()).logits, atol=1e-5)


def test_an_expert_is_calibrated_on_the_tokens_routed_to_it():
    fused = fused_model("mixtral")
    model = copy.deepcopy(fused)
    unfuse_experts(model)
    recorded = {}

    def record(name, module, stats, seconds):
        recorded[name] = stats.sum.clone()

    prune_sequentially(model, prunable_linears(model), windows(), torch.device("cpu"), False, record, 3, False)
    seen = []
    experts = fused.model.layers[0].mlp.experts  # layer 0: the dense model's own inputs
    handle = experts.register_forward_hook(lambda m, args, out: seen.append((args[0], args[1])), with_kwargs=False)
    with torch.no_grad():
        fused(windows())
    handle.remove()
    ((hidden, index),) = seen
    for e in range(4):
        tokens = (index == e).any(dim=1)
        x = hidden[tokens].double()
        assert torch.allclose(recorded[f"model.layers.0.mlp.experts.gate_up.{e}"].double(), (x * x).sum(0) / 6)
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e].double()).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        assert torch.allclose(recorded[f"model.layers.0.mlp.experts.down.{e}"].double(), (h * h).sum(0) / 6)


def test_an_expert_no_token_reaches_is_pruned_by_its_magnitude():
    model = fused_model("mixtral")
    model.config.num_experts_per_tok = 1
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 1
        with torch.no_grad():  # logits 0 for experts 0 and 3, |v.x| for expert 1 or 2: 0 and 3 never chosen
            layer.mlp.gate.weight[0] = 0
            layer.mlp.gate.weight[2] = -layer.mlp.gate.weight[1]
            layer.mlp.gate.weight[3] = 0
    unfuse_experts(model)
    linears = prunable_linears(model)
    unreached = {n: m.weight.detach().clone() for n, m in linears.items() if "experts" in n and n[-2:] in (".0", ".3")}
    assert len(unreached) == 2 * 2 * 2  # both matrices of experts 0 and 3, in both layers
    prune_model(model, PruneConfig(method="wanda", sparsity=0.5), windows())
    for name, weight in unreached.items():
        order = torch.argsort(weight.abs(), dim=1, stable=True)  # by magnitude within each row
        expected = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order[:, : weight.shape[1] // 2], True)
        assert torch.equal(prunable_linears(model)[name].weight == 0, expected), name
    model = fused_model("mixtral")
    unfuse_experts(model)
    prune_model(model, PruneConfig(method="sparsegpt", sparsity=0.5), windows())
    assert all(torch.isfinite(m.weight).all() for m in prunable_linears(model).values())
