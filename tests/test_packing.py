"""Length-bucketed forward: same hidden states and gradients as the padded forward, less padding."""

import pytest
import torch

from rm_lightning import ExplicitRM, ImplicitRM
from rm_lightning.loss import bradley_terry_loss
from rm_lightning.pairs import EncodedPair, PairCollator
from rm_lightning.packing import bucketed_hidden_states, padded_hidden_states, plan_length_buckets


def test_plan_keeps_similar_lengths_together_and_splits_ragged_ones():
    assert plan_length_buckets([10, 11, 12, 10], overhead_tokens=32) == [[0, 3, 1, 2]]
    groups = plan_length_buckets([200, 20, 22, 190, 21, 25], overhead_tokens=32)
    assert sorted(map(sorted, groups)) == [[0, 3], [1, 2, 4, 5]]
    assert sorted(r for g in groups for r in g) == list(range(6))
    assert plan_length_buckets([], overhead_tokens=32) == []


def test_plan_with_no_overhead_gives_one_group_per_distinct_length():
    groups = plan_length_buckets([5, 9, 5, 7], overhead_tokens=0)
    assert [sorted(g) for g in groups] == [[0, 2], [3], [1]]


def ragged_pairs(vocab: int, seed: int = 0) -> list[EncodedPair]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [(6, 9), (40, 37), (8, 12), (45, 7)]
    pairs = []
    for chosen_len, rejected_len in lengths:
        chosen = torch.randint(3, vocab - 1, (chosen_len,), generator=generator).tolist()
        rejected = torch.randint(3, vocab - 1, (rejected_len,), generator=generator).tolist()
        pairs.append(EncodedPair(chosen, 3, rejected, 3))
    return pairs


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_bucketed_forward_matches_padded_at_real_positions(padding_side):
    module = ExplicitRM(backbone="tiny-llama", padding_side=padding_side)
    module.model.eval()
    batch = PairCollator(module.tokenizer.pad_token_id, padding_side)(ragged_pairs(len(module.tokenizer)))
    with torch.no_grad():
        padded = padded_hidden_states(module.decoder, batch)
        bucketed = bucketed_hidden_states(module.decoder, batch, overhead_tokens=0)
    real = batch["attention_mask"].bool()
    assert bucketed.shape == padded.shape
    torch.testing.assert_close(bucketed[real], padded[real], atol=1e-5, rtol=1e-4)
    assert torch.all(bucketed[~real] == 0)


def loss_and_grads(module, batch, hidden_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Bradley-Terry loss of ``module`` on ``batch`` with the decoder run by ``hidden_fn``, and its gradients."""
    module.zero_grad()
    chosen, rejected = module.compute_rewards(hidden_fn(module.decoder, batch), batch).chunk(2)
    loss = bradley_terry_loss(chosen, rejected)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


def test_bucketed_rewards_and_gradients_match_padded():
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0)
    batch = PairCollator(module.tokenizer.pad_token_id)(ragged_pairs(len(module.tokenizer), seed=1))
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    bucketed_loss, bucketed_grads = loss_and_grads(
        module, batch, lambda decoder, b: bucketed_hidden_states(decoder, b, overhead_tokens=0))
    torch.testing.assert_close(bucketed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(bucketed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)

