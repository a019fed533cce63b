"""Causal-LM training on packed token blocks: the loop behind `pretrain`, `train` and each IMP iteration.

Pruned weights stay pruned the llm-compressor way: the gradients of pruned weights are zeroed before
the optimizer step and the weights themselves re-zeroed after it (AdamW's moments and weight decay
would revive them otherwise). Both are one `torch._foreach_mul_` over all prunable matrices.

Accelerate runs the loop: one process as is, several under `accelerate launch` with DDP or FSDP2.
`batch_size` is the global batch: each of the P processes takes its 1/P share of every batch, so P
processes take the same optimizer steps on the same data as one process would.

FSDP2 turns a module's parameters into sharded DTensors in place, while pruning, evaluation and
checkpoints need the plain model. So under FSDP a copy of the model (made on the CPU) is sharded and
trained, its masks are kept shard by shard, and at the end the full weights are gathered back into
the plain model on every process.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import trained_parameters
from .config import TrainConfig
from .distillation import Distillation, cross_entropy
from .distributed import (
    check_launch,
    copy_full_weights,
    launched,
    local_numel,
    shard_frozen,
    shards_parameters,
    sync_from_main,
    training_accelerator,
)
from .pruning.masks import MaskKeeper, model_masks


@dataclass
class TrainResult:
    epoch_losses: list = field(default_factory=list)
    steps: int = 0
    tokens: int = 0  # tokens that went into optimizer steps, summed over the processes
    flops: float = 0.0  # tokens * training_flops_per_token
    seconds: float = 0.0
    parallelism: str = "NO"  # Accelerate's distributed type: NO, MULTI_GPU / MULTI_CPU (DDP), FSDP
    held_parameters: int = 0  # parameter elements this process held while training (its shards under FSDP)
    teacher_held_parameters: int = 0  # the same, of the distillation teacher
    trained_parameters: int = 0  # parameter elements the optimizer updated (--train-params)
    optimizer_state_elements: int = 0  # elements of AdamW's state (two moments per trained parameter)
    peak_memory_bytes: int = 0  # the recovery's peak (peak_memory.peak_memory: GPU allocator or CPU resident set)

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def training_flops_per_token(model: nn.Module, seqlen: int) -> float:
    """6 N + 6 L T d (Kaplan et al. 2020), dense: N = the weights of every matrix multiplication, lm_head
    included (pruned weights count: the training computes them); the second term is attention's score
    and value products over a window of T tokens."""
    config = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * matmul_params + 6 * config.num_hidden_layers * seqlen * config.hidden_size


def steps_per_epoch(n_blocks: int, config: TrainConfig) -> int:
    full = math.ceil(n_blocks / (config.batch_size * config.grad_accum))
    return min(full, config.max_steps) if config.max_steps else full


def epoch_lengths(n_blocks: int, config: TrainConfig, steps: int | None = None) -> list[int]:
    """The optimizer steps of each epoch: --epochs of steps_per_epoch, or exactly `steps` over whole passes of the
    data (the last pass cut short)."""
    if steps is None:
        return [steps_per_epoch(n_blocks, config)] * config.epochs
    full = math.ceil(n_blocks / (config.batch_size * config.grad_accum))
    return [full] * (steps // full) + ([steps % full] if steps % full else [])


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)
    return config.lr


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


def adamw(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases and norms)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def _module_to_train(model: nn.Module, sharded: bool) -> nn.Module:
    """The model itself, or under FSDP a CPU copy of it for FSDP2 to shard in place."""
    if not sharded:
        return model
    sync_from_main(model)  # FSDP2, unlike DDP, shards each process's own weights
    model.to("cpu")  # the device holds only the shards while training
    return copy.deepcopy(model)


def _set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    # transformers 5 renamed it; 4.x has only the old name
    if enabled:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    else:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def _teacher_on(teacher: nn.Module, accelerator, sharded: bool, device: torch.device) -> nn.Module:
    """The frozen teacher where the student trains: on each process's device (DDP: a copy per process), or
    sharded across the processes as the student is (FSDP2)."""
    if not sharded:
        return teacher.to(device)
    return shard_frozen(accelerator, copy.deepcopy(teacher).to("cpu").requires_grad_(False))


class _Trainer:
    """What the loop trains with, prepared by Accelerate: the (wrapped) model, AdamW, the mask keeper and the
    objective, on this process's device; and the steps of one optimizer step, each a method."""

    def __init__(self, model: nn.Module, config: TrainConfig, mask_keeper, teacher: nn.Module | None):
        check_launch(config.batch_size)
        self.model, self.config = model, config
        self.home = next(model.parameters()).device
        self.use_bf16 = config.autocast == "bf16" or (config.autocast == "auto" and self.home.type == "cuda")
        self.accelerator = training_accelerator(cpu=self.home.type == "cpu")
        self.sharded = shards_parameters(self.accelerator)
        self.trained = _module_to_train(model, self.sharded)
        if config.gradient_checkpointing:
            _set_gradient_checkpointing(self.trained, True)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.trained, adamw(self.trained, config))
        self.keeper = None
        if mask_keeper is not None:
            # Read now, when every process holds the main process's weights (DDP copied them when it
            # wrapped the model; under FSDP sync_from_main did), so all keep one mask. The FSDP keeper
            # reads the sharded weights of the copy.
            mask_keeper.refresh()
            self.keeper = mask_keeper.over(self.trained) if self.sharded else mask_keeper
        self.device = next(self.wrapped.parameters()).device
        self.objective = cross_entropy
        if config.distill != "none":
            if teacher is None:
                raise ValueError(f"--distill {config.distill} needs a teacher model")
            self.objective = Distillation(_teacher_on(teacher, self.accelerator, self.sharded, self.device), config)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.share = config.batch_size // self.world  # each process's part of the global batch

    def result(self) -> TrainResult:
        teacher = self.objective.teacher if isinstance(self.objective, Distillation) else None
        return TrainResult(
            parallelism=self.accelerator.distributed_type.value,
            held_parameters=sum(local_numel(p) for p in self.trained.parameters()),
            teacher_held_parameters=sum(local_numel(p) for p in teacher.parameters()) if teacher else 0,
        )

    def micro_batch(self, blocks: torch.Tensor, order: torch.Tensor, index: int) -> torch.Tensor:
        """The index-th micro-batch of the epoch's order: this process's share of its sequences."""
        first = (index * self.config.batch_size) % blocks.shape[0]
        chosen = order[first : first + self.config.batch_size][self.rank * self.share : (self.rank + 1) * self.share]
        return blocks[chosen].to(self.device, non_blocking=True)

    def forward_backward(self, batch: torch.Tensor, last: bool) -> tuple[torch.Tensor, dict]:
        # gradients are averaged across processes once per optimizer step, not per micro-batch
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                loss, parts = self.objective(self.wrapped, batch)
            self.accelerator.backward(loss / self.config.grad_accum)
        return loss.detach(), parts

    def optimizer_step(self, lr: float) -> None:
        """AdamW at `lr`, the pruned weights kept at zero: their gradients zeroed before the step (no
        moments build up) and the weights re-zeroed after it (weight decay and momentum would revive them)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.keeper is not None:
            self.keeper.zero_pruned_grads()
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(self.wrapped.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.keeper is not None:
            self.keeper.zero_pruned_weights()

    def mean(self, value: torch.Tensor) -> float:
        """The mean over the processes, read to the host (a device sync)."""
        return self.accelerator.reduce(value, "mean").item()

    def count_into(self, result: TrainResult) -> None:
        """What the optimizer updated and the state it kept, into `result`."""
        result.trained_parameters = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        result.optimizer_state_elements = sum(
            value.numel() for state in self.optimizer.state.values() for value in state.values() if value.ndim
        )

    def finish(self) -> None:
        """The trained weights in the plain model (gathered from the shards under FSDP), the wrappers freed."""
        if self.sharded:
            copy_full_weights(self.trained, self.model)
            self.model.to(self.home)
        if self.config.gradient_checkpointing:
            _set_gradient_checkpointing(self.trained, False)
        del self.wrapped, self.trained, self.keeper, self.objective, self.optimizer
        if launched():
            self.accelerator.free_memory()  # drops the DDP/FSDP wrapper; `model` itself holds the trained weights
        # A process of its own holds no wrapper, and the optimizer and its state go with this trainer. Accelerate's
        # free_memory would run a full gc.collect: 0.5 s after every training in a process holding MLflow and
        # transformers, 44% of a tiny grid's time.
        self.model.eval()


def train_causal_lm(
    model: nn.Module,
    blocks: torch.Tensor,
    config: TrainConfig,
    *,
    mask_keeper=None,
    steps: int | None = None,
    teacher: nn.Module | None = None,
    desc: str = "Training",
    on_log: Callable[[int, dict], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Trains `model` in place on `blocks` [n, seqlen], with `config.distill`'s objective (`teacher` frozen), for
    `config.epochs` epochs or exactly `steps` optimizer steps; `on_log(global_step, {"loss", "lr", and the loss's
    parts})` every log_every steps."""
    trainer = _Trainer(model, config, mask_keeper, teacher)
    result = trainer.result()
    lengths = epoch_lengths(blocks.shape[0], config, steps)
    show_progress = show_progress and trainer.accelerator.is_main_process
    started, step = time.perf_counter(), 0
    trainer.trained.train()
    for epoch, per_epoch in enumerate(lengths):
        # each epoch its own order, drawn from the seed alone: a resumed or relaunched run sees the same data
        order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(config.seed + epoch))
        epoch_loss = torch.zeros((), device=trainer.device)  # summed on the device: no sync per step
        window = LossWindow()
        bar = tqdm(
            range(per_epoch),
            desc=f"{desc}, Epoch {epoch + 1}/{len(lengths)}",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        for step_in_epoch in bar:
            lr = lr_at(step, sum(lengths), config)
            for accum in range(config.grad_accum):
                batch = trainer.micro_batch(blocks, order, step_in_epoch * config.grad_accum + accum)
                loss, parts = trainer.forward_backward(batch, last=accum == config.grad_accum - 1)
                window.add({"loss": loss, **parts}, config.grad_accum)
                epoch_loss += loss / config.grad_accum
                result.tokens += batch.numel() * trainer.world
            trainer.optimizer_step(lr)
            step += 1
            # reading the loss forces a device sync, so it happens only every log_every steps
            if step % config.log_every == 0 or step_in_epoch == per_epoch - 1:
                running = window.take(trainer.mean)
                if not math.isfinite(running["loss"]):
                    raise NonFiniteLoss(step, running["loss"])
                bar.set_postfix(loss=f"{running['loss']:.4f}")
                if on_log is not None:
                    on_log(step, {**running, "lr": lr})
        bar.close()
        result.epoch_losses.append(trainer.mean(epoch_loss) / per_epoch)
        if show_progress:
            tqdm.write(f"{desc}, Epoch {epoch + 1}/{len(lengths)}: average loss {result.epoch_losses[-1]:.4f}")
    result.steps, result.seconds = step, time.perf_counter() - started
    result.flops = result.tokens * training_flops_per_token(model, blocks.shape[1])
    trainer.count_into(result)
    trainer.finish()
    return result


class LossWindow:
    """The loss and its parts summed over the steps since the last log, on the device."""

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, values: dict, grad_accum: int) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value / grad_accum
        self.steps += 1 / grad_accum

    def take(self, mean: Callable[[torch.Tensor], float]) -> dict:
        """Each sum's mean per optimizer step (and over the processes); the window starts again."""
        steps = round(self.steps)
        running = {key: mean(value) / steps for key, value in self.sums.items()}
        self.sums, self.steps = {}, 0
        return running


def train_keeping_masks(
    model: nn.Module,
    linears: dict,
    blocks: torch.Tensor,
    config: TrainConfig,
    *,
    steps: int | None = None,
    teacher: nn.Module | None = None,
    desc: str = "Training",
    on_log: Callable[[int, dict], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Recovery training of the parameters `config.train_params` names: every pruned weight of `linears` stays
    exactly zero, which is checked after (lora's adapters merged by then)."""
    masks = model_masks(linears)
    settings = (config.lora_rank, config.lora_alpha, config.lora_targets)
    with trained_parameters(model, linears, config.train_params, *settings):
        # frozen matrices (norms-biases) and masked updates (lora) cannot revive a zero: nothing to keep
        keeper = MaskKeeper(linears) if config.train_params == "all" else None
        result = train_causal_lm(
            model,
            blocks,
            config,
            mask_keeper=keeper,
            steps=steps,
            teacher=teacher,
            desc=desc,
            on_log=on_log,
            show_progress=show_progress,
        )
    changed = [name for name, module in linears.items() if not torch.equal(module.weight.detach() != 0, masks[name])]
    if changed:
        raise RuntimeError(f"the mask changed during training in {changed[:3]}: a bug, please report it")
    return result
