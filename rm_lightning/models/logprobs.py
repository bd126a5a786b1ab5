"""Response log-probabilities without a full-vocabulary log-softmax over every position.

Only hidden states that predict response tokens go through the LM head, in chunks; each
chunk's log-prob is ``logit[target] - logsumexp(logits)``. While training, each chunk is
recomputed in backward (checkpointed), so at most one chunk's logits are alive at a time.
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
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, h, t))
    logps = torch.cat(pieces) if pieces else hidden_states.new_zeros(0, dtype=torch.float32)
    return logps, rows


def sum_per_row(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
