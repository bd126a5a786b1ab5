"""EX-RM: r(x, y) = <u, h(x, y)>, a linear head on the backbone's final hidden state."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rm_lightning.module import RewardModule


class ExplicitRM(RewardModule):
    """Explicit reward model. No LM-head logits are ever computed.

    Args:
        pooling: ``last``: hidden state of the last real token (the paper's EX-RM);
            ``mean_response``: mean over response tokens (the paper's ablation).
    """

    def __init__(self, pooling: Literal["last", "mean_response"] = "last", **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling
        hidden_size = self.model.config.hidden_size
        self.head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.head.weight, std=getattr(self.model.config, "initializer_range", 0.02))

    def compute_rewards(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pooling == "last":
            rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
            features = hidden_states[rows, batch["last_index"]]
        else:
            mask = batch["response_mask"].unsqueeze(-1).to(hidden_states.dtype)
            features = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(features.to(self.head.weight.dtype)).squeeze(-1).float()
