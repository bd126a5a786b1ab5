"""The IM-RM reference pass runs only where a reference other than the policy itself is needed (issue 20, item 2)."""

import lightning as L
import pytest
import torch

from data_modules import PersonaDataModule
from rm_lightning import ImplicitRM
from rm_lightning.models import reference_cache
from rm_lightning.perf.by_prompt import consecutive_batches


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

    def counted_pass(module, model, dataset, batches):
        passes.append((dataset.name, len(dataset)))
        return original_pass(module, model, dataset, batches)

    monkeypatch.setattr(reference_cache, "reference_pass", counted_pass)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, data)
    # one pass over every set, each distinct pair scored once: Persona's original responses of the train prompts
    # are the training pairs themselves
    sets = ["train", *data.eval_sets]
    distinct = {reference_cache.pair_key(p) for name in sets
                for p in (data.train_set if name == "train" else data.eval_sets[name]).pairs}
    assert passes == [(", ".join(sets), len(distinct))]
    by_key = {reference_cache.pair_key(p): p.reference_logps for p in data.train_set.pairs}
    again = data.eval_sets["original_train_prompts"].pairs
    assert [p.reference_logps for p in again] == [by_key[reference_cache.pair_key(p)] for p in again]
    # each set cached on its own, for a run needing fewer; train and original_train_prompts, the same tokens, share one
    assert reference_files(tmp_path / "cache") == len(sets) - 1


def test_the_sets_scored_together_get_the_values_each_would_get_alone(tmp_path):
    together, data = tiny_imrm(tmp_path / "together"), tiny_persona()
    data.attach(together).setup("fit")
    sets = [data.train_set, *data.eval_sets.values()]
    together.attach_reference_logps(*sets)
    for index, dataset in enumerate(sets):
        alone, copy = tiny_imrm(tmp_path / f"alone{index}"), tiny_persona()
        copy.attach(alone).setup("fit")
        same_set = copy.train_set if dataset.name == "train" else copy.eval_sets[dataset.name]
        alone.attach_reference_logps(same_set)
        torch.testing.assert_close(torch.tensor([p.reference_logps for p in dataset.pairs]),
                                   torch.tensor([p.reference_logps for p in same_set.pairs]))


def test_the_pass_puts_the_pairs_of_one_prompt_side_by_side_whichever_set_holds_them():
    module, data = tiny_imrm("unused"), tiny_persona()
    data.attach(module).setup("fit")
    pairs = reference_cache.unscored_pairs([data.train_set, *data.eval_sets.values()])
    prompts = [tuple(pair.chosen_ids[:pair.chosen_start]) for pair in pairs]
    runs = [prompt for index, prompt in enumerate(prompts) if index == 0 or prompt != prompts[index - 1]]
    assert len(runs) == len(set(prompts))  # each prompt in one run
    # the paraphrased sets hold the prompts of the original ones: none of their own
    assert len(set(prompts)) == len(data.train_set) + len(data.eval_sets["original_test_prompts"])


def test_reference_batches_stay_within_their_pair_and_token_bounds():
    class Pair:  # what consecutive_batches reads of a pair: its token ids
        def __init__(self, tokens):
            self.chosen_ids, self.rejected_ids = list(range(tokens)), []

    pairs = [Pair(tokens) for tokens in (5, 5, 5, 30, 5, 5, 5, 5)]
    assert consecutive_batches(pairs, "packed", max_pairs=3, max_tokens=20) == [
        [0, 1, 2], [3], [4, 5, 6], [7]]
