"""Iteration checkpoints: written atomically, loaded safely, so a killed run resumes for free.

One file per run directory, `checkpoint.pt`, replaced as a whole after every iteration: a temp file
is written and fsynced, then renamed over the old one, and the directory fsynced. A kill at any moment
leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from .errors import UserError, option
from .outputs import os_error_behind, process_alive

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: the config is recorded by flat setting keys


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a writer killed mid-write
        if not process_alive(stale.name.rsplit(".tmp", 1)[1]):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        cause = os_error_behind(error)
        if cause is None:
            raise
        raise UserError(
            f"could not write {path} ({cause.strerror or cause}); the previous checkpoint "
            f"is intact: free some space and resume with {option('resume')}"
        ) from None
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    try:  # read back (its index and structure; mmap leaves the tensors on disk): nothing unreadable is "saved"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise UserError(
            f"{path} was written but does not read back ({type(error).__name__}: {error}); the disk may be failing"
        ) from None


def save_checkpoint(
    directory: Path,
    *,
    model_state: dict,
    masks: dict,
    iteration: int,
    history: list,
    config: dict,
    run_id: str | None,
    tracking_uri: str | None = None,
) -> Path:
    """`run_id` is the MLflow run the checkpoint continues, `tracking_uri` the store that holds it: a resume
    against another store is refused, never continued into a run that store lacks."""
    payload = {
        "tracking_uri": tracking_uri,
        "format": FORMAT_VERSION,
        "iteration": iteration,
        "history": history,
        "config": config,
        "run_id": run_id,
        "rng": rng_state(),
        "model": model_state,
        "masks": {name: mask.to("cpu") for name, mask in masks.items()},
    }
    path = Path(directory) / CHECKPOINT_NAME
    atomic_torch_save(payload, path)
    return path


def has_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a checkpoint (without reading it: at 7B that is tens of GB)."""
    return (Path(directory) / CHECKPOINT_NAME).exists()


def load_checkpoint(directory: Path) -> dict | None:
    """The checkpoint, or None when there is none; a damaged one is a clear error, never a traceback."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"checkpoint {path} is damaged or truncated ({type(error).__name__}); delete it to start over"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} is not a checkpoint of this version of the pipeline; delete it to start over")
    return payload
