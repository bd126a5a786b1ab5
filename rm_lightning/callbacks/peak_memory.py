"""What a run cost in memory: its peak resident memory, and its peak CUDA memory on a GPU.

Read at the end of a run for ``results.json`` and the final table, so that a sweep shows what
each run needed. The host figure is the process's lifetime peak resident set (``ru_maxrss``,
which on Linux equals ``VmHWM``): weights, optimizer state, activations, the data and the
libraries together, as ``/usr/bin/time -v`` reports it. With several processes each figure is
the largest over them (every process must call ``peak_memory``: it is a collective then).
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch

GIB = 2 ** 30


def host_peak_bytes() -> int:
    """This process's peak resident memory (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cuda_peak_bytes() -> Optional[int]:
    """Peak CUDA memory allocated by PyTorch in this process, or None when it never used CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return max(torch.cuda.max_memory_allocated(device) for device in range(torch.cuda.device_count()))


def peak_memory(trainer=None) -> dict[str, Optional[int]]:
    """``{"host_rss_bytes": ..., "cuda_bytes": ... or None}``, the largest over the trainer's processes."""
    peaks = {"host_rss_bytes": host_peak_bytes(), "cuda_bytes": cuda_peak_bytes()}
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        device = trainer.strategy.root_device
        values = torch.tensor([peaks["host_rss_bytes"], peaks["cuda_bytes"] or -1], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        host, cuda = values.tolist()
        peaks = {"host_rss_bytes": host, "cuda_bytes": cuda if cuda >= 0 else None}
    return peaks


def describe(peaks: dict[str, Optional[int]]) -> str:
    """One line for the final table."""
    line = f"peak memory: {peaks['host_rss_bytes'] / GIB:.2f} GiB resident"
    if peaks.get("cuda_bytes") is not None:
        line += f", {peaks['cuda_bytes'] / GIB:.2f} GiB CUDA"
    return line
