"""A pair batch split into micro-batches of whole pairs, each within a token budget.

Activation memory grows with the tokens a forward runs, so a batch of long pairs can need many
times the memory of an average one. With ``token_budget`` set, ``RewardModule`` runs a batch
whose tokens exceed the budget as several micro-batches, forward and backward in turn, each
loss weighted by its share of the batch's pairs: the accumulated gradients and the logged loss
are those of the whole batch (the mean over all its pairs), and the peak follows the budget,
not the longest batch in the data.

A pair's tokens are what the decoder runs for it: in the packed layout its chosen row plus the
rejected row's suffix after their common prefix (``perf/packed_pairs.py``; pairs that also share a
prefix with each other run fewer, so the plan errs on the safe side, and a whole batch whose
prefix tree fits the budget runs whole); in the padded layout
both rows padded to the micro-batch's longest row. Pairs are packed first-fit in decreasing
order of tokens, so a batch needs few micro-batches. A pair over the budget runs alone.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from rm_lightning.perf.host_memory import release_free_pages
from rm_lightning.perf.layouts import DecoderLayout
from rm_lightning.perf.packed_pairs import shared_prefixes
from rm_lightning.perf.sharding import is_sharded


def pair_tokens(batch: dict[str, torch.Tensor], layout: DecoderLayout = "packed") -> list[int]:
    """Tokens the decoder runs for each pair of a collated batch (rows 0..B-1 chosen, B..2B-1 rejected).

    Packed: chosen length + rejected length - their common prefix. Padded: twice the longer row
    (a padded micro-batch runs every row at its longest row's width).
    """
    mask = batch["attention_mask"].bool()
    pairs = mask.shape[0] // 2
    lengths = mask.sum(dim=1)
    chosen, rejected = lengths[:pairs], lengths[pairs:]
    if layout == "padded":
        return (2 * torch.maximum(chosen, rejected)).tolist()
    ids = batch["input_ids"]
    same = (ids[:pairs] == ids[pairs:]) & mask[:pairs] & mask[pairs:]
    shared = same.int().cumprod(dim=1).sum(dim=1)
    return (chosen + rejected - shared).tolist()


def packed_batch_tokens(batch: dict[str, torch.Tensor], across_pairs: bool = True) -> int:
    """Tokens the packed decoder runs for the whole batch: its prefix tree's nodes, every prefix shared
    by any rows computed once (``perf/packed_pairs.shared_prefixes``, as the packed layout finds them);
    ``across_pairs=False`` shares only within a pair, as the flex attention layout does."""
    mask = batch["attention_mask"].bool().cpu()
    row_ids = torch.split(batch["input_ids"].cpu()[mask], mask.sum(dim=1).tolist())
    _, skipped, _ = shared_prefixes(row_ids, across_pairs)
    return sum(len(tokens) - skip for tokens, skip in zip(row_ids, skipped))


def encoded_pair_tokens(pair, layout: DecoderLayout = "packed") -> int:
    """``pair_tokens`` of one ``EncodedPair``, before collation."""
    chosen, rejected = pair.chosen_ids, pair.rejected_ids
    if layout == "padded":
        return 2 * max(len(chosen), len(rejected))
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    return len(chosen) + len(rejected) - shared


def plan_micro_batches(tokens: list[int], budget: int | None, padded: bool = False) -> list[list[int]]:
    """Pair indices per micro-batch, every micro-batch within ``budget`` tokens unless it is one pair.

    First-fit decreasing: pairs by decreasing tokens, each into the first micro-batch it fits.
    Packed micro-batches cost the sum of their pairs' tokens; padded ones (``padded``) their pair
    count times their first (longest) pair's. ``budget`` None: one micro-batch, the whole batch.
    """
    whole = len(tokens) * max(tokens, default=0) if padded else sum(tokens)
    if budget is None or whole <= budget or len(tokens) <= 1:
        return [list(range(len(tokens)))]
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for index in order:
        for slot, members in enumerate(bins):
            cost = (len(members) + 1) * tokens[members[0]] if padded else used[slot] + tokens[index]
            if cost <= budget:
                members.append(index)
                used[slot] = cost
                break
        else:
            bins.append([index])
            used.append(tokens[index])
    return [sorted(members) for members in bins]


def spread_to_count(plan: list[list[int]], count: int) -> list[list[int]]:
    """``plan`` as exactly ``count`` micro-batches, for processes that must run the same number of
    forwards (FSDP gathers and reduces collectively in each).

    The micro-batch with the most pairs is halved until there are ``count`` of them; a batch with
    fewer pairs than ``count`` gets empty micro-batches (the caller runs those as a zero-weight
    pair, so it still takes part in the collectives).
    """
    plan = [list(members) for members in plan]
    if count < len(plan):
        raise ValueError(f"cannot spread {len(plan)} micro-batches over {count}")
    while len(plan) < count:
        largest = max(range(len(plan)), key=lambda i: len(plan[i]))
        members = plan[largest]
        if len(members) <= 1:
            plan.append([])
            continue
        half = len(members) // 2
        plan[largest:largest + 1] = [members[:half], members[half:]]
    return plan


# keys of a collated pair batch with one entry per row, and which of them also run along the row
ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "response_mask", "last_index", "reference_logps",
            "hidden_states")
WIDTH_KEYS = ("input_ids", "attention_mask", "position_ids", "response_mask", "hidden_states")
# keys with one entry per pair (not per row): a sub-batch keeps the entries of its pairs
PAIR_KEYS = ("margin",)


def select_pairs(batch: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """The sub-batch of the pairs ``indices``: their chosen then rejected rows, cut to their longest row.

    Every key of ``batch`` must be one ``PairCollator`` writes (``ROW_KEYS``, ``PAIR_KEYS``): a key
    this function does not know how to split would silently stay whole.
    """
    unknown = set(batch) - set(ROW_KEYS) - set(PAIR_KEYS)
    if unknown:
        raise ValueError(f"cannot split a pair batch with keys {sorted(unknown)}; known: {ROW_KEYS + PAIR_KEYS}")
    pairs = batch["input_ids"].shape[0] // 2
    index = torch.tensor(list(indices) + [pairs + i for i in indices], dtype=torch.long)
    width = int(batch["attention_mask"][index.to(batch["attention_mask"].device)].sum(dim=1).max())
    selected = {}
    for key, value in batch.items():
        if key in PAIR_KEYS:
            selected[key] = value[index[:len(indices)].to(value.device)]
            continue
        rows = value[index.to(value.device)]
        selected[key] = rows[:, :width] if key in WIDTH_KEYS else rows
    return selected


def plan_for(module, batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """A module's pair indices per micro-batch; one micro-batch of every pair when the batch fits the budget.

    Sharded (FSDP), every process runs as many micro-batches as the one that needs most, since
    each forward and backward gathers and reduces collectively.
    """
    budget = module.token_budget()
    pairs = batch["input_ids"].shape[0] // 2
    if budget is None:
        return [list(range(pairs))]
    layout = module.hparams.decoder_layout
    if layout == "packed" and packed_batch_tokens(batch, module.hparams.packed_attention != "flex") <= budget:
        plan = [list(range(pairs))]  # pairs sharing prefixes with each other (a system prompt, a prompt) fit whole
    else:
        tokens = pair_tokens(batch, layout)
        plan = plan_micro_batches(tokens, budget, padded=layout == "padded")
        over = [tokens[members[0]] for members in plan if len(members) == 1 and tokens[members[0]] > budget]
        if over and not getattr(module, "_warned_pair_over_budget", False):
            # once per module: each over-long pair of every batch had its own line, a flood with a small budget
            module._warned_pair_over_budget = True
            warnings.warn(f"token_budget {budget}: a pair of {max(over)} tokens runs alone, over the budget (pairs "
                          f"longer than the budget each run alone; said once)", stacklevel=2)
    if is_sharded(module) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        count = torch.tensor(len(plan), device=module.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        plan = spread_to_count(plan, int(count))
    return plan

def run_in_micro_batches(module, batch: dict[str, torch.Tensor],
                         backward: Optional[Callable[[torch.Tensor], None]] = None):
    """A module's ``run_pair_loss`` of the whole batch, run as micro-batches within the token budget.

    Each micro-batch's loss (a mean over its pairs) is weighted by its share of the batch's
    pairs, so the weighted sum is the whole batch's mean. Training passes ``backward``: every
    micro-batch but the last is backward-ed at once (its activations freed before the next
    forward), and the returned loss has the whole batch's value with the last micro-batch's
    graph, for Lightning's own backward. Rewards come back detached, in the batch's pair order.
    On a CPU the freed pages of each backward-ed micro-batch go back to the kernel: without that
    the holes its activations leave in the heap add up over a step's micro-batches.
    """
    plan = module.micro_batch_plan(batch)
    if len(plan) == 1 and len(plan[0]) == batch["input_ids"].shape[0] // 2:
        return module.run_pair_loss(batch)
    pairs = batch["input_ids"].shape[0] // 2
    total, last, chosen_parts, rejected_parts = 0.0, None, [], []
    for position, members in enumerate(plan):
        # an empty micro-batch (FSDP: fewer pairs than the other processes' micro-batches) runs
        # one pair at weight 0, so that this process joins the collectives
        loss, chosen, rejected = module.run_pair_loss(select_pairs(batch, members or [0]))
        weighted = loss * (len(members) / pairs)
        if backward is not None and position < len(plan) - 1:
            backward(weighted)
            if weighted.device.type == "cpu":  # its activations' pages back to the kernel (host_memory)
                release_free_pages()
        total = total + weighted.detach()
        last = weighted
        if members:
            chosen_parts.append(chosen.detach())
            rejected_parts.append(rejected.detach())
    order = torch.tensor([i for members in plan for i in members], device=chosen_parts[0].device)
    chosen, rejected = torch.empty_like(torch.cat(chosen_parts)), torch.empty_like(torch.cat(rejected_parts))
    chosen[order], rejected[order] = torch.cat(chosen_parts), torch.cat(rejected_parts)
    return last + (total - last.detach()), chosen, rejected
