"""Pairwise metrics as torchmetrics, with sum states so they reduce exactly across processes."""

import torch
from torchmetrics import Metric


class PairwiseAccuracy(Metric):
    """Share of pairs with r+ > r-, ties counting 1/2 (as in the paper)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        self.score += (chosen > rejected).sum() + 0.5 * (chosen == rejected).sum()
        self.total += chosen.numel()

    def compute(self) -> torch.Tensor:
        return self.score / self.total.clamp(min=1)


class NormalizedRewardMargin(Metric):
    """mean |r+ - r-| / (std of all rewards of the set, chosen and rejected pooled, + 1e-8).

    The std is the sample std (n - 1), as ``torch.std`` in the authors' code. It is rebuilt from
    sums and sums of squares in float64, so batches and processes can be summed in any order.

    With ``signed=True`` it is mean (r+ - r-) / sd: the same scale with the direction kept, negative
    when the set's rejected responses get the higher rewards on average.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, eps: float = 1e-8, signed: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.eps, self.signed = eps, signed
        for name in ("margin_sum", "reward_sum", "reward_sq_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        rewards = torch.cat([chosen, rejected])
        margins = chosen - rejected
        self.margin_sum += (margins if self.signed else margins.abs()).sum()
        self.reward_sum += rewards.sum()
        self.reward_sq_sum += (rewards * rewards).sum()
        self.pairs += chosen.numel()

    def compute(self) -> torch.Tensor:
        n = 2 * self.pairs.double()
        mean = self.reward_sum / n.clamp(min=1)
        variance = (self.reward_sq_sum - n * mean * mean) / (n - 1).clamp(min=1)
        std = variance.clamp(min=0).sqrt()
        return (self.margin_sum / self.pairs.clamp(min=1)) / (std + self.eps)
