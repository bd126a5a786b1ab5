"""``trainable: output_layer``: train only the layer that turns final hidden states into rewards.

That is the setting of the paper's §4 analysis and Theorem 2: with the backbone frozen, the
hidden representations are fixed, and what an RM learns is a function of them alone. For an
EX-RM the output layer is its head u; for an IM-RM (and an EX-GRM) it is the unembedding U.
Backbones that tie U to the input embeddings get an untied copy, so that training U moves no
input embedding: the hidden states stay those of the initial model.

Whatever ``trainable`` says, a parameter no reward reads is not trained: an EX-RM freezes an untied
LM head (``freeze_unused_output_embeddings``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from rm_lightning.perf.frozen_features import attach_frozen_features

Trainable = Literal["all", "output_layer"]


def output_embeddings(model: nn.Module) -> tuple[Optional[nn.Module], bool]:
    """``model``'s output embedding (LM head, None where it has none), and whether it shares the input
    embedding's weight."""
    output = model.get_output_embeddings()
    return output, output is not None and output.weight is model.get_input_embeddings().weight


def untie_output_embeddings(model: nn.Module) -> None:
    """Give ``model`` an output embedding of its own when it shares the input embedding's weight."""
    output, tied = output_embeddings(model)
    if tied:
        output.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
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


def untied_output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """``model``'s output embedding (LM head) when it has a weight of its own, else None."""
    output, tied = output_embeddings(model)
    return None if tied else output


def freeze_unused_output_embeddings(model: nn.Module) -> None:
    """Freeze an untied LM head that the reward never reads (an EX-RM's).

    A trainable parameter that never gets a gradient makes DDP wait for it at every step: it stops
    with an error unless ``find_unused_parameters`` is on, which costs a traversal of the autograd
    graph a step and prints a warning on every run of the models that have no such parameter.
    Frozen, it is also left out of the optimizer and of the token budget's estimate of Adam's memory.
    """
    output = untied_output_embeddings(model)
    if output is not None:
        output.requires_grad_(False)


def drop_from_optimizer_states(checkpoint: dict, module: nn.Module, frozen: nn.Parameter) -> None:
    """Remove ``frozen`` from optimizer states saved while it was still trainable, so a run saved by a version
    that trained an EX-RM's untied LM head resumes. It never had a gradient, so it was never stepped: its slot
    goes, with the state ``optimizer_in_backward`` allocated for it up front (still zero). States that already
    leave it out (one entry fewer) are not touched."""
    order = [p for p in module.parameters() if p.requires_grad or p is frozen]
    slot = next(index for index, param in enumerate(order) if param is frozen)
    for state in checkpoint.get("optimizer_states", []):
        if "per_parameter" in state:  # optimizer_in_backward: one state per parameter
            if len(state["per_parameter"]) == len(order):
                del state["per_parameter"][slot]
        elif len(state.get("param_groups", ())) == 1 and len(state["param_groups"][0]["params"]) == len(order):
            ids = state["param_groups"][0]["params"]
            dropped = ids.pop(slot)
            renumber = {old: new for new, old in enumerate(ids)}
            state["param_groups"][0]["params"] = list(range(len(ids)))
            state["state"] = {renumber[key]: value for key, value in state["state"].items() if key != dropped}
