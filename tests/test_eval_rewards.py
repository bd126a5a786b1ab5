"""An evaluation's rewards scored ahead, every due set in one pass by prompt (perf/eval_rewards.py): the same
metrics as scoring batch by batch, with fewer decoder calls; batch by batch wherever scoring ahead is not safe."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from data_modules import PersonaDataModule
from rm_lightning import ExplicitGenerativeRM, ExplicitRM
from rm_lightning.models import reward_module
from rm_lightning.pairs import LengthBucketSampler
from rm_lightning.perf import eval_rewards


def tiny_persona() -> PersonaDataModule:
    return PersonaDataModule(num_train=8, num_test=4, batch_size=4, eval_batch_size=8)


def validate(module, tmp_path, monkeypatch, ahead: bool) -> tuple[dict, int]:
    """(metrics, decoder calls) of one validation."""
    if not ahead:
        monkeypatch.setattr(reward_module, "why_not_ahead", lambda module, trainer: "switched off by the test")
    calls = []
    decode = module.hidden_states
    monkeypatch.setattr(module, "hidden_states", lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    results = trainer.validate(module, tiny_persona(), verbose=False)
    monkeypatch.undo()
    return {key: value for metrics in results for key, value in metrics.items()}, len(calls)


def test_rewards_scored_ahead_give_the_metrics_of_scoring_batch_by_batch(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = ExplicitRM(backbone="tiny-llama-chat", head_init="normal")
    ahead, ahead_calls = validate(module, tmp_path, monkeypatch, ahead=True)
    batch_by_batch, calls = validate(module, tmp_path, monkeypatch, ahead=False)
    assert ahead.keys() == batch_by_batch.keys() and ahead
    for key, value in batch_by_batch.items():
        assert ahead[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # 8 + 4 + 32 + 16 pairs in eval batches of 8: 8 calls batch by batch; 36 distinct pairs by prompt: 1 call
    assert (calls, ahead_calls) == (8, 1)


def test_a_loss_that_reads_more_than_the_rewards_is_scored_batch_by_batch(tmp_path):
    module = ExplicitGenerativeRM(backbone="tiny-llama-chat", loss="yes_no_ce")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.validate(module, tiny_persona(), verbose=False)
    assert eval_rewards.why_not_ahead(module, trainer) == "a loss that is not a function of the rewards"
    assert ExplicitGenerativeRM(backbone="tiny-llama-chat").loss_from_rewards()


def test_row_keys_of_a_batch_are_those_of_its_pairs():
    module = ExplicitRM(backbone="tiny-llama-chat")
    data = tiny_persona()
    data.attach(module).setup("fit")
    pairs = data.eval_sets["paraphrased_test_prompts"].pairs[:6]
    keys = [eval_rewards.row_keys_of_pair(pair) for pair in pairs]
    expected = [chosen for chosen, _ in keys] + [rejected for _, rejected in keys]
    assert eval_rewards.row_keys_of_batch(module.collator()(pairs)) == expected


@pytest.mark.parametrize("rank", [0, 1])
def test_under_several_processes_a_rank_scores_ahead_the_pairs_its_own_loader_holds(rank):
    module = ExplicitRM(backbone="tiny-llama-chat")
    data = tiny_persona()
    data.attach(module).setup("fit")
    dataset = data.eval_sets["paraphrased_test_prompts"]  # 16 pairs in batches of 6: 3 batches, one repeated
    sampler = LengthBucketSampler([len(pair) for pair in dataset.pairs], 6, shuffle=False, num_replicas=2, rank=rank)
    loader = DataLoader(dataset, batch_size=6, sampler=sampler, collate_fn=list)
    part = eval_rewards.rank_part(dataset, loader, len(loader))
    assert part.pairs == [pair for batch in loader for pair in batch]


def test_two_ddp_processes_may_score_ahead(tmp_path):
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, default_root_dir=tmp_path)
    assert trainer.world_size == 2
    assert eval_rewards.why_not_ahead(ExplicitRM(backbone="tiny-llama-chat"), trainer) is None
