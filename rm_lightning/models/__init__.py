"""Reward models: the shared ``RewardModule``, the three RM types, the loss, log-probs and backbones."""

from rm_lightning.models.explicit import ExplicitRM
from rm_lightning.models.generative import ExplicitGenerativeRM
from rm_lightning.models.implicit import ImplicitRM
from rm_lightning.models.loss import bradley_terry_loss
from rm_lightning.models.reward_module import RewardModule

__all__ = ["ExplicitRM", "ExplicitGenerativeRM", "ImplicitRM", "RewardModule", "bradley_terry_loss"]
