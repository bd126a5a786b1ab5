"""``trainable: output_layer``: train only the layer that turns final hidden states into rewards.

That is the setting of the paper's §4 analysis and Theorem 2: with the backbone frozen, the
hidden representations are fixed, and what an RM learns is a function of them alone. For an
EX-RM the output layer is its head u; for an IM-RM (and an EX-GRM) it is the unembedding U.
Backbones that tie U to the input embeddings get an untied copy, so that training U moves no
input embedding: the hidden states stay those of the initial model.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rm_lightning.perf.frozen_features import attach_frozen_features

Trainable = Literal["all", "output_layer"]


def untie_output_embeddings(model: nn.Module) -> None:
    """Give ``model`` an output embedding of its own when it shares the input embedding's weight."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False


def frozen_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` that no optimizer sees and no gradient reaches (an IM-RM's initial unembedding)."""
    copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(layer.weight)
        if layer.bias is not None:
            copy.bias.copy_(layer.bias)
    return copy.requires_grad_(False)


def train_only(module: nn.Module, layer: nn.Module) -> None:
    """Freeze every parameter of ``module`` except those of ``layer``."""
    module.requires_grad_(False)
    layer.requires_grad_(True)


def prepare_trainable(module, data=None) -> None:
    """Under ``trainable: output_layer``, freeze all of ``module`` but its ``output_layer()`` and give every
    pair of ``data`` (a ``PreferenceData``) its frozen hidden states. Idempotent: the built-in types
    call it at the end of ``__init__`` (without data), and ``setup`` calls it again with the data."""
    if module.hparams.trainable != "output_layer":
        return
    train_only(module, module.output_layer())
    if data is not None:
        attach_frozen_features(module, data.encoded_sets().values())
