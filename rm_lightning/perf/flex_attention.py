"""Packed-pair attention as one FlexAttention call over the packed row (``packed_attention: flex``).

The default, grouped attention (``packed_pairs.grouped_segment_attention``) gathers every
segment's queries and keys into padded grids, and its backward scatters them back. FlexAttention
runs on the packed row in place, with a block-sparse mask saying which keys each query sees, so
nothing is gathered, padded, or repeated for grouped-query heads. A packed position sees its own
run (its chosen row, or its rejected suffix) up to itself, and, in a rejected suffix, the prefix
it shares with its chosen row.

It is opt-in because it was not faster overall where it was measured (``benchmarks/README.md``):
building the block mask every batch, and 128-token blocks half empty for short segments, eat
the saving. It needs CUDA for training, because FlexAttention has no backward on a CPU.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from rm_lightning.errors import SettingError

_compiled_flex = None


def check_flex_training(model: dict, trainer: dict) -> None:
    """``fit`` with ``packed_attention: flex`` on a CPU: one line before the model loads, not torch's
    ``NotImplementedError`` at the first backward, after the tokenization and reference pass. A frozen
    decoder (``trainable: output_layer``) runs no backward through attention, so it may."""
    if model.get("packed_attention") != "flex" or model.get("trainable", "all") == "output_layer":
        return
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise SettingError("model.init_args.packed_attention: flex trains on CUDA only (FlexAttention has no "
                           "backward on a CPU); use grouped (the default) to train here, flex to validate, "
                           "test or predict")


def packed_block_mask(segments: list[tuple[list[int], list[int]]], num_tokens: int, device,
                      positions: torch.Tensor | None = None, sliding_window: int | None = None) -> BlockMask:
    """The block mask of a packed row from its attention segments (``packed_pairs.lay_out_pairs``).

    A segment's queries are one contiguous run of packed positions, and its keys are a
    contiguous shared prefix (empty for a chosen row) followed by those same queries. With a
    ``sliding_window``, a query also sees only keys whose ``positions`` (within the sequence, [N])
    are less than the window before its own, as Hugging Face's sliding-window layers do.
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

    mask_mod = sees
    if sliding_window is not None:
        position = positions.to(device)

        def mask_mod(batch, head, query, key):
            return sees(batch, head, query, key) & (position[query] - position[key] < sliding_window)

    return create_block_mask(mask_mod, None, None, num_tokens, num_tokens, device=device)


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
