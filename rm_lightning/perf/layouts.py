"""How a pair batch goes through the decoder: ``packed`` (the default) or ``padded``.

Both give the same hidden states at real positions up to float rounding; they differ in what
they compute. ``padded`` is the plain forward over the batch padded to its longest row, the
reference the packed layout is tested against, and the fallback for backbones whose attention
cannot be packed.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from rm_lightning.perf.packed_pairs import AttentionKind, packed_hidden_states

DecoderLayout = Literal["packed", "padded"]
DECODER_LAYOUTS: tuple[str, ...] = get_args(DecoderLayout)


def padded_hidden_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain forward over the whole padded batch: [rows, width, hidden]."""
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state


def decoder_hidden_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor], layout: DecoderLayout = "packed",
                          attention: AttentionKind = "grouped") -> torch.Tensor:
    """Final hidden states [rows, width, hidden] of ``decoder`` on a pair batch, in the given layout."""
    if layout == "packed":
        return packed_hidden_states(decoder, batch, attention=attention)
    if layout == "padded":
        return padded_hidden_states(decoder, batch)
    raise ValueError(f"decoder_layout must be one of {DECODER_LAYOUTS}, got {layout!r}")
