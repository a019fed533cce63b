"""Local reconstruction as a recovery: each pruned block fitted to the dense block, masks kept bit for bit, the
model better than untrained, its tokens and FLOPs on fine-tuning's scale; and through the commands."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from loading import load_model_and_tokenizer
from test_refusals import here

from pipeline.architecture import decoder_layout
from pipeline.config import TrainConfig
from pipeline.pruning.magnitude import magnitude_prune_layerwise
from pipeline.pruning.masks import model_masks, prunable_linears
from pipeline.pruning.sequential import capture_layer_inputs, layer_output
from pipeline.reconstruction import reconstruct_blocks
from pipeline.training import train_keeping_masks

CONFIG = TrainConfig(lr=3e-3, batch_size=4, max_steps=6, seed=3)


@pytest.fixture()
def pruned(tiny_model_dir, corpus_dir):
    from pipeline.data import load_corpus, training_blocks

    dense, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    model = copy.deepcopy(dense)
    magnitude_prune_layerwise(prunable_linears(model), 0.7)
    return dense, model, training_blocks(load_corpus(f"text:{corpus_dir}"), tokenizer, 32)


def block_errors(model, dense, windows) -> list[float]:
    """Per decoder block: the squared error of the model's block against the dense block, each on the same inputs
    (the dense model's own hidden states there), computed here from the layers themselves."""
    errors = []
    ours, theirs = decoder_layout(model), decoder_layout(dense)
    batches = capture_layer_inputs(dense, windows, torch.device("cpu"), 4)
    with torch.no_grad():
        for index, (layer, reference) in enumerate(zip(ours.layers, theirs.layers)):
            kind = ours.layer_types[index]
            error = 0.0
            for batch in batches:
                target = layer_output(reference, batch, kind)
                error += float(F.mse_loss(layer_output(layer, batch, kind), target))
                batch.hidden = target
            errors.append(error)
    return errors


def test_each_block_moves_toward_the_dense_block_with_its_mask_kept(pruned):
    dense, model, blocks = pruned
    linears = prunable_linears(model)
    masks, before = model_masks(linears), block_errors(model, dense, blocks[:8])
    logged = []
    result = reconstruct_blocks(model, dense, linears, blocks, CONFIG, on_log=lambda s, m: logged.append(s))
    after = block_errors(model, dense, blocks[:8])
    assert all(torch.equal(masks[name], mask) for name, mask in model_masks(linears).items())
    assert all(a < b for a, b in zip(after, before)), (before, after)
    layers = len(decoder_layout(model).layers)
    # fine-tuning's scale: its steps and batch give the same tokens; FLOPs 6 x the blocks' parameters per token
    finetuned = train_keeping_masks(copy.deepcopy(model), prunable_linears(copy.deepcopy(model)), blocks, CONFIG)
    assert result.tokens == finetuned.tokens == 6 * 4 * blocks.shape[1]
    block_parameters = sum(p.numel() for layer in decoder_layout(model).layers for p in layer.parameters())
    assert result.flops == pytest.approx(6 * block_parameters * result.tokens)
    assert result.steps == 6 and len(result.epoch_losses) == layers
    assert logged == sorted(set(logged)) and max(logged) <= layers * 6  # one global step count over the blocks


def test_the_dense_model_is_left_untouched(pruned):
    dense, model, blocks = pruned
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    reconstruct_blocks(model, dense, prunable_linears(model), blocks, CONFIG)
    assert all(torch.equal(state[k], v) for k, v in dense.state_dict().items())


def test_prune_then_train_reconstruct_beats_the_untrained_model(tmp_path, mlflow_store):
    """On the embedded opt-tiny (a model with something to recover): SparseGPT at 70%, then six steps of each
    recovery at the same batch and lr."""
    from mlflow.tracking import MlflowClient

    from pipeline.data import eval_tokens, load_corpus
    from pipeline.perplexity import perplexity

    prune = ["--model", "opt-tiny", "--prune-method", "sparsegpt", "--sparsity", "0.7", "--nsamples", "16"]
    assert here("prune", *prune, "--output-dir", "sparse", cwd=tmp_path).returncode == 0
    for recovery, extra in (("reconstruct", ["--teacher", "opt-tiny"]), ("finetune", [])):
        train = ["--model", "sparse", "--recovery", recovery, "--max-steps", "6", "--batch-size", "4", "--lr", "1e-3"]
        assert here("train", *train, *extra, "--output-dir", recovery, cwd=tmp_path).returncode == 0
    client = MlflowClient()
    every = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(every, "tags.mlflow.runName LIKE 'train%'", order_by=["start_time ASC"])
    reconstructed, finetuned = (run.data.metrics for run in runs)
    assert reconstructed["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert reconstructed["train_tokens"] == finetuned["train_tokens"] == 6 * 4 * 256
    (sparse, tokenizer), (model, _) = (load_model_and_tokenizer(str(tmp_path / d)) for d in ("sparse", "reconstruct"))
    assert all(
        torch.equal(a.weight == 0, b.weight == 0)
        for a, b in zip(prunable_linears(sparse).values(), prunable_linears(model).values())
    )
    ids = eval_tokens(load_corpus("pydocs"), tokenizer, "test", 256)[: 32 * 256]  # the test split, measured here
    with torch.no_grad():
        assert perplexity(model, ids, 256).perplexity < perplexity(sparse, ids, 256).perplexity


@pytest.mark.parametrize(
    "args, words",
    [
        (["--recovery", "reconstruct"], "give --teacher"),
        (["--recovery", "reconstruct", "--teacher", "opt-tiny", "--distill", "logits"], "--distill has nothing"),
        (["--recovery", "reconstruct", "--teacher", "opt-tiny", "--train-params", "lora"], "--train-params has"),
    ],
)
def test_reconstruct_is_refused_where_it_cannot_run(tmp_path, args, words):
    result = here("train", "--model", "opt-tiny", *args, cwd=tmp_path)
    assert result.returncode == 2 and words in result.stderr, result.stderr
