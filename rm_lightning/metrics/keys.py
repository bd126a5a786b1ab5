"""Metric names, in one place: what the module logs, the CSV and results.json hold, and reports read."""

# per eval set, logged as ``<stage>/<set>/<name>`` (stage: val or test)
EVAL_METRICS = ("accuracy", "normalized_margin", "chosen_reward", "rejected_reward", "margin", "loss")
# per training batch, logged as ``train/<name>``
TRAIN_METRICS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin")
TRAIN_SET = "train"  # the set name of training-batch rows in margin_history.csv


def eval_key(stage: str, eval_set: str, metric: str) -> str:
    return f"{stage}/{eval_set}/{metric}"


def train_key(metric: str) -> str:
    return f"train/{metric}"
