"""Which process does what under `accelerate launch` (or torchrun): Accelerate's state, nothing of our own.

Every process runs the same command. All of them prune, train (DDP averages their gradients) and
evaluate a share of the windows; only the main process talks to MLflow, prints, and writes
checkpoints and models. One process without a launcher is simply the main one.
"""

from __future__ import annotations

import os
import sys

import torch


def _state():
    from accelerate import PartialState

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


def silence_other_processes() -> None:
    """Only the main process prints (summaries, progress); the others keep stderr for their errors."""
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")


def wait_for_everyone() -> None:
    if launched():
        _state().wait_for_everyone()


@torch.no_grad()
def sync_from_main(model: torch.nn.Module) -> None:
    """Every process gets the main process's weights: after pruning, so all ranks hold one mask even
    where their calibration passes differ in the last bit (CUDA reductions are not deterministic)."""
    if not launched():
        return
    from accelerate.utils import broadcast

    device = _state().device  # NCCL broadcasts device tensors; the model may sit on the CPU
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.copy_(broadcast(tensor.data.to(device).contiguous(), from_process=0))


def gather_window_nlls(indices: torch.Tensor, nlls: torch.Tensor, total: int) -> torch.Tensor:
    """Reassembles per-window NLLs computed on different processes, in window order."""
    if not launched():
        return nlls
    from accelerate.utils import gather_object

    ordered = torch.empty(total, dtype=nlls.dtype)
    for part_indices, part_nlls in gather_object([(indices, nlls)]):
        ordered[part_indices] = part_nlls
    return ordered
