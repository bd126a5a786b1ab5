"""Activation checkpointing: recompute decoder layers in backward instead of keeping their activations."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer, under the name this transformers version uses.

    transformers 5 renamed ``gradient_checkpointing_enable`` (now a deprecated alias that warns)
    to ``activation_checkpointing_enable``; the project supports versions from before the rename.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def autocast_weight_cache(enabled: bool) -> Iterator[None]:
    """Turn autocast's cache of low-precision weight copies on or off for the block.

    The cache keeps the bf16 copy of every weight a forward has used until the autocast block
    ends, so that a weight used twice is cast once. With activation checkpointing nothing else
    keeps those copies, so the cache alone would hold a second, bf16 model through the forward,
    while a packed forward uses each decoder weight once. Without checkpointing the cached
    copies are the very tensors backward saves, so the cache costs nothing. Checkpoint
    recomputation in backward restores the setting it finds here.

    Autocast caches nothing under inference mode, which Lightning's validate, test and predict
    loops run in, so there the cache also takes the block out of inference mode (still without
    gradients): the forwards of such a loop reuse one cast of the weights as fit's validation does.
    """
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(enabled)
    leave_inference = enabled and torch.is_inference_mode_enabled()
    outside_inference_mode = torch.inference_mode(False) if leave_inference else nullcontext()
    without_gradients = torch.no_grad() if leave_inference else nullcontext()
    try:
        with outside_inference_mode, without_gradients:
            yield
    finally:
        torch.set_autocast_cache_enabled(previous)
