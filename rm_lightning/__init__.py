"""rm-lightning: explicit, implicit and generative reward models on one Lightning spine."""

from rm_lightning.errors import BackboneError, DataError, RMLightningError
from rm_lightning.explicit import ExplicitRM
from rm_lightning.generative import ExplicitGenerativeRM
from rm_lightning.implicit import ImplicitRM
from rm_lightning.loss import bradley_terry_loss
from rm_lightning.metrics import NormalizedRewardMargin, PairwiseAccuracy
from rm_lightning.module import RewardModule
from rm_lightning.pairs import PreferencePair

__all__ = [
    "BackboneError", "DataError", "RMLightningError", "ExplicitRM", "ExplicitGenerativeRM", "ImplicitRM",
    "RewardModule", "bradley_terry_loss", "NormalizedRewardMargin", "PairwiseAccuracy", "PreferencePair",
]
