"""Local reconstruction: a pruned model recovered block by block, each decoder block fitted to the dense block.

Block by block, in order, each pruned decoder block is trained (AdamW, its pruned weights kept exactly zero) to
reproduce the dense block's outputs: its inputs are the outputs of the already-reconstructed sparse blocks before
it, its targets the dense model's own block on the dense model's own hidden states, so the error of a block is
not carried into the next one's target. The loss is the mean squared error of the block's output. Only one
block's activations are held at a time: the sparse and the dense hidden states of the reconstruction set at
the boundary being worked on.

The data and the budget are fine-tuning's: the same training blocks in the same seeded order, `steps` optimizer
steps of `batch_size` sequences for every block. A token thus passes each block once per time it is drawn, and
`train_tokens` counts it once, on fine-tuning's scale; `train_flops` is 6 x (the block's parameters) per token per
block, summed: fine-tuning's 6N without the embeddings and the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import decoder_layout
from .config import TrainConfig
from .pruning.masks import MaskKeeper
from .pruning.sequential import CalibrationBatch, capture_layer_inputs, layer_output
from .training import NonFiniteLoss, TrainResult, adamw, epoch_lengths, lr_at


def _outputs(layer: nn.Module, hidden: list, batches: list, kind) -> list:
    """The layer's outputs for each batch's hidden states, without gradients."""
    with torch.no_grad():
        return [layer_output(layer, CalibrationBatch(h, b.inputs), kind) for h, b in zip(hidden, batches)]


def _fit_block(layer: nn.Module, linears: dict, batches: list, targets: list, kind, config: TrainConfig, log) -> list:
    """`layer` trained for `log.steps` steps to map each batch's hidden states to its target, one batch a step in
    turn; returns the loss of every step."""
    keeper = MaskKeeper(linears)
    optimizer = adamw(layer, config)
    total, losses = log.steps, []
    layer.train()
    for step in range(total):
        batch = batches[step % len(batches)]
        loss = F.mse_loss(layer_output(layer, batch, kind).float(), targets[step % len(batches)].float())
        loss.backward()
        keeper.zero_pruned_grads()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(layer.parameters(), config.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keeper.zero_pruned_weights()
        losses.append(loss.item())  # a sync per step: a block's step is small next to a model's
        if not math.isfinite(losses[-1]):
            raise NonFiniteLoss(step + 1, losses[-1])
        # the block's own error, not the model's loss: a name of its own in the logged steps
        log(step + 1, {"block_mse": losses[-1], "lr": lr_at(step, total, config)})
    layer.eval()
    return losses


class _Log:
    """Each block's steps at one global step count (block k's step s is k * steps + s)."""

    def __init__(self, steps: int, on_log: Callable | None, every: int):
        self.steps, self.on_log, self.every, self.offset = steps, on_log, every, 0

    def __call__(self, step: int, metrics: dict) -> None:
        if self.on_log is not None and (step % self.every == 0 or step == self.steps):
            self.on_log(self.offset + step, metrics)


def reconstruct_blocks(
    model: nn.Module,
    dense: nn.Module,
    linears: dict,
    blocks: torch.Tensor,
    config: TrainConfig,
    steps: int | None = None,
    on_log: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Reconstructs `model`'s decoder blocks in place against `dense`'s (the same architecture, unpruned), on the
    training `blocks` [n, seqlen] in `config.seed`'s order: `steps` optimizer steps per block, or as many as
    `config` gives fine-tuning (--epochs of --max-steps)."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    per_block = sum(epoch_lengths(blocks.shape[0], config, steps))
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(config.seed))
    chosen = blocks[order[: min(blocks.shape[0], per_block * config.batch_size)]]
    batches = capture_layer_inputs(model, chosen, device, config.batch_size)  # the embeddings are not pruned
    dense_hidden = [batch.hidden for batch in batches]
    layout, dense_layout = decoder_layout(model), decoder_layout(dense)
    log, result = _Log(per_block, on_log, config.log_every), TrainResult()
    for index, (layer, teacher) in enumerate(zip(layout.layers, dense_layout.layers)):
        kind = layout.layer_types[index]
        targets = _outputs(teacher, dense_hidden, batches, kind)
        prefix = f"{layout.layer_prefix}.{index}."
        own = {name[len(prefix) :]: module for name, module in linears.items() if name.startswith(prefix)}
        log.offset = index * per_block
        losses = _fit_block(layer, own, batches, targets, kind, config, log)
        result.epoch_losses.append(sum(losses) / max(1, len(losses)))
        for batch, output in zip(batches, _outputs(layer, [b.hidden for b in batches], batches, kind)):
            batch.hidden = output
        dense_hidden = targets
    result.steps = per_block
    result.tokens = per_block * config.batch_size * chosen.shape[1]
    result.flops = 6.0 * sum(p.numel() for layer in layout.layers for p in layer.parameters()) * result.tokens
    result.trained_parameters = sum(p.numel() for layer in layout.layers for p in layer.parameters())
    result.seconds = time.perf_counter() - started
    return result
