"""Beyond OPT: real tiny models of every family, built here from configs, pruned, trained and
reloaded by the code paths the embedded OPT takes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.architecture import decoder_layout, matrix_of, prunable_modules
from pipeline.config import PruneConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.pruning import prune_model
from pipeline.pruning.magnitude import magnitude_prune_global, magnitude_prune_layerwise
from pipeline.pruning.masks import model_masks, prunable_linears
from pipeline.pruning.sequential import capture_layer_inputs, layer_output

WIDE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
GQA = dict(WIDE, intermediate_size=128, num_key_value_heads=2)
FAMILIES = {  # (config, the final norm's name, the prunable matrices of a layer)
    "opt": (
        dict(WIDE, model_type="opt", ffn_dim=128, word_embed_proj_dim=64, dropout=0.0),
        "model.decoder.final_layer_norm",
        {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    ),
    "llama": (
        dict(GQA, model_type="llama", tie_word_embeddings=False),
        "model.norm",
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ),
    "mistral": (
        dict(GQA, model_type="mistral", sliding_window=24),
        "model.norm",
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ),
    # one sliding-window layer and one full one: each gets its own mask
    "qwen2": (
        dict(
            GQA,
            model_type="qwen2",
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "model.norm",
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ),
    "qwen3": (
        dict(GQA, model_type="qwen3", head_dim=16),
        "model.norm",
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ),
    "phi3": (
        dict(GQA, model_type="phi3", pad_token_id=1),
        "model.norm",
        {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    ),
    "gpt2": (
        dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "transformer.ln_f",
        {"c_attn", "c_proj", "c_fc"},
    ),
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_model_dir) -> dict:
    """family -> a saved tiny model of it (random weights), with the tiny OPT's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dirs = {}
    for family, (config, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        settings = {k: v for k, v in config.items() if k != "model_type"}
        ids = dict(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **{**settings, **ids}))
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        dirs[family] = directory
    return dirs


def load(directory):
    from loading import load_model_and_tokenizer

    return load_model_and_tokenizer(str(directory))


def windows(tokenizer, n=6, seqlen=40, seed=0):
    return torch.randint(3, len(tokenizer), (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_and_prunable_matrices_are_read_from_the_model(family, family_dirs):
    model, _ = load(family_dirs[family])
    layout = decoder_layout(model)
    assert len(layout.layers) == 2 and layout.layer_class in model._no_split_modules
    names = {name.rsplit(".", 1)[1] for name in prunable_modules(model)}
    assert names == FAMILIES[family][2]
    pruned = set(map(id, (m.weight for m in prunable_modules(model).values())))
    for name, param in model.named_parameters():  # never embeddings, positions, norms, biases or the head
        if (
            "embed" in name
            or "wte" in name
            or "wpe" in name
            or "norm" in name
            or "ln_" in name
            or "lm_head" in name
            or name.endswith("bias")
        ):
            assert id(param) not in pruned, name


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_forward_equals_the_full_model(family, family_dirs):
    model, tokenizer = load(family_dirs[family])
    batch = windows(tokenizer)
    batches = capture_layer_inputs(model, batch, torch.device("cpu"), batch_size=4)  # 4 + 2: a short last batch
    layout = decoder_layout(model)
    with torch.no_grad():
        for layer, kind in zip(layout.layers, layout.layer_types):
            for captured in batches:
                captured.hidden = layer_output(layer, captured, kind)
        norm = model.get_submodule(FAMILIES[family][1])
        logits = torch.cat([model.lm_head(norm(captured.hidden)) for captured in batches])
        expected = model(batch).logits
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
    if family == "qwen2":  # the two kinds of layer got different masks, and that mattered
        assert set(batches[0].inputs) == {"sliding_attention", "full_attention"}
        captured = capture_layer_inputs(model, batch[:4], torch.device("cpu"), 4)[0]
        with torch.no_grad():
            right = layer_output(layout.layers[0], captured, "sliding_attention")
            wrong = layer_output(layout.layers[0], captured, "full_attention")
        assert not torch.allclose(right, wrong, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_lands_on_the_exact_count(family, family_dirs):
    _, tokenizer = load(family_dirs[family])
    calibration = windows(tokenizer, n=8, seqlen=32)
    for method, pattern in (
        ("magnitude", "unstructured"),
        ("sparsegpt", "unstructured"),
        ("sparsegpt", "2:4"),
        ("wanda", "unstructured"),
        ("wanda", "2:4"),
    ):
        model, _ = load(family_dirs[family])
        prune_model(model, PruneConfig(method=method, pattern=pattern, nsamples=8), calibration)
        for name, module in prunable_linears(model).items():
            matrix = matrix_of(module)
            assert int((matrix == 0).sum()) == matrix.numel() // 2, (method, pattern, name)
            if pattern == "2:4":  # groups of 4 along each output's inputs
                assert ((matrix != 0).reshape(matrix.shape[0], -1, 4).sum(2) == 2).all(), name
    model, _ = load(family_dirs[family])
    linears = prunable_linears(model)
    magnitude_prune_global(linears, 0.6)
    total = sum(m.weight.numel() for m in linears.values())
    assert sum(int((m.weight == 0).sum()) for m in linears.values()) == round(0.6 * total)


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_survive_training(family, family_dirs, corpus_dir):
    from pipeline.data import load_corpus, training_blocks
    from pipeline.training import train_keeping_masks

    model, tokenizer = load(family_dirs[family])
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.6)
    before = model_masks(linears)
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    blocks = training_blocks(load_corpus(f"text:{corpus_dir}"), tokenizer, 32)
    train_keeping_masks(
        model, linears, blocks, TrainConfig(lr=1e-2, batch_size=4, max_steps=3, weight_decay=0.1), show_progress=False
    )
    after = model_masks(linears)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not torch.equal(weights[n], m.weight) for n, m in linears.items())  # it did train


@pytest.mark.parametrize("family", FAMILIES)
def test_two_iterations_then_reload_with_from_pretrained(family, family_dirs, corpus_dir, mlflow_store, tmp_path):
    from pipeline.api import iterative_training_wrapper
    from pipeline.data import load_corpus
    from pipeline.perplexity import evaluate_on

    history = iterative_training_wrapper(
        {
            "model_name": str(family_dirs[family]),
            "dataset": f"text:{corpus_dir}",
            "target_sparsity": 0.36,
            "prune_percentage": 0.2,
            "epochs_per_iteration": 1,
            "batch_size": 4,
            "lr": 1e-3,
            "train_steps": 2,
            "seed": 1,
            "seqlen": 32,
            "experiment": family,
            "prune_method": "sparsegpt",
            "nsamples": 4,
            "model_dir": str(tmp_path / "final"),
            "output_dir": str(tmp_path / "run"),
        }
    )
    assert [round(h["sparsity"], 2) for h in history] == [0.0, 0.2, 0.36]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert sum(int((m.weight == 0).sum()) for m in prunable_linears(reloaded).values()) >= round(
        0.36 * sum(m.weight.numel() for m in prunable_linears(reloaded).values())
    )
    ppl = evaluate_on(reloaded, tokenizer, load_corpus(f"text:{corpus_dir}"), "test", 32, "cpu").perplexity
    assert ppl == pytest.approx(history[-1]["ppl_after_train"], rel=1e-5)


def linear_twin(gpt2: nn.Module) -> nn.Module:
    """The same GPT-2 with every Conv1D of its layers replaced by the equivalent nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(gpt2)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.nf)
            linear.weight.data = module.weight.detach().t().contiguous()
            linear.bias.data = module.bias.detach().clone()
            parent, child = name.rsplit(".", 1)
            setattr(twin.get_submodule(parent), child, linear)
    return twin


@pytest.mark.parametrize(
    "method, pattern",
    [
        ("magnitude", "unstructured"),
        ("sparsegpt", "unstructured"),
        ("sparsegpt", "2:4"),
        ("wanda", "unstructured"),
        ("wanda", "2:4"),
    ],
)
def test_gpt2_conv1d_is_pruned_as_its_linear_twin(family_dirs, method, pattern):
    model, tokenizer = load(family_dirs["gpt2"])
    twin = linear_twin(model)
    batch = windows(tokenizer, n=4, seqlen=24)
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, twin(batch).logits, atol=1e-5)
    config = PruneConfig(method=method, pattern=pattern, nsamples=4)
    prune_model(model, config, batch)
    prune_model(twin, config, batch)
    conv, linear = prunable_linears(model), prunable_linears(twin)
    assert list(conv) == list(linear)
    for name in conv:
        assert torch.equal(matrix_of(conv[name]) == 0, linear[name].weight == 0), name  # the same mask
        assert torch.allclose(matrix_of(conv[name]), linear[name].weight, atol=1e-5), name  # the same updates


def test_an_unknown_structure_is_one_line_naming_the_model_type(family_dirs):
    model, _ = load(family_dirs["llama"])
    model._no_split_modules = None
    with pytest.raises(ConfigError, match="model type 'llama' is not supported: its decoder layers could not be found"):
        decoder_layout(model)


def test_the_default_window_is_the_positions_but_at_most_2048():
    from pipeline.models import resolve_seqlen

    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=131072,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert resolve_seqlen(model, None) == 2048
    assert resolve_seqlen(model, 4096) == 4096  # what Wanda used on Llama-2, if asked for
