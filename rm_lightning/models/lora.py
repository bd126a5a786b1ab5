"""LoRA through ``peft`` for every RM type: low-rank adapters in the backbone, the backbone itself frozen.

The adapters are injected into the backbone in place (``peft.inject_adapter_in_model``), not by
wrapping it in a ``PeftModel``: the module tree stays the one every other part of rm-lightning
walks (``model.base_model`` is still the decoder the packed layout runs, ``model.model.layers``
what sharding and compilation find), only the targeted ``nn.Linear`` layers become LoRA layers
that hold the frozen original as ``base_layer``. With ``target_modules: all-linear`` peft skips
the output layer, so an EX-GRM's and an IM-RM's LM head stays frozen; an EX-RM's head lives
outside the backbone and trains in full.

LoRA's B matrices start at zero, so an adapted model computes exactly what the base model does
until the first update. An IM-RM's reference is the base model itself, run with the adapters
switched off (``adapters_disabled``): no second copy of the model is ever held.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from rm_lightning.errors import SettingError

LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def lora_settings(options: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``options`` (the ``lora`` init arg, checked by ``rm_lightning.settings``) over the defaults; None: no LoRA."""
    return None if options is None else {**LORA_DEFAULTS, **options}


def apply_lora(model: nn.Module, options: dict[str, Any]) -> None:
    """Inject LoRA adapters into ``model`` in place; only the adapters are left trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    settings = lora_settings(options)
    target = settings["target_modules"]
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=target if isinstance(target, str) else list(target), bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # peft's "Target modules {...} not found": names only the model can check
        linear = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                         if isinstance(module, nn.Linear)})
        raise SettingError(f"model.init_args.lora.target_modules: {str(err).splitlines()[0]} (its linear layers: "
                           f"{', '.join(linear)}; or all-linear)") from None


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA (peft tuner) layers of ``model``; empty without adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there can be no adapters
        return []
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_layers(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing as its base model (every adapter off) for the block; a no-op without adapters.

    peft's own switch (``enable_adapters``) also turns ``requires_grad`` off and back on for the
    adapters; their flags are restored here as they were, so an optimizer's view never changes.
    """
    layers = adapter_layers(model)
    flags = [(param, param.requires_grad) for layer in layers for param in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without adapter weights, under the names it had before LoRA was injected:
    the weights of the base model (an IM-RM's reference), whatever the adapters have learned."""
    if not has_adapters(model):
        return model.state_dict()
    return {name.replace(".base_layer.", "."): tensor for name, tensor in model.state_dict().items()
            if ".lora_" not in name}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into the weight it adapts and put the plain layer back, in place: a model with the
    adapted weights and no LoRA layers, as a Hugging Face folder holds one (``models/export.py``)."""
    adapters = {id(layer) for layer in adapter_layers(model)}
    for name, layer in [(name, m) for name, m in model.named_modules() if id(m) in adapters]:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model
