"""Response log-probabilities without a full-vocabulary log-softmax over every position.

Only hidden states that predict response tokens go through the LM head, in chunks; each
chunk's log-prob is ``logit[target] - logsumexp(logits)``. While training, every chunk but the
last is recomputed in backward (checkpointed), so at most one chunk's logits are alive at a time:
the last chunk's are the ones backward starts with, so keeping them from forward costs no more
memory than recomputing them at once would, and saves an LM-head forward a step (for Persona
batches, which fit one chunk, the only one).
"""

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def response_token_logps(lm_head: torch.nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                         response_mask: torch.Tensor, chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every response token and the row it belongs to.

    Token t is predicted by the hidden state at t - 1, so a response token at the very first
    position (no prefix) cannot be scored and is skipped.
    Returns (logps [N] float32, rows [N] long) over the N scored response tokens.
    """
    predicts_response = response_mask[:, 1:]
    hidden = hidden_states[:, :-1][predicts_response]
    targets = input_ids[:, 1:][predicts_response]
    rows = predicts_response.nonzero()[:, 0]
    pieces = []
    for begin in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[begin:begin + chunk_size], targets[begin:begin + chunk_size]
        last = begin + chunk_size >= hidden.shape[0]
        if torch.is_grad_enabled() and h.requires_grad and not last:
            pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, h, t))
    logps = torch.cat(pieces) if pieces else hidden_states.new_zeros(0, dtype=torch.float32)
    return logps, rows


def sum_per_row(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def predicting_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every response token of a pair batch as (row, position of the state that predicts it, token id).

    Rows are chosen 0..B-1 then rejected B..2B-1. Returns (rows, canonical positions, targets);
    a canonical position is ``row * width + position``, where a rejected row's position inside
    the prefix it shares with its chosen row is written as the chosen row's: the two hidden
    states are the same state, and one state should be one node of the graph (see
    ``response_logratios``).
    """
    pairs, width = input_ids.shape[0] // 2, input_ids.shape[1]
    same = (input_ids[:pairs] == input_ids[pairs:]) & attention_mask[:pairs].bool() & attention_mask[pairs:].bool()
    shared = same.int().cumprod(dim=1).sum(dim=1)  # common prefix length of each pair
    rows, positions = response_mask[:, 1:].nonzero(as_tuple=True)  # token positions - 1
    targets = input_ids[rows, positions + 1]
    owner = torch.where((rows >= pairs) & (positions < shared[rows % pairs]), rows - pairs, rows)
    return rows, owner * width + positions, targets


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
    rows, canonical, targets = predicting_positions(batch["input_ids"], batch["attention_mask"],
                                                    batch["response_mask"])
    unique, slot = torch.unique(canonical, return_inverse=True)
    states = hidden_states.reshape(-1, hidden_states.shape[-1])[unique]
    logits = head(states.to(head.weight.dtype)).float()
    with torch.no_grad():
        initial = initial_head(states.to(initial_head.weight.dtype)).float()
    partition = torch.logsumexp(logits, dim=-1) - torch.logsumexp(initial, dim=-1)
    ratios = (logits[slot, targets] - initial[slot, targets]) - partition[slot]
    return sum_per_row(ratios, rows, hidden_states.shape[0])
