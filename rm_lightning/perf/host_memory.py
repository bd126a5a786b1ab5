"""Keep freed host memory inside the process, so that a CPU training step reuses warm pages.

PyTorch has no caching allocator for CPU tensors: every tensor comes from the C library's
``malloc``. glibc serves every block above its mmap threshold (128 KiB at first, raised as
blocks are freed but never above 32 MiB) with a fresh ``mmap``, gives it back with ``munmap``
when it is freed, and shrinks the heap when its top is free. So each training step maps its
gradients and activations anew, and the kernel zero-fills every page on first touch: step
times swing from one step to the next, and the embedding gradient alone is re-faulted every
step.

``keep_freed_memory`` tells glibc to serve every block from its heap and never to shrink it
(``mallopt(M_MMAP_MAX, 0)`` and the largest ``M_TRIM_THRESHOLD``): a freed block stays mapped
and the next step's tensor of that size reuses it, warm. The process keeps its peak footprint
instead of handing memory back between steps, which a training process has no use for anyway.
CUDA tensors are unaffected (PyTorch caches those itself). Its effect on step times is in
``benchmarks/README.md``.

It is applied by the CLI and by the benchmark (to every variant, TRL's included), through
``perf/process_tuning.tune_process``. Scripts of your own can call ``tune_process()`` (this, the
kernel-cache bound and the exit without collections) or ``keep_freed_memory()`` first thing. Set
``RM_LIGHTNING_KEEP_FREED_MEMORY=0`` to keep glibc's defaults; it is also left alone when ``MALLOC_MMAP_MAX_``,
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set (your own tuning) and when
the C library is not glibc (macOS, musl), or another allocator is preloaded (jemalloc,
tcmalloc, mimalloc).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

OPT_OUT_ENV = "RM_LIGHTNING_KEEP_FREED_MEMORY"
GLIBC_TUNING_ENVS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def why_not_tuned() -> str | None:
    """Why ``keep_freed_memory`` leaves the allocator as it is, or None when it would tune it."""
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT_ENV} is off"
    own = [name for name in GLIBC_TUNING_ENVS if name in os.environ]
    if own:
        return f"{', '.join(own)} already set"
    preloaded = [name for name in OTHER_ALLOCATORS if name in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        return f"{preloaded[0]} is preloaded"
    if not is_glibc():
        return "the C library is not glibc"
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of unmapping them; True when it did.

    Call it before the model is loaded: blocks mapped before it are still unmapped when freed.
    Safe to call more than once.
    """
    reason = why_not_tuned()
    if reason is None:
        libc = ctypes.CDLL(None)
        # mallopt returns 1 on success
        if libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD) == 1:
            log.debug("glibc keeps freed memory for reuse (M_MMAP_MAX 0, largest M_TRIM_THRESHOLD)")
            return True
        reason = "mallopt refused the settings"
    log.debug("host allocator left at its defaults: %s", reason)
    return False


def release_free_pages() -> bool:
    """Hand the pages of freed heap blocks back to the kernel (glibc's ``malloc_trim(0)``); True when some were.

    ``keep_freed_memory`` keeps every freed block mapped, which makes short steps fast, but a
    step run as many micro-batches of different shapes (``token_budget``) leaves holes between
    live blocks whose pages add up to the peak. Trimming after each micro-batch's backward costs
    one zero-fill per page touched again, small beside a micro-batch's forward and backward.
    """
    if not is_glibc():
        return False
    return ctypes.CDLL(None).malloc_trim(0) == 1
