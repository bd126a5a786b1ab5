"""Length-bucketed decoder forward (``decoder_layout: bucketed``) and the plain padded one.

The default layout, packed pairs (``rm_lightning.pair_packing``), goes further: one decoder
call, and each pair's prompt computed once.

``PairCollator`` pads every row of a batch to its longest row, and a decoder spends the same
compute on a pad position as on a real one. When lengths differ a lot (one 200-token row among
60-token ones), most of the forward and backward goes to padding. ``bucketed_hidden_states``
runs the decoder on groups of rows of similar length, each cut to its own longest row, and
lays the results back into the batch's [rows, width, hidden] layout, so everything downstream
(rewards, losses) sees the same tensor as before. Hidden states at real positions equal the
padded forward's up to float rounding (causal attention never looks at right padding, and the
attention mask hides left padding); pad positions are 0. Token embeddings are looked up once
for the whole batch, because the embedding's backward writes a dense [vocab, hidden] gradient
per call, which would otherwise be paid once per group.

Grouping is a small dynamic program over rows sorted by length: each group costs its padded
tokens plus a fixed ``overhead_tokens`` (the price of one more forward call), so a batch of
similar lengths stays one group and a ragged one is split where it pays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# One more decoder call costs about this many tokens of compute: little on a CPU, where a token
# is expensive; much more on a GPU, where a call is mostly kernel launches.
DEFAULT_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}


def default_overhead_tokens(device: torch.device) -> int:
    return DEFAULT_OVERHEAD_TOKENS.get(torch.device(device).type, 4096)


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


def plan_length_buckets(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Row indices grouped so that padded tokens + ``overhead_tokens`` per group is smallest.

    Searches groups that are contiguous runs of the rows sorted by length, which is enough: in
    any grouping, swapping a long row of a short-topped group with a short row of a long-topped
    one never adds padding, so some optimal grouping is of that form.
    """
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    runs = cheapest_runs(len(order), lambda end: (end - np.arange(end)) * lengths[order[end - 1]] + overhead_tokens)
    return [order[start:end] for start, end in runs]


def padded_hidden_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain forward over the whole padded batch: [rows, width, hidden]."""
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state


def bucketed_hidden_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor],
                           overhead_tokens: int | None = None) -> torch.Tensor:
    """Final hidden states [rows, width, hidden], computed group by group on unpadded widths."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    if overhead_tokens is None:
        overhead_tokens = default_overhead_tokens(mask.device)
    real = mask.bool()
    first = real.int().argmax(dim=1)  # first real column of each row
    last = width - 1 - real.flip(1).int().argmax(dim=1)
    first, last = first.tolist(), last.tolist()
    groups = plan_length_buckets([b - a + 1 for a, b in zip(first, last)], overhead_tokens)
    if len(groups) == 1 and min(first) == 0 and max(last) == width - 1:
        return padded_hidden_states(decoder, batch)
    embeddings = decoder.get_input_embeddings()(batch["input_ids"])  # one lookup, so one dense embedding gradient
    pieces = []
    for group in groups:
        begin, end = min(first[r] for r in group), max(last[r] for r in group) + 1
        index = torch.tensor(group, device=mask.device)
        hidden = decoder(inputs_embeds=embeddings.index_select(0, index)[:, begin:end],
                         attention_mask=mask.index_select(0, index)[:, begin:end],
                         position_ids=batch["position_ids"].index_select(0, index)[:, begin:end],
                         use_cache=False).last_hidden_state
        pieces.append(F.pad(hidden, (0, 0, begin, width - end)))
    grouped_order = torch.tensor([r for group in groups for r in group], device=mask.device)
    return torch.cat(pieces).index_select(0, torch.argsort(grouped_order))
