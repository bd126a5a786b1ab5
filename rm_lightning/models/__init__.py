"""Reward models: the shared ``RewardModule``, the three RM types, the loss, log-probs and backbones.

Names are imported on first use (see ``rm_lightning/__init__.py``): ``models.backbones`` alone
needs no Lightning.
"""

from rm_lightning.lazy import lazy_exports

_EXPORTS = {
    "ExplicitRM": "rm_lightning.models.explicit", "ExplicitGenerativeRM": "rm_lightning.models.generative",
    "ImplicitRM": "rm_lightning.models.implicit", "RewardModule": "rm_lightning.models.reward_module",
    "bradley_terry_loss": "rm_lightning.models.loss",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
