"""rm-lightning: explicit, implicit and generative reward models on one Lightning spine.

Sub-packages by role: ``models`` (the RM types and what they share), ``pairs`` (text pairs to
batches, and the contract with data modules), ``metrics``, ``perf`` (how fast and in how much
memory, never what is computed), ``callbacks`` (what a run records) and ``experiments``
(sweeps, reports, set-up).
"""

from rm_lightning.errors import BackboneError, DataError, RMLightningError
from rm_lightning.metrics.pairwise import NormalizedRewardMargin, PairwiseAccuracy
from rm_lightning.models import ExplicitGenerativeRM, ExplicitRM, ImplicitRM, RewardModule, bradley_terry_loss
from rm_lightning.pairs.records import PreferencePair

__all__ = [
    "BackboneError", "DataError", "RMLightningError", "ExplicitRM", "ExplicitGenerativeRM", "ImplicitRM",
    "RewardModule", "bradley_terry_loss", "NormalizedRewardMargin", "PairwiseAccuracy", "PreferencePair",
]
