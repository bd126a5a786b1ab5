"""The metrics of every named eval set, and when each set is evaluated.

Each eval set has its own metric group (accuracy, normalized margin, absolute and signed, mean rewards, loss, and
every margin for histograms), kept as sum or concatenation states so they reduce exactly
across processes. ``EvalSets`` also decides which sets are due at a validation
(``eval_every_n_epochs``) and leaves out the batches a process only repeats to keep step counts
equal, so every pair counts once, as in a one-process run.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric, MetricCollection

from rm_lightning.metrics.keys import eval_key
from rm_lightning.metrics.pairwise import NormalizedRewardMargin, PairwiseAccuracy
from rm_lightning.pairs.sampling import is_repeated_batch


class RewardMean(MeanMetric):
    """Mean reward of the chosen (``side="chosen"``) or rejected responses."""

    def __init__(self, side: str, **kwargs):
        super().__init__(**kwargs)
        self.side = side

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        super().update((chosen if self.side == "chosen" else rejected).detach().float())


class PairLoss(MeanMetric):
    """Mean loss over pairs: each batch's mean loss weighted by its pair count."""

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor) -> None:
        super().update(loss.detach().float(), weight=chosen.numel())


class Margins(CatMetric):
    """Every pair's margin r+ - r-, for histograms and the mean margin."""

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        super().update((chosen - rejected).detach().float())


def eval_set_metrics() -> MetricCollection:
    """One eval set's metric group; ``update(chosen, rejected, loss=loss)`` feeds every metric."""
    return MetricCollection({
        "accuracy": PairwiseAccuracy(), "normalized_margin": NormalizedRewardMargin(),
        "signed_normalized_margin": NormalizedRewardMargin(signed=True),
        "chosen_reward": RewardMean("chosen"), "rejected_reward": RewardMean("rejected"),
        "loss": PairLoss(), "margins": Margins(),
    }, compute_groups=False)


def value_count(values) -> int:
    """How many values a ``CatMetric`` computed: a tensor (0-d for a single value), or an empty list for none."""
    return values.numel() if isinstance(values, torch.Tensor) else len(values)


def is_due(name: str, every_n_epochs: dict[str, int], trainer) -> bool:
    """Whether eval set ``name`` is evaluated at this validation.

    Every set is due outside fit, before the first step (so that every curve starts where training
    started: ``MarginHistory(validate_at_start)``), at every N-th epoch, and in the last epoch (the final
    figures must cover every set); all ranks decide alike, so metrics stay collective.
    """
    every = every_n_epochs.get(name, 1)
    if every == 1 or trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
        return True
    if trainer.global_step == 0:
        return True
    epoch = trainer.current_epoch
    last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
    out_of_steps = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
    return (epoch + 1) % every == 0 or last_epoch or out_of_steps or trainer.should_stop


def is_repeated_eval_batch(trainer, batch_idx: int, dataloader_idx: int) -> bool:
    """Whether this rank's eval batch only pads it to the other ranks' step count."""
    if trainer is None or trainer.world_size == 1:
        return False
    loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return is_repeated_batch(getattr(loaders[dataloader_idx], "sampler", None), batch_idx)


class EvalSets(nn.Module):
    """Metric groups by eval set name; ``last`` holds the values of the latest evaluation of each set."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleDict()
        self.names: list[str] = []
        self.every_n_epochs: dict[str, int] = {}
        self.last: dict[str, dict[str, torch.Tensor]] = {}
        self.last_step: int | None = None  # the trainer's global step at the latest evaluation

    def configure(self, names: list[str], every_n_epochs: dict[str, int], device: torch.device) -> None:
        """Name the sets in dataloader order; a group is created once per name and kept across stages."""
        self.names, self.every_n_epochs = list(names), dict(every_n_epochs)
        for name in self.names:
            if name not in self.groups:
                self.groups[name] = eval_set_metrics().to(device)

    def name_of(self, dataloader_idx: int) -> str:
        return self.names[dataloader_idx]

    def is_due(self, name: str, trainer) -> bool:
        return is_due(name, self.every_n_epochs, trainer)

    def update(self, name: str, chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor) -> None:
        self.groups[name].update(chosen, rejected, loss=loss)

    def compute(self, trainer, step: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Values of every set evaluated at this validation, then reset; also kept as ``last``, with ``step``
        (default: the trainer's global step) as ``last_step``.

        A set is skipped when it was not due, or (one process) when no batch of it ran, e.g.
        under ``limit_val_batches``. With several processes every rank computes every due set,
        since the reduction is collective, then leaves out a set no rank had a pair of (every pair dropped
        by the length caps or as identical), which one process leaves out too, rather than score it 0.
        """
        if step is None and trainer is not None:
            step = trainer.global_step
        self.last, self.last_step = {}, step
        multi_process = trainer is not None and trainer.world_size > 1
        for name in self.names:
            group = self.groups[name]
            if not self.is_due(name, trainer) or (group["accuracy"].total == 0 and not multi_process):
                continue
            values = {key: value for key, value in group.compute().items()}
            margins = values["margins"]
            if multi_process and not value_count(margins):  # no rank had a pair (all dropped): left out, as alone
                group.reset()
                continue
            values["margins"] = margins.reshape(-1)
            values["margin"] = margins.mean() if margins.numel() else torch.tensor(float("nan"))
            group.reset()
            self.last[name] = values
        return self.last

    def scalars(self, stage: str) -> dict[str, torch.Tensor]:
        """The latest values as loggable scalars, keyed ``<stage>/<set>/<metric>``, plus ``step``.

        ``step`` is the x-axis Lightning gives to loggers: the trainer's global step, the one
        margin_history.csv and the margin histograms use. Without it Lightning logs a validation
        during fit one step earlier (the count of optimizer steps before the batch that triggered it).
        """
        scalars = {eval_key(stage, name, key): value.float() for name, values in self.last.items()
                   for key, value in values.items() if key != "margins"}
        if scalars and self.last_step is not None:
            scalars["step"] = torch.tensor(float(self.last_step))
        return scalars
