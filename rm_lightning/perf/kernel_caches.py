"""Bound the CPU matmul kernel caches, which otherwise grow by every batch shape a run meets.

On a CPU, bf16 matmuls run through oneDNN. Two caches keep a compiled primitive per distinct
problem shape: oneDNN's own primitive cache and ideep's (PyTorch's C++ wrapper) cache of forward
computations, each of up to 1024 entries. A training batch's packed length changes from batch to
batch, and so does every micro-batch's under ``token_budget``, so nearly every forward adds
entries to both (a linear layer's forward and its two backward products per weight shape), and
they stay: several MiB for every new length, for the rest of the run, held while activations
peak (``benchmarks/README.md``, "Token budget").

Within a step the shapes repeat (every decoder layer has the same ones), so a small cache keeps
every hit that matters: ``bound_kernel_caches`` sets both capacities to ``KERNEL_CACHE_CAPACITY``
through their environment variables, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` and
``LRU_CACHE_CAPACITY``, which the libraries read at their first matmul. A capacity already in the
environment is the user's and is kept. The CLI calls it first thing (``perf/process_tuning``);
scripts of your own can too, before their first matmul.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

# Entries per cache: a step's distinct matmul shapes (a few per micro-batch) with room to spare.
KERNEL_CACHE_CAPACITY = 64
CAPACITY_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY,
                        environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set each cache's capacity to ``capacity`` unless ``environ`` (default: this process's environment)
    already sets it; returns the capacities in force."""
    environ = os.environ if environ is None else environ
    for name in CAPACITY_ENVS:
        environ.setdefault(name, str(capacity))
    return {name: environ[name] for name in CAPACITY_ENVS}
