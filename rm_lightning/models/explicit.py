"""EX-RM: r(x, y) = <u, h(x, y)>, a linear head on the backbone's final hidden state."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rm_lightning.errors import BackboneError
from rm_lightning.models.backbones import is_sequence_classification, sequence_classification_score
from rm_lightning.models.reward_module import RewardModule
from rm_lightning.models.trainable import (drop_from_optimizer_states, freeze_unused_output_embeddings,
                                           prepare_trainable, untied_output_embeddings)


class ExplicitRM(RewardModule):
    """Explicit reward model. No LM-head logits are ever computed.

    Args:
        pooling: ``last``: hidden state of the last real token (the paper's EX-RM);
            ``mean_response``: mean over response tokens (the paper's ablation).
        head_init: ``normal`` (default; std = the backbone's initializer range, like Hugging
            Face's sequence-classification head) or ``zeros``. A zero head passes no gradient to
            the backbone until it has grown, so it first fits the untrained features; on Persona
            that generalized worse to paraphrases than a normal head.

    A backbone's untied LM head, which no EX-RM reward reads, is frozen
    (``models/trainable.freeze_unused_output_embeddings``), so DDP needs no ``find_unused_parameters``.

    A ``backbone`` that is a sequence-classification model (``*ForSequenceClassification`` in its
    config.json: a reward model from the hub, or one exported by ``rm_lightning.export``) gives
    both the decoder and the head: its ``score`` layer becomes ``head`` and ``head_init`` is unused.
    """

    def __init__(self, pooling: Literal["last", "mean_response"] = "last",
                 head_init: Literal["normal", "zeros"] = "normal", **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling
        self.head = nn.Linear(self.model.config.hidden_size, 1, bias=False)
        if head_init == "zeros":
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=getattr(self.model.config, "initializer_range", 0.02))
        if is_sequence_classification(self.hparams.backbone):
            self.load_sequence_classification_head(self.hparams.backbone)
        prepare_trainable(self)
        freeze_unused_output_embeddings(self.model)

    def load_sequence_classification_head(self, name_or_path: str) -> None:
        """Take the ``score`` layer of a sequence-classification checkpoint as the head (one output only)."""
        score = sequence_classification_score(name_or_path)
        if tuple(score.shape) != tuple(self.head.weight.shape):
            raise BackboneError(f"backbone '{name_or_path}': its score layer has shape {tuple(score.shape)}; an EX-RM "
                                f"needs one output over the hidden size, {tuple(self.head.weight.shape)}")
        with torch.no_grad():
            self.head.weight.copy_(score)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Optimizer states saved while the untied LM head was still trained list it: its slot goes."""
        super().on_load_checkpoint(checkpoint)
        unused = untied_output_embeddings(self.model)
        if unused is not None:
            drop_from_optimizer_states(checkpoint, self, unused.weight)

    def output_layer(self) -> nn.Module:
        return self.head

    def features(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """h(x, y) [2B, H]: the representation the head reads (the paper's §4 analysis is in these terms)."""
        if self.pooling == "last":
            rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
            return hidden_states[rows, batch["last_index"]]
        mask = batch["response_mask"].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)

    def compute_rewards(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.features(hidden_states, batch)
        return self.head(features.to(self.head.weight.dtype)).squeeze(-1).float()
