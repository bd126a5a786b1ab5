"""Length-bucketed decoder forward: the benchmark's ``ours-bucketed`` variant, not a module option.

A padded batch spends as much compute on a pad position as on a real one. Running the decoder
on groups of rows of similar length, each cut to its own longest row, spends less; packed pairs
(``rm_lightning.perf.packed_pairs``, the default layout) go further, with one call over the
real tokens and each pair's prompt computed once. This layout is kept here, beside its one user,
so that the benchmark can still show what each step of that progression buys.

Grouping is a small dynamic program over rows sorted by length: each group costs its padded
tokens plus a fixed ``overhead_tokens`` (the price of one more forward call). Token embeddings
are looked up once for the whole batch, because the embedding's backward writes a dense
[vocab, hidden] gradient per call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rm_lightning.perf.layouts import padded_hidden_states
from rm_lightning.perf.packed_pairs import cheapest_runs

# One more decoder call costs about this many tokens of compute: little on a CPU, where a token
# is expensive; much more on a GPU, where a call is mostly kernel launches.
DEFAULT_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}


def default_overhead_tokens(device: torch.device) -> int:
    return DEFAULT_OVERHEAD_TOKENS.get(torch.device(device).type, 4096)


def plan_length_buckets(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Row indices grouped so that padded tokens + ``overhead_tokens`` per group is smallest.

    Searches groups that are contiguous runs of the rows sorted by length, which is enough: in
    any grouping, swapping a long row of a short-topped group with a short row of a long-topped
    one never adds padding, so some optimal grouping is of that form.
    """
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    runs = cheapest_runs(len(order), lambda end: (end - np.arange(end)) * lengths[order[end - 1]] + overhead_tokens)
    return [order[start:end] for start, end in runs]


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
