"""Evaluation casts the weights to the autocast dtype once per loop, and leaves autocast as it found it.

Lightning's bf16-mixed plugin opens autocast with its weight cache off (``cache_enabled=False``), and its
validate, test and predict loops run in inference mode, under which autocast caches nothing; fit's
validation runs under ``no_grad``."""

import lightning as L
import pytest
import torch
from torch import nn

from data_modules import PersonaDataModule
from rm_lightning import ExplicitRM
from rm_lightning.perf import by_prompt, eval_rewards
from rm_lightning.perf.checkpointing import autocast_weight_cache
from rm_lightning.perf.weight_casts import reusing_casts, shared_weight_casts

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def autocast_nesting() -> int:
    """Autocast's nesting level now (read by stepping it up and back down)."""
    level = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return level


def outputs_around_a_weight_change(share: bool, lightning_autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's output in two autocast blocks, its weight changed in between; ``lightning_autocast``: blocks
    opened as Lightning's plugin opens them (cache off), the forwards inside ``reusing_casts``."""
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 8), torch.randn(2, 8)
    cache = {"cache_enabled": False} if lightning_autocast else {}
    with shared_weight_casts(enabled=share):
        with torch.autocast(**BF16, **cache), reusing_casts(layer):
            first = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        with torch.autocast(**BF16, **cache), reusing_casts(layer):
            second = layer(x)
    return first, second


def test_autocast_blocks_inside_reuse_the_first_cast():
    first, second = outputs_around_a_weight_change(share=True)
    assert torch.equal(first, second)  # the second block used the copy cast before the change


def test_forwards_reusing_casts_inside_lightnings_autocast_reuse_the_first_cast():
    first, second = outputs_around_a_weight_change(share=True, lightning_autocast=True)
    assert torch.equal(first, second)


def test_without_sharing_each_block_casts_again():
    first, second = outputs_around_a_weight_change(share=False)
    assert not torch.equal(first, second)


def test_the_cached_copies_are_dropped_when_the_block_ends():
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 8), torch.randn(2, 8)
    with shared_weight_casts():
        with torch.autocast(**BF16):
            layer(x)
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.autocast(**BF16):
        after = layer(x)
    torch.testing.assert_close(after.float(), layer(x), atol=0.1, rtol=0.05)  # the changed weight, in bf16


def evaluation(share: bool) -> dict[str, float]:
    """A bf16-mixed validation of a tiny EX-RM; ``share: False`` closes the shared block at every batch."""
    torch.manual_seed(0)
    module = ExplicitRM(backbone="tiny-llama-chat")
    data = PersonaDataModule(num_train=4, num_test=8, eval_batch_size=4)

    class CastPerBatch(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            pl_module._eval_weight_casts.close()

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[] if share else [CastPerBatch()])
    return trainer.validate(module, data, verbose=False)[0]


def test_validation_with_one_cast_scores_as_with_a_cast_per_batch():
    assert evaluation(share=True) == evaluation(share=False)


def test_validation_leaves_autocast_nesting_where_it_was():
    evaluation(share=True)
    assert autocast_nesting() == 0


def rewards_scored_ahead(monkeypatch, weight_changes: bool, inference_mode: bool = False) -> dict:
    """The rewards a bf16-mixed validation scores ahead, in batches of 4 pairs; ``weight_changes``: a decoder
    weight is changed after every forward it takes part in; ``inference_mode``: the loop in Lightning's
    default evaluation context (``cli.py validate``'s), else under ``no_grad`` (fit's validation)."""
    torch.manual_seed(0)
    module = ExplicitRM(backbone="tiny-llama-chat", head_init="normal")
    monkeypatch.setattr(eval_rewards, "consecutive_batches",
                        lambda pairs, layout: by_prompt.consecutive_batches(pairs, layout, max_pairs=4))
    if weight_changes:
        layer = module.model.model.layers[0].mlp.gate_proj

        def change_weight(*args) -> None:  # returns None: the layer's output is kept
            layer.weight.data.add_(1.0)

        layer.register_forward_hook(change_weight)
    scored = {}

    class KeepScores(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            scored.update(pl_module._eval_rewards.rewards)

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", inference_mode=inference_mode, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KeepScores()])
    trainer.validate(module, PersonaDataModule(num_train=4, num_test=4, eval_batch_size=4), verbose=False)
    return scored


@pytest.mark.parametrize("inference_mode", [False, True], ids=["no_grad", "inference_mode"])
def test_scoring_ahead_casts_the_weights_once_for_all_of_its_batches(monkeypatch, inference_mode):
    unchanged = rewards_scored_ahead(monkeypatch, weight_changes=False, inference_mode=inference_mode)
    changed = rewards_scored_ahead(monkeypatch, weight_changes=True, inference_mode=inference_mode)
    assert len(unchanged) > 8 and changed == unchanged


@pytest.mark.parametrize("enabled", [True, False])
def test_the_weight_cache_leaves_inference_mode_only_when_on(enabled):
    with torch.inference_mode(), autocast_weight_cache(enabled=enabled):
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
    assert modes == ((False, False) if enabled else (True, False))
