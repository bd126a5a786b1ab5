"""rm-lightning: explicit, implicit and generative reward models on one Lightning spine.

Sub-packages by role: ``models`` (the RM types and what they share), ``pairs`` (text pairs to
batches, and the contract with data modules), ``metrics``, ``perf`` (how fast and in how much
memory, never what is computed), ``callbacks`` (what a run records) and ``experiments``
(sweeps, reports, set-up).

The public names below are imported on first use, so that a command which needs no Lightning
(``python -m rm_lightning.prepare``, a benchmark's parent process) does not pay for importing it.
"""

from rm_lightning.lazy import lazy_exports

_EXPORTS = {
    "BackboneError": "rm_lightning.errors", "DataError": "rm_lightning.errors",
    "RMLightningError": "rm_lightning.errors", "SettingError": "rm_lightning.errors",
    "ExplicitRM": "rm_lightning.models.explicit", "ExplicitGenerativeRM": "rm_lightning.models.generative",
    "ImplicitRM": "rm_lightning.models.implicit", "RewardModule": "rm_lightning.models.reward_module",
    "bradley_terry_loss": "rm_lightning.models.loss", "load_reward_model": "rm_lightning.models.scoring",
    "NormalizedRewardMargin": "rm_lightning.metrics.pairwise", "PairwiseAccuracy": "rm_lightning.metrics.pairwise",
    "PreferencePair": "rm_lightning.pairs.records",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
