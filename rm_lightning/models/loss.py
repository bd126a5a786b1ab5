"""The pair losses every RM type trains with, and the options TRL users know them by.

Every loss here is the mean over pairs of a per-pair term (plus, with centering, the mean of
another per-pair term), so a batch run as micro-batches, each loss weighted by its share of the
pairs (``perf/micro_batches.py``), gives exactly the whole batch's loss.

With ``d = r+ - r- - margin`` (``margin``: the batch's per-pair ``margin``, 0 when the data has none):

- ``sigmoid`` (Bradley-Terry, the default; TRL's RewardTrainer and DPO ``sigmoid``):
  ``-(1 - eps) * log sigmoid(d) - eps * log sigmoid(-d)``, ``eps`` the label smoothing (0: plain BT;
  the robust/cDPO form otherwise: a fraction ``eps`` of the labels is taken to be flipped);
- ``hinge`` (SLiC, TRL's DPO ``hinge``): ``relu(1 - d)``;
- ``ipo`` (TRL's DPO ``ipo``): ``(d / beta - 1 / (2 beta))^2``.

TRL writes hinge and IPO in terms of the log-ratio difference ``h``; an IM-RM's reward is
``r = beta * log-ratio``, so ``d = beta * h`` (without a margin) and these are TRL's losses, except that
TRL's IPO averages each response's log-probs over its tokens where an IM-RM's log-ratio is a sum.
``center_rewards_coefficient`` c adds ``c * mean((r+ + r-)^2)`` (TRL's RewardTrainer), which keeps
rewards centred on 0 without changing which response wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F

from rm_lightning.errors import SettingError

LossKind = Literal["sigmoid", "hinge", "ipo"]
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)


@dataclass(frozen=True)
class PairLossOptions:
    """How a batch's rewards become its loss (see the module docstring for each term)."""

    kind: LossKind = "sigmoid"
    label_smoothing: float = 0.0
    center_rewards_coefficient: Optional[float] = None
    beta: Optional[float] = None  # ``ipo`` only: the reward scale of the IM-RM


def check_loss_options(option: str, kind: str, label_smoothing: float, beta: Optional[float] = None) -> None:
    """One line for a loss option that cannot apply: an unknown kind, smoothing off ``sigmoid``, IPO without beta."""
    if kind not in LOSS_KINDS:
        raise SettingError(f"{option}: expected one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    if label_smoothing and kind != "sigmoid":
        raise SettingError(f"{option}: label_smoothing applies to the sigmoid (BT) loss only, got loss {kind!r} "
                           f"with label_smoothing {label_smoothing}; set one of them back (loss bt, label_smoothing 0)")
    if kind == "ipo" and not beta:
        raise SettingError(f"{option}: the ipo loss needs the reward scale beta (an IM-RM's), got {beta!r}")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r+ - r-), computed in float32 or wider for a stable logsigmoid."""
    return preference_loss(chosen_rewards, rejected_rewards)


def preference_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    margin: Optional[torch.Tensor] = None,
                    options: PairLossOptions = PairLossOptions()) -> torch.Tensor:
    """The mean loss of a batch of pairs [B] under ``options``, in float32 or wider.

    ``margin`` [B] (or None) is in reward units: the amount by which r+ must exceed r- before the
    pair counts as won (TRL's RewardTrainer ``margin`` column).
    """
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference)
    loss = per_pair_loss(difference, options).mean()
    if options.center_rewards_coefficient:
        loss = loss + options.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def per_pair_loss(difference: torch.Tensor, options: PairLossOptions) -> torch.Tensor:
    """Each pair's loss [B] from its reward difference ``d`` (margin already subtracted)."""
    if options.kind == "sigmoid":
        eps = options.label_smoothing
        loss = -F.logsigmoid(difference)
        return loss if not eps else (1 - eps) * loss - eps * F.logsigmoid(-difference)
    if options.kind == "hinge":
        return torch.relu(1 - difference)
    if options.kind == "ipo":
        beta = options.beta
        return (difference / beta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {options.kind!r}")
