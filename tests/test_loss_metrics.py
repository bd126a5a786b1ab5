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


def test_an_eval_set_with_no_pair_is_left_out_under_several_processes_as_in_one():
    """Every pair of 'dropped' was screened out, so no rank updated its metrics: with two processes it must be left
    out of the results as one process leaves it out, not reported with accuracy 0 and normalized margin 0."""
    from types import SimpleNamespace

    from rm_lightning.metrics.eval_sets import EvalSets

    sets = EvalSets()
    sets.configure(["kept", "dropped"], {}, torch.device("cpu"))
    sets.update("kept", torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor(0.7))
    assert list(sets.compute(SimpleNamespace(world_size=2, global_step=3))) == ["kept"]


def test_a_set_of_one_pair_synced_across_processes_counts_one_margin():
    """After a cross-process sync CatMetric gives one margin as a 0-d tensor: a set of one pair, not an empty one."""
    from rm_lightning.metrics.eval_sets import value_count

    assert [value_count(torch.tensor(0.25)), value_count(torch.zeros(3)), value_count([])] == [1, 3, 0]
