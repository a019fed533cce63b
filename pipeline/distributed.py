"""Which process does what under `accelerate launch` (or torchrun): Accelerate's state, nothing of our own.

Every process runs the same command. All of them prune, train (DDP averages their gradients, or FSDP
shards the weights, gradients and optimizer states) and evaluate a share of the windows; only the main
process talks to MLflow, prints, and writes checkpoints and models. One process without a launcher is
simply the main one.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast,
    broadcast_object_list,
    fsdp2_prepare_model,
    gather_object,
)
from torch.distributed.tensor import DTensor

from .errors import ConfigError, option


def _state():
    # without cpu=True Accelerate does not form a CPU process group (gloo) and every process is "main"
    return PartialState(cpu=not torch.cuda.is_available())


def launched() -> bool:
    """True under a multi-process launcher; checked from the environment, so a single process never
    initializes a process group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_index() -> int:
    return _state().process_index if launched() else 0


def num_processes() -> int:
    return _state().num_processes if launched() else 1


def is_main_process() -> bool:
    return not launched() or _state().is_main_process


def from_main(value):
    """The main process's `value` (any picklable object), on every process: a decision every process must
    take alike (which grid cells are done, whether a cached number exists) is taken by the main one."""
    if not launched():
        return value
    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


@torch.no_grad()
def sync_from_main(model: torch.nn.Module) -> None:
    """Every process gets the main process's weights: after pruning, so all ranks hold one mask even
    where their calibration passes differ in the last bit (CUDA reductions are not deterministic)."""
    if not launched():
        return
    device = _state().device  # NCCL broadcasts device tensors; the model may sit on the CPU
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.copy_(broadcast(tensor.data.to(device).contiguous(), from_process=0))


def gather_window_nlls(indices: torch.Tensor, nlls: torch.Tensor, total: int) -> torch.Tensor:
    """Reassembles per-window NLLs computed on different processes, in window order."""
    if not launched():
        return nlls
    ordered = torch.empty(total, dtype=nlls.dtype)
    for part_indices, part_nlls in gather_object([(indices, nlls)]):
        ordered[part_indices] = part_nlls
    return ordered


def training_accelerator(cpu: bool):
    """The Accelerator that `accelerate launch` configured (DDP, or FSDP under `--use_fsdp`).

    Accelerate drops the FSDP plugin when the processes are CPUs (it then forms a gloo group and
    wraps in DDP), although torch's FSDP2 (`fully_shard`) runs over gloo. Under `--use_fsdp` on CPUs
    the state is switched to FSDP with the plugin read from the launcher's environment, so CPU
    clusters, and the two-process test, take the same FSDP2 path as GPUs.
    """
    if not launched():
        _forget_another_devices_state(cpu)
    accelerator = Accelerator(cpu=cpu)
    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # both shared states: every later AcceleratorState() copies the PartialState's type over its own
        _state().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


def _forget_another_devices_state(cpu: bool) -> None:
    """Accelerate keeps one state per process, made by its first Accelerator: a process that trains on the CPU
    and then on a GPU (a notebook, a test session) would have the GPU model moved back to the CPU, and the other
    way round is refused. One process on its own starts the state afresh when the device changes; a launched
    one has its device for life."""
    state = AcceleratorState._shared_state
    if "device" in state and (state["device"].type == "cpu") != cpu:
        AcceleratorState._reset_state(reset_partial_state=True)


def fsdp_requested() -> bool:
    """What `accelerate launch --use_fsdp` (or an FSDP accelerate config) tells every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_launch(batch_size: int) -> None:
    """Called before any work, from the launcher's environment: FSDP1 is refused (it flattens each
    wrapped module's parameters into one, and the masks address them by name), and the global batch
    must split evenly over the processes."""
    if fsdp_requested() and os.environ.get("FSDP_VERSION") != "2":
        raise ConfigError(
            "FSDP needs version 2 here: launch with --use_fsdp --fsdp_version 2 "
            "(or fsdp_version: 2 in the accelerate config)"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ConfigError(
            f"{option('batch_size')} {batch_size} is the global batch and must split evenly over "
            f"the {world} processes: use a multiple of {world}"
        )


def shard_frozen(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """A module that only runs forward (a distillation teacher), sharded by FSDP2 as the trained model is:
    Accelerate's own preparation, which `accelerator.prepare` refuses without an optimizer."""
    return fsdp2_prepare_model(accelerator, module)


def shards_parameters(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


@torch.no_grad()
def copy_full_weights(sharded: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Gathers FSDP's sharded parameters into the same-named parameters of an unsharded model, one
    tensor at a time, on every process."""
    targets = dict(plain.named_parameters())
    for name, param in sharded.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        targets[name].copy_(full)


def local_numel(tensor: torch.Tensor) -> int:
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()
