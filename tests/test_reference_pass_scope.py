"""The IM-RM reference pass runs only where a reference other than the policy itself is needed (issue 20, item 2)."""

import lightning as L
import pytest
import torch

from data_modules import PersonaDataModule
from rm_lightning import ImplicitRM
from rm_lightning.models import reference_cache


def tiny_imrm(cache_dir) -> ImplicitRM:
    torch.manual_seed(0)
    return ImplicitRM(backbone="tiny-llama-chat", beta=0.5, reference_cache_dir=str(cache_dir),
                      optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))


def tiny_persona() -> PersonaDataModule:
    return PersonaDataModule(num_train=8, num_test=4, batch_size=4, eval_batch_size=16)


def trainer(tmp_path, **options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=tmp_path, **options)


def merged(per_dataloader: list[dict]) -> dict:
    return {key: value for metrics in per_dataloader for key, value in metrics.items()}


def reference_files(cache_dir) -> int:
    return len(list(cache_dir.glob("*.pt")))


def test_an_untrained_imrm_is_evaluated_without_running_its_decoder(tmp_path):
    module, data = tiny_imrm(tmp_path / "cache"), tiny_persona()
    module.model.base_model.forward = lambda *args, **kwargs: pytest.fail("the decoder ran")
    metrics = merged(trainer(tmp_path).validate(module, data, verbose=False))
    assert metrics["val/paraphrased_test_prompts/rejected_reward"] == 0.0


def test_validating_the_initial_model_computes_no_reference(tmp_path):
    module, data = tiny_imrm(tmp_path / "cache"), tiny_persona()
    metrics = merged(trainer(tmp_path).validate(module, data, verbose=False))
    assert reference_files(tmp_path / "cache") == 0
    assert metrics["val/original_test_prompts/chosen_reward"] == 0.0


def test_fit_without_validation_computes_only_the_training_set_reference(tmp_path):
    module, data = tiny_imrm(tmp_path / "cache"), tiny_persona()
    trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False).fit(module, data)
    assert reference_files(tmp_path / "cache") == 1
    assert all(p.reference_logps is None for dataset in data.eval_sets.values() for p in dataset.pairs)


def test_a_restored_checkpoint_is_scored_against_the_initial_model(tmp_path):
    module, data = tiny_imrm(tmp_path / "cache"), tiny_persona()
    fit = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    fit.fit(module, data)
    checkpoint = fit.checkpoint_callback.best_model_path or fit.checkpoint_callback.last_model_path
    trained_rewards = tiny_imrm(tmp_path / "other")  # a fresh module restored from the checkpoint after setup
    metrics = merged(trainer(tmp_path).validate(trained_rewards, tiny_persona(), ckpt_path=checkpoint, verbose=False))
    assert metrics["val/original_train_prompts/chosen_reward"] != 0.0
    assert reference_files(tmp_path / "other") == len(data.eval_sets)  # computed once the weights were restored


def test_fit_computes_the_reference_of_the_validated_batches_only(tmp_path):
    module, data = tiny_imrm(tmp_path / "cache"), tiny_persona()  # eval batches of 16 pairs
    trainer(tmp_path, max_steps=1, limit_val_batches=1, enable_checkpointing=False).fit(module, data)
    paraphrased = data.eval_sets["paraphrased_train_prompts"].pairs  # 32 pairs: two batches, one validated
    assert sum(p.reference_logps is not None for p in paraphrased) == 16


def test_a_step_that_moves_only_some_unembedding_rows_counts_as_a_move():
    module = ImplicitRM(backbone="tiny-llama-chat", trainable="output_layer")
    unembedding = module.output_layer().weight
    assert module.policy_is_reference()
    with torch.no_grad():
        unembedding[-1] += 0.1  # the rows of a few tokens move, the first values of every weight stay
    assert not module.policy_is_reference()


def test_an_uncached_reference_is_kept_through_setup(tmp_path):
    module = ImplicitRM(backbone="tiny-llama-chat", cache_reference=False)
    held = list(module._reference_holder)
    trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False).fit(module, tiny_persona())
    assert module._reference_holder == held and held  # the frozen copy made at construction, never reloaded


def test_pairs_an_earlier_set_scored_get_its_values_without_a_pass_of_their_own(tmp_path, monkeypatch):
    module, data = tiny_imrm(tmp_path / "cache"), tiny_persona()
    passes, original_pass = [], reference_cache.reference_pass

    def counted_pass(module, model, dataset, batch_size):
        passes.append(dataset.name)
        return original_pass(module, model, dataset, batch_size)

    monkeypatch.setattr(reference_cache, "reference_pass", counted_pass)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, data)
    # Persona's original responses of the train prompts are the training pairs themselves
    assert passes == ["train", "original_test_prompts", "paraphrased_train_prompts", "paraphrased_test_prompts"]
    by_key = {reference_cache.pair_key(p): p.reference_logps for p in data.train_set.pairs}
    again = data.eval_sets["original_train_prompts"].pairs
    assert [p.reference_logps for p in again] == [by_key[reference_cache.pair_key(p)] for p in again]
