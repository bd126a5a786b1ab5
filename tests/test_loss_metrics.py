import math

import torch

from rm_lightning.models.loss import bradley_terry_loss
from rm_lightning.metrics import NormalizedRewardMargin, PairwiseAccuracy


def test_bradley_terry_loss_matches_hand_values():
    chosen = torch.tensor([1.0, 0.0, -2.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0) + math.log(1 + math.exp(3.0))) / 3
    assert math.isclose(bradley_terry_loss(chosen, rejected).item(), expected, rel_tol=1e-6)


def test_bradley_terry_loss_is_stable_for_large_margins():
    loss = bradley_terry_loss(torch.tensor([1000.0, -1000.0]), torch.tensor([0.0, 0.0]))
    assert math.isclose(loss.item(), 500.0, rel_tol=1e-6)


def test_accuracy_counts_ties_as_half():
    metric = PairwiseAccuracy()
    metric.update(torch.tensor([1.0, 0.5, 0.0, 2.0]), torch.tensor([0.0, 0.5, 1.0, 2.0]))
    assert metric.compute().item() == (1 + 0.5 + 0 + 0.5) / 4


def test_normalized_margin_uses_pooled_sample_std():
    chosen = torch.tensor([1.0, 2.0, 0.5])
    rejected = torch.tensor([0.0, 2.5, -1.0])
    metric = NormalizedRewardMargin()
    metric.update(chosen, rejected)
    pooled_std = torch.cat([chosen, rejected]).double().std().item()  # torch.std: n - 1, as the authors
    expected = (1.0 + 0.5 + 1.5) / 3 / (pooled_std + 1e-8)
    assert math.isclose(metric.compute().item(), expected, rel_tol=1e-9)


def test_metrics_accumulate_over_batches_like_one_batch():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    rejected[::7] = chosen[::7]  # some ties
    for metric_class in (PairwiseAccuracy, NormalizedRewardMargin):
        whole, batched = metric_class(), metric_class()
        whole.update(chosen, rejected)
        for begin in range(0, 50, 8):
            batched.update(chosen[begin:begin + 8], rejected[begin:begin + 8])
        assert torch.allclose(whole.compute(), batched.compute(), rtol=1e-12)


def test_metric_states_merge_like_a_cross_process_reduction():
    """Two "ranks" each see half the pairs; merging their sum states gives the full-set value."""
    generator = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(40, generator=generator) * 3, torch.randn(40, generator=generator)
    for metric_class in (PairwiseAccuracy, NormalizedRewardMargin):
        whole, rank0, rank1 = metric_class(), metric_class(), metric_class()
        whole.update(chosen, rejected)
        rank0.update(chosen[:13], rejected[:13])
        rank1.update(chosen[13:], rejected[13:])
        rank0.merge_state(rank1)
        assert torch.allclose(whole.compute(), rank0.compute(), rtol=1e-12)
        for state in rank0._defaults:
            assert rank0._reductions[state] is not None
