"""A new RM type is a subclass that says only how rewards are computed (the README example)."""

import torch

from rm_lightning import ImplicitRM, PreferencePair


class LengthNormalizedIMRM(ImplicitRM):
    """IM-RM whose log-ratio is averaged over response tokens instead of summed."""

    def compute_rewards(self, hidden_states, batch):
        response_tokens = batch["response_mask"][:, 1:].sum(dim=1).clamp(min=1)
        return super().compute_rewards(hidden_states, batch) / response_tokens


def test_user_subclass_trains_with_the_shared_machinery(tmp_path):
    module = LengthNormalizedIMRM(backbone="tiny-llama-chat", cache_reference=False, reference="none")
    pairs = [PreferencePair("Hi", "Hello there, friend", "No"), PreferencePair("2+2?", "4", "five, I think")]
    batch = module.collator()(module.pair_encoder().encode_all(pairs)[0])
    base = ImplicitRM(backbone="tiny-llama-chat", reference="none")
    summed = base.rewards(batch)
    lengths = batch["response_mask"][:, 1:].sum(dim=1)
    assert torch.allclose(module.rewards(batch), summed / lengths)
    loss, chosen, rejected = module.pair_loss(batch)
    loss.backward()
    assert module.model.get_input_embeddings().weight.grad is not None


def test_the_readme_subclass_is_not_exported_as_a_plain_imrm(tmp_path):
    """Its export would record a summed log-ratio and load back as ImplicitRM, with other rewards."""
    import pytest

    from rm_lightning.errors import RMLightningError
    from rm_lightning.models.export import export_module

    with pytest.raises(RMLightningError, match="overrides compute_rewards of ImplicitRM"):
        export_module(LengthNormalizedIMRM(backbone="tiny-llama-chat", reference="none"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
