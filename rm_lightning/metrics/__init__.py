"""Pairwise metrics and the per-eval-set bookkeeping built on them."""

from rm_lightning.metrics.eval_sets import EvalSets, eval_set_metrics
from rm_lightning.metrics.keys import EVAL_METRICS, TRAIN_METRICS
from rm_lightning.metrics.pairwise import NormalizedRewardMargin, PairwiseAccuracy

__all__ = ["EvalSets", "eval_set_metrics", "EVAL_METRICS", "TRAIN_METRICS", "NormalizedRewardMargin",
           "PairwiseAccuracy"]
