"""Packed-pair attention as one FlexAttention call over the packed row: an opt-in GPU path.

The grouped path (``pair_packing.grouped_segment_attention``, the default) gathers every
segment's queries and keys into padded grids; on a GPU, the gathers' backward (an index-add
per layer) took 15 of 205 ms of a 1B-model step over 128 Persona pairs. FlexAttention runs on
the packed row in place, with a block-sparse mask saying which keys each query sees, so
nothing is gathered, padded, or repeated for grouped-query heads. A packed position sees its
own run (its chosen row, or its rejected suffix) up to itself, and, in a rejected suffix,
the prefix it shares with its chosen row.

It is not the default because it was not faster overall. On an H100, a random-weight 1B
Llama over 128 Persona pairs in bf16, step seconds grouped / flex:

- EX-RM: 0.23 / 0.25 eager, 0.17 / 0.19 with ``compile_layers``;
- IM-RM: 0.24 / 0.26 eager, 0.28 / 0.19 compiled.

Building the block mask every batch and the 128-token blocks, which are half empty for these
short segments, eat the saving. Set ``RM_LIGHTNING_PACKED_ATTENTION=flex`` to use it
(``grouped`` is the default, ``auto`` the same). It needs CUDA for training, because
FlexAttention has no backward on a CPU.
"""

from __future__ import annotations

import os

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ATTENTION_ENV = "RM_LIGHTNING_PACKED_ATTENTION"
KINDS = ("auto", "flex", "grouped")
_compiled_flex = None


def packed_attention_kind() -> str:
    """``flex`` or ``grouped``, as ``RM_LIGHTNING_PACKED_ATTENTION`` asks (``auto``, the default, is grouped)."""
    kind = os.environ.get(ATTENTION_ENV, "auto")
    if kind not in KINDS:
        raise ValueError(f"{ATTENTION_ENV}={kind!r}: expected one of {KINDS}")
    return "grouped" if kind == "auto" else kind


def packed_block_mask(segments: list[tuple[list[int], list[int]]], num_tokens: int, device) -> BlockMask:
    """The block mask of a packed row from its attention segments (``pair_packing.lay_out_pairs``).

    A segment's queries are one contiguous run of packed positions, and its keys are a
    contiguous shared prefix (empty for a chosen row) followed by those same queries.
    """
    run_start = torch.zeros(num_tokens, dtype=torch.long)
    prefix_start = torch.zeros(num_tokens, dtype=torch.long)
    prefix_end = torch.zeros(num_tokens, dtype=torch.long)
    for queries, keys in segments:
        first, count, shared = queries[0], len(queries), len(keys) - len(queries)
        if queries[-1] - first + 1 != count or keys[shared:] != queries:
            raise ValueError("packed attention: a segment's queries must be a contiguous run ending its keys")
        run_start[first:first + count] = first
        prefix_start[first:first + count] = keys[0]
        prefix_end[first:first + count] = keys[0] + shared
    run_start, prefix_start, prefix_end = (t.to(device) for t in (run_start, prefix_start, prefix_end))

    def sees(batch, head, query, key):
        own_run = (key >= run_start[query]) & (key <= query)
        return own_run | ((key >= prefix_start[query]) & (key < prefix_end[query]))

    return create_block_mask(sees, None, None, num_tokens, num_tokens, device=device)


def flex_packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                          scaling: float | None) -> torch.Tensor:
    """[1, heads, N, dim] packed queries (fewer key/value heads allowed) -> [1, N, heads, dim]."""
    global _compiled_flex
    if _compiled_flex is None:  # FlexAttention is only fast compiled; dynamic, as N changes every batch
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    dtype = query.dtype
    key, value = key.to(dtype), value.to(dtype)
    out = _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling,
                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()
