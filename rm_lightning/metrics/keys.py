"""Metric names, in one place: what the module logs, the CSV and results.json hold, and reports read."""

import torch

# per eval set, logged as ``<stage>/<set>/<name>`` (stage: val or test)
# (normalized_margin: mean |r+ - r-| / sd(r), as the paper; signed_normalized_margin: mean (r+ - r-) / sd(r))
EVAL_METRICS = ("accuracy", "normalized_margin", "chosen_reward", "rejected_reward", "margin", "loss",
                "signed_normalized_margin")
# per training batch, logged as ``train/<name>``
TRAIN_METRICS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin")
# the training batches' accuracy over a whole epoch, logged once per epoch as ``train/epoch_accuracy``
EPOCH_ACCURACY = "epoch_accuracy"
TRAIN_SET = "train"  # the set name of training-batch rows in margin_history.csv


def eval_key(stage: str, eval_set: str, metric: str) -> str:
    return f"{stage}/{eval_set}/{metric}"


def train_key(metric: str) -> str:
    return f"train/{metric}"


def batch_means(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training batch's mean rewards and margin, keyed as logged."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {train_key("chosen_reward"): chosen.mean(), train_key("rejected_reward"): rejected.mean(),
            train_key("margin"): (chosen - rejected).mean()}
