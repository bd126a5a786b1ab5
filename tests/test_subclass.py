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


class LengthPenalizedIMRM(ImplicitRM):
    """An IM-RM whose reward also pays a price per response token: not 0 where the policy is its reference."""

    def compute_rewards(self, hidden_states, batch):
        return super().compute_rewards(hidden_states, batch) - 0.01 * batch["response_mask"].sum(dim=1)


def test_an_untrained_subclass_is_evaluated_with_its_own_rewards(tmp_path):
    """The IM-RM's step-0 evaluation runs no forward (every reward is 0): not so for a type whose rewards differ."""
    import lightning as L

    from data_modules import PersonaDataModule

    module = LengthPenalizedIMRM(backbone="tiny-llama-chat", reference_cache_dir=str(tmp_path / "cache"))
    data = PersonaDataModule(num_train=4, num_test=4, batch_size=4, eval_batch_size=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    metrics = {k: v for m in trainer.validate(module, data, verbose=False) for k, v in m.items()}
    assert metrics["val/original_test_prompts/chosen_reward"] < 0  # minus 0.01 per response token


def test_an_exgrm_subclass_with_its_own_loss_is_evaluated_with_it(tmp_path):
    """An evaluation scores rewards ahead and recomputes the BT loss from them only where that is the type's loss."""
    import lightning as L

    from data_modules import PersonaDataModule
    from rm_lightning import ExplicitGenerativeRM

    class OffsetLossGRM(ExplicitGenerativeRM):
        def pair_loss(self, batch):
            loss, chosen, rejected = super().pair_loss(batch)
            return loss + 1.0, chosen, rejected

    def validation_loss(module) -> float:
        data = PersonaDataModule(num_train=4, num_test=4, batch_size=4, eval_batch_size=16)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        (metrics, *_) = trainer.validate(module, data, verbose=False)
        return metrics["val/original_test_prompts/loss"]

    plain, offset = (validation_loss(cls(backbone="tiny-llama-chat")) for cls in (ExplicitGenerativeRM, OffsetLossGRM))
    assert abs(offset - (plain + 1.0)) < 1e-4
