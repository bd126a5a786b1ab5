"""The one Bradley-Terry loss every RM type trains with."""

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r+ - r-), computed in float32 or wider for a stable logsigmoid."""
    margin = chosen_rewards.float() - rejected_rewards.float()
    return -F.logsigmoid(margin).mean()
