"""Packed pair forward: one decoder call over a batch's real tokens, every common prefix run once.

A padded batch spends compute on pad positions, and its rows repeat what they share: a pair's
chosen and rejected rows the same prompt, and the pairs of a batch the same system prompt and
question template (on Persona half of a training batch's real tokens), or the same prompt when
an eval set holds several pairs per prompt. Here the real tokens of the whole batch are laid out
in one row as a prefix tree: each row computes only what follows the longest prefix it shares
with another row (``lay_out_pairs``). Every query attends within its own row: to the shared
prefix, wherever it was computed, and to its own tokens before it. Position ids continue the
prefix, so each token sees exactly what it would see in its own padded row, and hidden states
equal the padded forward's up to float rounding. ``unpack`` lays them back into the batch's
[rows, width, hidden] layout (pad positions 0), so rewards and losses downstream do not change.

Attention is a registered Hugging Face attention function (``rm_packed_<base>``). When a
decoder call carries ``packed_pairs`` it gathers each segment's queries and keys into small
padded grids, one per group of similar-sized segments, and runs one masked attention per grid;
otherwise it hands over to the model's own implementation, so the same model still runs padded
batches (and a gradient-checkpointed layer recomputes with the same function and layout). Only
the attention grids are padded: the matmuls, nearly all of the FLOPs, run on the packed row. On
a GPU, FlexAttention can run the packed row without grids (``rm_lightning.perf.flex_attention``,
the ``packed_attention: flex`` option; its block mask takes one shared run per row, so there rows
share only within their pair). The layout is planned on the CPU in a few vectorized steps,
since on a GPU hundreds of small device operations per batch kept the GPU waiting.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rm_lightning.perf.flex_attention import flex_packed_attention, packed_block_mask

PACKED_PREFIX = "rm_packed_"
# How packed attention runs: padded grids per group of similar segments, or one FlexAttention call
# over the packed row (CUDA only for training: FlexAttention has no backward on a CPU).
AttentionKind = Literal["grouped", "flex"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)


@dataclass
class AttentionGroup:
    """Segments whose attention runs in one call, padded to the group's longest queries and keys (on a CPU
    the keys to the next multiple of ``CPU_KEY_MULTIPLE``, the same for every segment of the group)."""

    query_index: torch.Tensor  # [segments, queries]: packed position of each query (0 at padding)
    key_index: torch.Tensor  # [segments, keys]: packed position of each key (0 at padding)
    mask: torch.Tensor  # [segments, 1, queries, keys] bool: which keys each query sees
    # sliding window -> ``mask`` without keys that many positions or more before their query
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_within(self, window: int | None) -> torch.Tensor:
        """The mask of a layer with this sliding window (None: global attention)."""
        if window is None:
            return self.mask
        if window not in self.window_masks:
            raise ValueError(f"packed pairs: no attention mask for a sliding window of {window} tokens (the "
                             "layout was planned for other windows); use decoder_layout: padded")
        return self.window_masks[window]


@dataclass
class PackedPairs:
    """Where every real token of a pair batch (chosen rows 0..B-1, rejected B..2B-1) sits in one packed row.

    Attention runs over "segments", each the queries of one row (the tokens it computes itself)
    with the keys they may see (its shared prefix and those tokens): gathered from the packed row into padded grids, one per group of segments of
    similar size (``plan_attention_groups``), or, opted into on a GPU, in one FlexAttention
    call over the packed row with a block mask (``rm_lightning.perf.flex_attention``).
    """

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    gather_index: torch.Tensor  # [rows, width]: packed position of each batch position; N at padding
    attention_groups: list[AttentionGroup]  # empty when block_mask is set
    # [N]: the (group, segment, query) slot, flattened, of each packed position's output; None with block_mask
    output_index: torch.Tensor | None
    block_mask: BlockMask | None = None  # FlexAttention's mask, instead of the grouped grids
    window_block_masks: dict[int, BlockMask] = field(default_factory=dict)  # the same per sliding window

    def block_mask_within(self, window: int | None) -> BlockMask:
        """FlexAttention's mask for a layer with this sliding window (None: global attention)."""
        if window is None:
            return self.block_mask
        if window not in self.window_block_masks:
            raise ValueError(f"packed pairs: no block mask for a sliding window of {window} tokens; "
                             "use decoder_layout: padded")
        return self.window_block_masks[window]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def shared_tokens(self) -> int:
        """Real tokens of the batch's rows that another row computes for them (their shared prefixes)."""
        return int((self.gather_index < self.num_tokens).sum()) - self.num_tokens

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], attention: AttentionKind = "grouped",
                   sliding_windows: tuple[int, ...] = ()) -> "PackedPairs":
        """The layout of a collated batch, placed on the batch's device, with masks for global attention
        and for each of ``sliding_windows`` (a query sees a key only when their positions differ by less).

        Worked out on the CPU, whatever the batch's device: it is hundreds of small steps (a
        prefix comparison per pair, index lists per segment), each of which would wait for the
        GPU there; one copy back and a few copies out keep the GPU's queue full.
        """
        device = batch["input_ids"].device
        mask = batch["attention_mask"].bool().cpu()
        rows, width = mask.shape
        if rows % 2:
            raise ValueError(f"a pair batch has chosen then rejected rows, so an even row count; got {rows}")
        lengths = mask.sum(dim=1).tolist()
        row_ids = torch.split(batch["input_ids"].cpu()[mask], lengths)
        row_positions = torch.split(batch["position_ids"].cpu()[mask], lengths)
        skipped, row_index, segments = lay_out_pairs(row_ids, across_pairs=attention != "flex")
        ids = torch.cat([tokens[skip:] for tokens, skip in zip(row_ids, skipped)])
        positions = torch.cat([row[skip:] for row, skip in zip(row_positions, skipped)])
        gather_index = torch.full((rows, width), len(ids), dtype=torch.long)
        gather_index[mask] = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(row_index), dtype=np.int64,
                                                          count=sum(lengths)))
        packed = ids[None].to(device), positions[None].to(device), gather_index.to(device)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"packed attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        windows = sorted(set(sliding_windows))
        if attention == "flex":
            full = packed_block_mask(segments, len(ids), device)
            # a window no sequence reaches the end of masks nothing: the global mask serves
            by_window = {w: full if _window_covers(positions, w) else
                         packed_block_mask(segments, len(ids), device, positions, w) for w in windows}
            return cls(*packed, [], None, full, by_window)
        groups, output_index = segment_tensors(segments, positions, device, windows)
        return cls(*packed, groups, output_index.to(device))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, N, hidden] packed states -> [rows, width, hidden], zeros at pad positions.

        Indexed in one step so that the result is not a view: FSDP2 warns when its root module
        returns one, since an in-place op on a view would skip its pre-backward hook.
        """
        states = torch.cat([packed[0], packed.new_zeros(1, packed.shape[-1])])
        return states[self.gather_index]


def lay_out_pairs(row_ids: list[torch.Tensor], across_pairs: bool = True):
    """The packed order of a pair batch's rows, as plain lists: every common prefix computed once.

    Rows are a prefix tree: each row reuses the longest prefix it shares with any other row of
    the batch (its chosen row's prompt, but also the system prompt and question every pair of a
    batch may start with, or the prompt of another pair on the same prompt) and computes only
    the rest. In lexicographic order of token ids, the row sharing the longest prefix with a row
    is its neighbour, so each row reuses its predecessor's prefix; the tokens computed are the
    nodes of the batch's prefix tree. The packed row holds every row's own tokens in batch order.
    Returns per row the tokens it skips and the packed positions of all its tokens (the shared
    ones where another row computes them), and the attention segments as (query positions, key
    positions): a row's own tokens, seeing its whole row.

    ``across_pairs=False`` shares only within a pair (a rejected row reuses its chosen row's
    prefix), so that a row's shared keys are one contiguous run, as FlexAttention's block mask
    (``perf/flex_attention.py``) takes them.
    """
    order, skipped, anchor = shared_prefixes(row_ids, across_pairs)
    starts, offset = [], 0
    for tokens, skip in zip(row_ids, skipped):
        starts.append(offset)
        offset += len(tokens) - skip
    row_index: list[list[int]] = [[] for _ in row_ids]
    for row in order:  # an anchor comes first in this order, so its positions are known
        own = list(range(starts[row], starts[row] + len(row_ids[row]) - skipped[row]))
        row_index[row] = (row_index[anchor[row]][:skipped[row]] if skipped[row] else []) + own
    segments = [(row_index[row][skip:], row_index[row]) for row, skip in enumerate(skipped)]
    return skipped, row_index, [(queries, keys) for queries, keys in segments if queries]


def shared_prefixes(row_ids: list[torch.Tensor], across_pairs: bool = True):
    """(an order in which every row comes after its anchor, the tokens each row skips, its anchor row or None):
    ``lay_out_pairs``' prefix tree, before any positions are laid out."""
    pairs = len(row_ids) // 2
    if across_pairs:
        as_lists = [tokens.tolist() for tokens in row_ids]
        order = sorted(range(len(row_ids)), key=as_lists.__getitem__)
        anchors = list(zip(order, order[1:]))  # (anchor, row): the anchor is ordered first
    else:
        order = list(range(len(row_ids)))
        anchors = [(p, pairs + p) for p in range(pairs)]
    skipped, anchor = [0] * len(row_ids), [None] * len(row_ids)
    for before, row in anchors:
        skipped[row] = common_prefix_length(row_ids[row], row_ids[before])
        anchor[row] = before
    return order, skipped, anchor


def cheapest_runs(count: int, run_costs: Callable[[int], np.ndarray]) -> list[tuple[int, int]]:
    """Split ``0..count`` into contiguous runs ``[start, end)`` whose summed cost is smallest.

    ``run_costs(end)[start]`` is the cost of the run ``[start, end)``, for every ``start < end``;
    it is called for ``end = 1, 2, ..., count`` in that order, so it may carry state from one
    ``end`` to the next. Vectorized over starts: a GPU-sized batch has hundreds of items, and a
    Python double loop over them took longer than the training step it plans.
    """
    best = np.zeros(count + 1)  # best[end]: cost of covering the first `end` items
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        totals = best[:end] + run_costs(end)
        cut[end] = int(totals.argmin())  # the first of equal costs
        best[end] = totals[cut[end]]
    runs, end = [], count
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


# One more attention call costs about as much as this many (query, key) cells of a group's grid.
ATTENTION_CALL_CELLS = {"cpu": 4096, "cuda": 2 ** 18}
# On a CPU each segment's keys are padded to the next multiple of this, and a group holds segments of one padded
# length: torch's SDPA kernel there rounds a row's softmax by the length it is padded to, which must then not
# depend on the other segments of a batch (``token_major_attention``). A larger multiple: fewer, more padded calls.
CPU_KEY_MULTIPLE = 16


def plan_attention_groups(sizes: list[tuple[int, int]], call_cells: int,
                          key_multiple: int | None = None) -> list[list[int]]:
    """Segment indices grouped so that grid cells (segments x longest queries x longest keys) plus
    ``call_cells`` per group are fewest, over groups that are runs of the segments sorted by size.

    With ``key_multiple``, every segment's key count is rounded up to a multiple of it and a group holds
    segments of one rounded count only: each segment's keys are then padded to a length of its own,
    whatever segments share its batch (``padded_key_length``).
    """
    def rounded_keys(i: int) -> int:
        return padded_key_length(sizes[i][1], key_multiple)

    # by size; by rounded keys first where a group must keep to one
    order = sorted(range(len(sizes)),
                   key=lambda i: sizes[i] if key_multiple is None else (rounded_keys(i), sizes[i][0]))
    queries = np.array([sizes[i][0] for i in order], dtype=np.float64)
    keys = np.array([rounded_keys(i) for i in order], dtype=np.float64)
    longest_keys = np.zeros(0)  # for the current end: the longest keys of order[start:end], for every start

    def grid_cells(end: int) -> np.ndarray:
        nonlocal longest_keys
        longest_keys = np.maximum(np.append(longest_keys, 0.0), keys[end - 1])
        cells = (end - np.arange(end)) * queries[end - 1] * longest_keys + call_cells
        if key_multiple is not None:
            cells[keys[:end] != keys[end - 1]] = np.inf
        return cells

    return [order[start:end] for start, end in cheapest_runs(len(order), grid_cells)]


def padded_key_length(keys: int, key_multiple: int | None) -> int:
    """The keys of a segment once padded: ``keys`` rounded up to a multiple of ``key_multiple`` (None: as is)."""
    return keys if key_multiple is None else -(-keys // key_multiple) * key_multiple


def _window_covers(positions: torch.Tensor, window: int) -> bool:
    """Whether a sliding window of ``window`` tokens hides no key (no sequence is longer than it)."""
    return len(positions) == 0 or int(positions.max()) < window


def segment_tensors(segments: list[tuple[list[int], list[int]]], positions: torch.Tensor,
                    device: torch.device | str = "cpu", sliding_windows: list[int] | tuple[int, ...] = ()):
    """(attention groups on ``device``, output_index on the CPU) of ``PackedPairs`` for the segments,
    from the packed row's ``positions`` on the CPU, with a mask per sliding window.

    A sliding-window layer lets a query see a key when ``position(query) - position(key) < window``,
    the convention of Hugging Face's ``sliding_window_overlay`` (a window of w: the query and the w - 1
    keys before it). Positions are those within the sequence, not packed offsets, so a key computed
    once for several rows is as far from each row's query as in that row's own padded forward.
    """
    device = torch.device(device)
    call_cells = ATTENTION_CALL_CELLS.get(device.type, ATTENTION_CALL_CELLS["cuda"])
    key_multiple = CPU_KEY_MULTIPLE if device.type == "cpu" else None
    plan = plan_attention_groups([(len(q), len(k)) for q, k in segments], call_cells, key_multiple)
    groups, output_index, slots = [], torch.empty(len(positions), dtype=torch.long), 0
    for members in plan:
        query_index, query_real = _padded_index([segments[i][0] for i in members])
        key_index, key_real = _padded_index([segments[i][1] for i in members], key_multiple)
        # causal within a segment: a key is seen when its position is not after the query's
        query_positions, key_positions = positions[query_index][:, :, None], positions[key_index][:, None, :]
        sees = (key_positions <= query_positions) & key_real[:, None, :]
        sees[:, :, 0] |= ~query_real  # a padding query sees one key, so no row of the softmax is empty
        mask = sees[:, None].to(device)
        window_masks = {}
        for window in sliding_windows:
            if _window_covers(positions, window):  # then the global mask serves
                window_masks[window] = mask
            else:
                near = sees & ((query_positions - key_positions < window) | ~query_real[:, :, None])
                window_masks[window] = near[:, None].to(device)
        group_slots = slots + torch.arange(query_index.numel()).view_as(query_index)
        output_index[query_index[query_real]] = group_slots[query_real]
        groups.append(AttentionGroup(query_index.to(device), key_index.to(device), mask, window_masks))
        slots += query_index.numel()
    return groups, output_index


def _padded_index(lists: list[list[int]], multiple: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists as a [len(lists), longest] tensor padded with 0, and where it is real; the width rounded up
    to a multiple of ``multiple`` when given."""
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    longest = padded_key_length(int(lengths.max()), multiple) if len(lists) else 0
    real = np.arange(longest) < lengths[:, None]
    index = np.zeros((len(lists), longest), dtype=np.int64)
    index[real] = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(index), torch.from_numpy(real)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if len(differs) else n


def _gather_segments(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[1, heads, N, dim] packed -> [segments, heads, slots, dim]."""
    return states[0].index_select(1, index.reshape(-1)).unflatten(1, index.shape).transpose(0, 1)


def packed_pair_attention(base: str):
    """The attention function ``rm_packed_<base>``: grouped segment attention on packed calls, ``base`` otherwise."""

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  packed_pairs: PackedPairs | None = None, sliding_window: int | None = None, **kwargs):
        if packed_pairs is None:
            if sliding_window is not None:
                kwargs["sliding_window"] = sliding_window
            return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        if kwargs.get("softcap") is not None:
            raise ValueError("packed pairs: attention logit soft-capping is not supported; use decoder_layout: padded")
        if packed_pairs.block_mask is not None:
            if dropout:
                raise ValueError(f"FlexAttention has no attention dropout ({dropout}); use packed_attention: grouped")
            block_mask = packed_pairs.block_mask_within(sliding_window)
            return flex_packed_attention(query, key, value, block_mask, scaling), None
        repeats = getattr(module, "num_key_value_groups", 1)
        return grouped_segment_attention(query, key, value, packed_pairs, repeats, scaling, dropout,
                                         sliding_window), None

    return attention


@torch.compiler.disable
def grouped_segment_attention(query, key, value, packed_pairs: PackedPairs, repeats: int, scaling: float | None,
                              dropout: float, sliding_window: int | None = None) -> torch.Tensor:
    """[1, heads, N, dim] packed queries, keys and values -> [1, N, heads, dim] attention outputs
    (keys within ``sliding_window`` positions of their query only, for a sliding-window layer).

    On a CPU ``token_major_attention``, elsewhere ``per_head_attention``. Never compiled
    (``compile_layers`` compiles the layers around it): the number of attention groups and their
    sizes change from batch to batch, and a compiled graph would be specialized to them,
    recompiling the layer for almost every batch of a varied dataset.
    """
    if query.device.type == "cpu":
        return token_major_attention(query, key, value, packed_pairs, repeats, scaling, dropout, sliding_window)
    return per_head_attention(query, key, value, packed_pairs, repeats, scaling, dropout, sliding_window)


def per_head_attention(query, key, value, packed_pairs: PackedPairs, repeats: int, scaling: float | None,
                       dropout: float, sliding_window: int | None = None) -> torch.Tensor:
    """``grouped_segment_attention`` on a GPU: per group, each head's segments gathered into grids, the
    ``repeats`` query heads that share a key/value head stacked (``stack_heads_per_key``), one SDPA call."""
    outputs = []
    for group in packed_pairs.attention_groups:
        queries = _gather_segments(query, group.query_index)  # [segments, heads, queries, dim]
        stacked, mask = stack_heads_per_key(queries, group.mask_within(sliding_window), repeats)
        out = F.scaled_dot_product_attention(stacked, _gather_segments(key, group.key_index),
                                             _gather_segments(value, group.key_index), attn_mask=mask,
                                             dropout_p=dropout, scale=scaling)
        outputs.append(out.reshape(queries.shape).transpose(0, 1).flatten(1, 2))
    out = torch.cat(outputs, dim=1).index_select(1, packed_pairs.output_index)  # [heads, N, dim]
    return out.transpose(0, 1).unsqueeze(0).contiguous()


def token_major_attention(query, key, value, packed_pairs: PackedPairs, repeats: int, scaling: float | None,
                          dropout: float, sliding_window: int | None = None) -> torch.Tensor:
    """``grouped_segment_attention`` on a CPU: torch's fp32 SDPA kernel on gathers of whole tokens.

    A decoder's projections leave queries, keys and values token-major in memory ([N, heads, dim]
    under the [1, heads, N, dim] view), so each group's segments are gathered as rows of all heads
    at once (the queries then stacked per key/value head, ``stack_heads_per_key``), and the outputs
    laid back token-major in one copy: not a copy per transpose and layout change around every call,
    as gathering each head's grids took.

    The kernel's blocked softmax rounds a row by the number of keys it is padded to, so the groups
    pad every segment's keys to a length of its own (``CPU_KEY_MULTIPLE``): a row's attention is then
    the same to the bit whichever rows share its batch or micro-batch (the kernel was withdrawn once
    for breaking that: ``benchmarks/README.md``). fp32: the CPU kernel runs bf16 at under half that speed.
    """
    tokens, heads, dim, key_heads = query.shape[2], query.shape[1], query.shape[3], key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    # autocast off: it would cast the fp32 states back to bf16
    with torch.autocast("cpu", enabled=False), math_kernel_under_forward_ad(query, key, value):
        by_token = [states[0].transpose(0, 1).float().reshape(tokens, -1) for states in (query, key, value)]
        outputs = []
        for group in packed_pairs.attention_groups:
            segments, queries = group.query_index.shape
            keys = group.key_index.shape[1]
            per_head = by_token[0].index_select(0, group.query_index.reshape(-1)).view(segments, queries, heads, dim)
            q, mask = stack_heads_per_key(per_head.transpose(1, 2), group.mask_within(sliding_window), repeats)
            k, v = (states.index_select(0, group.key_index.reshape(-1)).view(segments, keys, key_heads, dim)
                    .transpose(1, 2) for states in by_token[1:])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
            outputs.append(out.reshape(segments, heads, queries, dim).transpose(1, 2).reshape(segments * queries, -1))
        out = torch.cat(outputs).index_select(0, packed_pairs.output_index)
    return out.to(query.dtype).view(1, tokens, heads, dim)


def math_kernel_under_forward_ad(*tensors: torch.Tensor):
    """SDPA's math kernel where any of ``tensors`` carries a forward-mode tangent (the paper's §4 tools
    predict a step's effect with ``jvp``): torch's CPU flash kernel has no forward derivative."""
    if any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def stack_heads_per_key(queries: torch.Tensor, mask: torch.Tensor, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention without a copy of the keys and values per query head: the ``repeats`` query
    heads that share a key/value head (heads ``j * repeats`` to ``(j + 1) * repeats - 1`` share head ``j``,
    as ``repeat_interleave`` pairs them) stacked along the queries, [segments, heads, Q, dim] ->
    [segments, kv heads, repeats * Q, dim], with the [segments, 1, Q, keys] mask repeated to match."""
    if repeats == 1:
        return queries, mask
    segments, heads, length, dim = queries.shape
    return queries.reshape(segments, heads // repeats, repeats * length, dim), mask.repeat(1, 1, repeats, 1)


def enable_packed_attention(config) -> None:
    """Route ``config``'s attention through ``rm_packed_<its implementation>`` (idempotent).

    Unpacked calls go on to the original implementation with its own mask, so nothing else changes.
    """
    base = config._attn_implementation or "sdpa"
    if base.startswith(PACKED_PREFIX):
        return
    if base not in ALL_ATTENTION_FUNCTIONS or base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"packed pairs: the backbone's attention implementation {base!r} is not a registered "
                         "Hugging Face one (e.g. 'sdpa'); load it with attn_implementation='sdpa' or use "
                         "decoder_layout: padded")
    name = PACKED_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, packed_pair_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = name


def sliding_windows(config) -> tuple[int, ...]:
    """The sliding windows a decoder's layers may pass its attention: a model with sliding-window layers
    (Gemma 3's five of every six, Mistral's all) names its window ``config.sliding_window``."""
    window = getattr(config, "sliding_window", None)
    return (int(window),) if isinstance(window, int) and window > 0 else ()


def packing_unsupported(config) -> str | None:
    """Why a decoder's attention cannot run packed (then the padded layout runs), or None when it can."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (attn_logit_softcapping)"
    return None


def packed_hidden_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor],
                         attention: AttentionKind = "grouped") -> torch.Tensor:
    """Final hidden states [rows, width, hidden] from one packed decoder call."""
    enable_packed_attention(decoder.config)
    packed = PackedPairs.from_batch(batch, attention=attention, sliding_windows=sliding_windows(decoder.config))
    hidden = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                     packed_pairs=packed).last_hidden_state
    return packed.unpack(hidden)
