"""Clocks, memory and the machine's matmul peak, the same way for every variant."""

from __future__ import annotations

import re
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

MIB = 2 ** 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: str,
               label: str) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones, and the warmup's seconds
    (where compiling happens)."""
    times = []
    for _ in tqdm(range(warmup + steps), desc=label, leave=False, unit="step"):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[warmup:], sum(times[:warmup])


class PeakMemory:
    """Memory a variant holds at its peak: weights, reference, optimizer state, activations, data.

    CUDA: ``torch.cuda.max_memory_allocated`` since ``reset``. CPU: the process's peak resident
    set size since ``reset`` (``VmHWM``, which writing 5 to ``/proc/self/clear_refs`` resets)
    minus its size right after imports, before any model was built, so the interpreter and
    the libraries are not counted. Where ``VmHWM`` cannot be reset, ``ru_maxrss`` (the
    lifetime peak) is used and ``lifetime_peak`` says that setup may be included.
    """

    def __init__(self, device: str):
        self.device = device
        self.lifetime_peak = False
        self.baseline = 0 if device == "cuda" else self._status_kib("VmRSS") * 1024

    @staticmethod
    def _status_kib(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match is None:
            raise OSError(f"/proc/self/status has no {field}")
        return int(match.group(1))

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.lifetime_peak = True

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.lifetime_peak:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline
        return self._status_kib("VmHWM") * 1024 - self.baseline


def matmul_peak_gflops(device: str, precision: str, budget_s: float = 1.0, max_size: int = 8192) -> dict:
    """Best GFLOP/s of square matmuls in ``precision``, growing the size while a call stays under ``budget_s``.

    Starting small keeps a precision the hardware emulates slowly (bf16 on CPUs without
    AVX512-BF16 or AMX) from taking minutes.
    """
    dtype = DTYPES[precision]
    best, size, sizes = 0.0, 256, []
    while size <= max_size:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        rate = 0.0
        for _ in range(4):  # the first call warms caches and kernels up
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            rate = max(rate, 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
        best = max(best, rate)
        sizes.append(size)
        if 2 * (2 * size) ** 3 / (rate * 1e9) > budget_s:
            break
        size *= 2
    return {"precision": precision, "gflops": best, "sizes": sizes}


def linear_layers_seconds(shapes: list[list[int]], tokens: int, device: str, precision: str,
                          repeats: int = 5) -> float:
    """Seconds the decoder's linear layers take, forward and backward, on ``tokens`` rows in ``precision``.

    ``shapes`` holds ``[fan_in, fan_out, count]`` (``flops.decoder_linear_shapes``). No step
    can skip these matmuls. Timed alone at the batch's own shapes, they show whether a low MFU
    comes from matmuls that are slow at those shapes or from the rest of the step. Each shape
    is timed as autograd lays its gradients out (the median of ``repeats`` calls after two
    warm ones), then counted ``count`` times.
    """
    dtype, total = DTYPES[precision], 0.0
    for fan_in, fan_out, count in shapes:
        inputs = torch.randn(tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype, requires_grad=True)
        grad_output = torch.randn(tokens, fan_out, device=device, dtype=dtype)
        seconds = []
        for _ in range(2 + repeats):
            inputs.grad = weight.grad = None
            synchronize(device)
            start = time.perf_counter()
            torch.nn.functional.linear(inputs, weight).backward(grad_output)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        total += count * median(seconds[2:])
    return total
