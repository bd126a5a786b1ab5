"""The process settings every run of the project gets before its first model or matmul, in one place, so
that the CLI and the benchmarks (ours and TRL's side alike) run under the same ones."""

from __future__ import annotations

import atexit
import gc
from contextlib import contextmanager
from typing import Iterator

from rm_lightning.perf.host_memory import keep_freed_memory
from rm_lightning.perf.kernel_caches import bound_kernel_caches

_exit_collection_skipped = False


def tune_process(keep_freed: bool = True) -> bool:
    """glibc keeps freed memory for reuse (``perf/host_memory``; skipped with ``keep_freed=False``), the
    oneDNN kernel caches are bounded (``perf/kernel_caches``) and the interpreter's exit skips its garbage
    collections (``skip_exit_collections``); True when freed memory is kept.

    Call it first thing: blocks mapped before it are unmapped when freed, and the caches read their
    capacities at the first matmul."""
    kept = keep_freed and keep_freed_memory()
    bound_kernel_caches()
    skip_exit_collections()
    return kept


def skip_exit_collections() -> None:
    """Freeze every object at exit (``gc.freeze``, once the ``atexit`` handlers run), so that the collections
    Python runs while it tears its modules down do not walk the many objects torch, Lightning and
    ``torch._dynamo`` leave behind: about a second of every command's exit otherwise (``benchmarks/README.md``).

    Objects are still freed by reference counting, finalizers included; only garbage in reference cycles is
    left to the operating system, which takes the whole process a moment later. Results, checkpoints and
    logs are written and closed before exit (atomically, or by Lightning's teardown), not by a collection.
    Registered once per process."""
    global _exit_collection_skipped
    if not _exit_collection_skipped:
        atexit.register(gc.freeze)
        _exit_collection_skipped = True


@contextmanager
def imports_without_collections() -> Iterator[None]:
    """The garbage collector paused while the block imports, then every object so far frozen (``gc.freeze``).

    Importing torch, Lightning, torchmetrics and transformers creates about 700,000 objects, and the
    collector, triggered by their number alone, walks all of them again several times on the way (about
    half a second of a command's start-up, ``benchmarks/README.md``). None of them is garbage: modules,
    classes and functions that live as long as the process. Frozen, the collections of the run that
    follows do not walk them either; they are still freed by reference counting."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
