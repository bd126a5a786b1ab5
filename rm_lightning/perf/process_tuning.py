"""The process settings every run of the project gets before its first model or matmul, in one place, so
that the CLI and the benchmarks (ours and TRL's side alike) run under the same ones."""

from __future__ import annotations

from rm_lightning.perf.host_memory import keep_freed_memory
from rm_lightning.perf.kernel_caches import bound_kernel_caches


def tune_process(keep_freed: bool = True) -> bool:
    """glibc keeps freed memory for reuse (``perf/host_memory``; skipped with ``keep_freed=False``) and the
    oneDNN kernel caches are bounded (``perf/kernel_caches``); True when freed memory is kept.

    Call it first thing: blocks mapped before it are unmapped when freed, and the caches read their
    capacities at the first matmul."""
    kept = keep_freed and keep_freed_memory()
    bound_kernel_caches()
    return kept
