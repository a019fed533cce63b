"""The peak memory of a phase of work, measured: the allocators' bytes in live blocks, on a GPU and on a CPU."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def _heap_reader():
    """A function giving the bytes the C library's malloc holds in live blocks (glibc 2.33+'s mallinfo2: the heap's
    allocated blocks and the mmapped ones), or None where there is no such call."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def live() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return live


class PeakSampler(threading.Thread):
    """Samples `read()` every millisecond, keeping the highest."""

    def __init__(self, read):
        super().__init__(daemon=True)
        self.read, self.peak, self._done = read, read(), threading.Event()
        self.start()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.read())


@dataclass
class Peak:
    bytes: int = 0


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """The peak while the block runs, in `Peak.bytes` after it: the bytes in live blocks, whatever was allocated
    before the block included (the model, its copies, the data), freed blocks that an allocator keeps for reuse
    not. On CUDA the caching allocator's peak on `device` (max_memory_allocated; not the CUDA context); on a CPU
    the C library's malloc (every tensor, and the libraries' own heap), sampled every millisecond, or the
    process's resident memory where the C library cannot say (it also counts freed blocks kept for reuse)."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak.bytes = torch.cuda.max_memory_allocated(device)
        return
    sampler = PeakSampler(_heap_reader() or rss)
    try:
        yield peak
    finally:
        peak.bytes = sampler.stop()
