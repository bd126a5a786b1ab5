"""The benchmark's own decoder layouts: length buckets and unshared packing match the padded forward."""

import torch

from benchmarks.bucketed import bucketed_hidden_states, plan_length_buckets
from benchmarks.steps import prefixes_unshared
from conftest import edge_case_pairs, loss_and_grads, ragged_pairs
from rm_lightning import ExplicitRM, ImplicitRM
from rm_lightning.pairs import EncodedPair, PairCollator
from rm_lightning.perf.layouts import padded_hidden_states
from rm_lightning.perf.packed_pairs import PackedPairs, packed_hidden_states


def test_plan_keeps_similar_lengths_together_and_splits_ragged_ones():
    assert plan_length_buckets([10, 11, 12, 10], overhead_tokens=32) == [[0, 3, 1, 2]]
    groups = plan_length_buckets([200, 20, 22, 190, 21, 25], overhead_tokens=32)
    assert sorted(map(sorted, groups)) == [[0, 3], [1, 2, 4, 5]]
    assert sorted(r for g in groups for r in g) == list(range(6))
    assert plan_length_buckets([], overhead_tokens=32) == []


def test_plan_with_no_overhead_gives_one_group_per_distinct_length():
    groups = plan_length_buckets([5, 9, 5, 7], overhead_tokens=0)
    assert [sorted(g) for g in groups] == [[0, 2], [3], [1]]


def test_bucketed_forward_matches_padded_at_real_positions():
    module = ExplicitRM(backbone="tiny-llama")
    module.model.eval()
    batch = PairCollator(module.tokenizer.pad_token_id)(ragged_pairs(len(module.tokenizer)))
    with torch.no_grad():
        padded = padded_hidden_states(module.decoder, batch)
        bucketed = bucketed_hidden_states(module.decoder, batch, overhead_tokens=0)
    real = batch["attention_mask"].bool()
    assert bucketed.shape == padded.shape
    torch.testing.assert_close(bucketed[real], padded[real], atol=1e-5, rtol=1e-4)
    assert torch.all(bucketed[~real] == 0)


def test_bucketed_rewards_and_gradients_match_padded():
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0)
    batch = PairCollator(module.tokenizer.pad_token_id)(ragged_pairs(len(module.tokenizer), seed=1))
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    bucketed_loss, bucketed_grads = loss_and_grads(
        module, batch, lambda decoder, b: bucketed_hidden_states(decoder, b, overhead_tokens=0))
    torch.testing.assert_close(bucketed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(bucketed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_unshared_packing_runs_every_row_whole():
    batch = PairCollator(0)([EncodedPair([5, 6, 7, 8], 2, [5, 6, 9], 2), EncodedPair([4, 3], 1, [7, 3, 2], 1)])
    with prefixes_unshared():
        unshared = PackedPairs.from_batch(batch)
    assert unshared.num_tokens == 12 and unshared.shared_tokens == 0
    assert PackedPairs.from_batch(batch).shared_tokens == 2  # shared again outside the context


def test_unshared_packed_forward_matches_padded_at_real_positions():
    module = ExplicitRM(backbone="tiny-llama")
    module.model.eval()
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    with torch.no_grad(), prefixes_unshared():
        padded = padded_hidden_states(module.decoder, batch)
        packed = packed_hidden_states(module.decoder, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-4)
    assert torch.all(packed[~real] == 0)
