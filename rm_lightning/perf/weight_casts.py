"""Autocast's low-precision weight copies kept from one forward to the next while the weights cannot change.

Under ``bf16-mixed`` every linear layer runs on a bf16 copy of its fp32 weight. Autocast caches
those copies, but only until the outermost autocast block ends, and Lightning (like the reference
pass) opens one block per batch: every evaluation batch cast the whole model again, a pass over
all of its weights whatever the batch's size. While a loop only evaluates, the weights stay as
they are, so holding autocast's nesting level above zero across the loop lets every batch after
the first reuse the first batch's copies; they are dropped when the loop ends, before any
optimizer step.

Autocast caches only weights that require gradients (a frozen reference model is cast per batch
as before), and only where its cache is on: Lightning's mixed-precision plugin opens every
autocast block with ``cache_enabled=False``, so a loop's forwards run inside ``reusing_casts``,
which turns it back on (training does the same unless activation checkpointing is on,
``perf/checkpointing.autocast_weight_cache``) and, in the inference mode of Lightning's validate,
test and predict loops, where autocast caches nothing, runs them under ``no_grad`` instead.
Sharded (FSDP2) modules are left alone: the copies of gathered weights would keep a whole
unsharded bf16 model on every process for the length of the loop.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from rm_lightning.perf.checkpointing import autocast_weight_cache
from rm_lightning.perf.sharding import is_sharded


class SharedWeightCasts:
    """Opened by a loop's start hook and closed by its end hook (``open``/``close``, both idempotent)."""

    def __init__(self) -> None:
        self._open = False

    def open(self) -> None:
        if not self._open:
            torch.autocast_increment_nesting()
            self._open = True

    def close(self) -> None:
        """Back to the nesting level found at ``open``; at level zero the cached copies are freed."""
        if self._open:
            self._open = False
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()


@contextmanager
def shared_weight_casts(enabled: bool = True) -> Iterator[None]:
    """One cast of each weight for every forward in the block (the weights must not change inside it)."""
    casts = SharedWeightCasts()
    if enabled:
        casts.open()
    try:
        yield
    finally:
        casts.close()


@contextmanager
def reusing_casts(module: nn.Module) -> Iterator[None]:
    """Autocast's weight cache on for a forward of ``module`` inside a precision plugin's context.

    Without it the cast copies of ``shared_weight_casts`` are never kept: Lightning's plugin turns
    the cache off, and every evaluation batch cast the whole model again. Off for sharded modules.
    """
    with autocast_weight_cache(enabled=not is_sharded(module)):
        yield


@contextmanager
def evaluation_forward(module: nn.Module) -> Iterator[None]:
    """A forward of a pass that only evaluates: in ``module``'s trainer's precision (none without a trainer),
    reusing the pass's weight casts. Entered once per forward: a precision plugin's contexts are single-use."""
    trainer = getattr(module, "_trainer", None)
    with trainer.precision_plugin.forward_context() if trainer is not None else nullcontext(), reusing_casts(module):
        yield
