"""Response log-probabilities without a full-vocabulary log-softmax over every position.

Only hidden states that predict response tokens go through the LM head, each distinct state once,
in chunks; each token's log-prob is ``logit[target] - logsumexp(logits)``. States are the same
where rows hold the same tokens up to there (``prefix_canonical_positions``): the paraphrased
Persona sets repeat each response in two pairs, and chosen and rejected responses often start
alike. While training, every chunk but the last is recomputed in backward (checkpointed), so at
most one chunk's logits are alive at a time: the last chunk's are the ones backward starts with,
so keeping them from forward costs no more memory than recomputing them at once would, and saves
an LM-head forward a step (for Persona batches, which fit one chunk, the only one).
"""

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from rm_lightning.perf.packed_pairs import shared_prefixes


# rows per logsumexp call: its temporaries (logits less their maximum, then their exponentials) for 64 rows
# of the vocabulary stay in cache and are reused, where those of a whole chunk were fresh memory each time
LOG_PARTITION_ROWS = 64


def log_partition(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension of [N, vocabulary] logits, a block of rows at a time: the same
    values and gradients as one call (each row is reduced on its own), faster on a CPU for N in the
    hundreds (``benchmarks/README.md``)."""
    return torch.cat([torch.logsumexp(block, dim=-1) for block in logits.split(LOG_PARTITION_ROWS)])


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, slots: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target token, predicted by the state ``hidden[slot]``."""
    logits = lm_head(hidden).float()
    return logits[slots, targets] - log_partition(logits)[slots]


def prefix_canonical_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[rows, width] flat positions (``row * width + t``) into the batch's grid: at each position, the
    position of the row that first holds the same tokens up to and including t (in the prefix tree
    the packed layout computes, ``perf/packed_pairs.shared_prefixes``), so positions with the same
    prefix, whose hidden states are the same, share one number. Rows are right-padded; without
    ``attention_mask`` every position counts as a token."""
    rows, width = input_ids.shape
    ids = input_ids.cpu()
    lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [width] * rows
    order, skipped, anchor = shared_prefixes([ids[row, :length] for row, length in enumerate(lengths)])
    canonical = torch.arange(rows * width).view(rows, width)
    for row in order:  # an anchor comes before the rows that share its prefix
        if skipped[row]:
            canonical[row, :skipped[row]] = canonical[anchor[row], :skipped[row]]
    return canonical.to(input_ids.device)


def response_predictions(input_ids: torch.Tensor, response_mask: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every scorable response token as (row, canonical position of the state that predicts it, token id),
    row by row in position order. Token t is predicted by the state at t - 1, so a response token at the
    very first position (no prefix) is skipped; states with the same prefix share one canonical position
    (``prefix_canonical_positions``), so each distinct state is one node of the graph."""
    predicts_response = response_mask[:, 1:].bool()
    rows = predicts_response.nonzero()[:, 0]
    targets = input_ids[:, 1:][predicts_response]
    canonical = prefix_canonical_positions(input_ids, attention_mask)[:, :-1][predicts_response]
    return rows, canonical, targets


def response_token_logps(lm_head: torch.nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                         response_mask: torch.Tensor, chunk_size: int = 2048,
                         attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every scorable response token (``response_predictions``) and the row it belongs to.

    Returns (logps [N] float32, rows [N] long) over the N scored response tokens, row by row in
    position order (so that a row's sum adds its tokens in one order, whatever else its batch holds).
    """
    rows, canonical, targets = response_predictions(input_ids, response_mask, attention_mask)
    states, slot = torch.unique(canonical, return_inverse=True)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])[states]
    by_state = torch.argsort(slot, stable=True)  # each chunk's tokens in one run
    slot, targets = slot[by_state], targets[by_state]
    pieces = []
    for begin in range(0, hidden.shape[0], chunk_size):
        end = min(begin + chunk_size, hidden.shape[0])
        first, past = torch.searchsorted(slot, torch.tensor([begin, end], device=slot.device)).tolist()
        arguments = (lm_head, hidden[begin:end], slot[first:past] - begin, targets[first:past])
        if torch.is_grad_enabled() and hidden.requires_grad and end < hidden.shape[0]:
            pieces.append(checkpoint(_chunk_logps, *arguments, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(*arguments))
    if not pieces:
        return hidden_states.new_zeros(0, dtype=torch.float32), rows
    return torch.cat(pieces)[torch.argsort(by_state)], rows


def sum_per_row(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def response_logratios(head: torch.nn.Module, initial_head: torch.nn.Module, hidden_states: torch.Tensor,
                       batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over response tokens of log pi(y_t) - log pi_0(y_t) per row, where pi and pi_0 differ only in
    their output layer (``head`` and the frozen ``initial_head``) over the same hidden states [2B]
    float32.

    Written as (z - z0)[y] - (logsumexp z - logsumexp z0), with one logsumexp per distinct state:
    a token whose output row has not moved then has exactly 0 as its first term, and when chosen
    and rejected responses are predicted from the same state (single-token responses), the
    log-partition's gradient from the two cancels exactly. So rows of tokens no training pair
    contains never move, and their reward differences stay exactly 0 (Theorem 2), not 0 up to
    rounding.
    """
    rows, canonical, targets = response_predictions(batch["input_ids"], batch["response_mask"],
                                                    batch["attention_mask"])
    unique, slot = torch.unique(canonical, return_inverse=True)
    states = hidden_states.reshape(-1, hidden_states.shape[-1])[unique]
    logits = head(states.to(head.weight.dtype)).float()
    with torch.no_grad():
        initial = initial_head(states.to(initial_head.weight.dtype)).float()
    partition = log_partition(logits) - log_partition(initial)
    ratios = (logits[slot, targets] - initial[slot, targets]) - partition[slot]
    return sum_per_row(ratios, rows, hidden_states.shape[0])
