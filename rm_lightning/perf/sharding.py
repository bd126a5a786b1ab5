"""FSDP2 for reward modules, applied in ``configure_model`` under Lightning's ``ModelParallelStrategy``.

Each decoder layer becomes its own FSDP unit (all-gathered just before it runs, freed right
after), and the reward module itself becomes the root unit holding everything else: embeddings,
final norm, LM head and any reward head.

The root is the LightningModule rather than the HF model because no RM type calls the HF
model's ``forward``: rewards come from ``hidden_states`` (the decoder only) followed by the LM
head or a reward head called directly. ``hidden_states`` is therefore registered as the root's
forward method, and the root keeps its parameters gathered until backward
(``reshard_after_forward=False``), so the heads used after it see full weights. Tied input/output
embeddings (SmolLM2) live in that one root unit, as FSDP2 requires of shared parameters.

Mixed precision comes from the Lightning precision plugin (``precision: bf16-mixed`` is
autocast over fp32 weights), not from an FSDP ``MixedPrecisionPolicy``: the IM-RM reference
log-probs are computed under the same autocast before sharding, so the implicit rewards of the
initial model stay exactly zero.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from rm_lightning.errors import RMLightningError

ROOT_FORWARD_METHOD = "hidden_states"


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh to shard over; refuse a tensor-parallel split that nothing here would use."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise RMLightningError(
            f"ModelParallelStrategy: tensor_parallel_size={mesh['tensor_parallel'].size()}, but rm-lightning "
            "shards with FSDP only; set strategy.init_args.data_parallel_size to the number of processes "
            "(devices x nodes) and tensor_parallel_size: 1 (see configs/trainer/fsdp.yaml)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of a HF causal LM, found without naming its architecture."""
    count = getattr(model.config, "num_hidden_layers", None)
    for child in model.base_model.modules():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return child
    raise RMLightningError(
        f"cannot shard backbone {type(model).__name__}: no list of {count} decoder layers found under "
        f"{type(model.base_model).__name__}"
    )


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded (FSDP2 ``DTensor``) tensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def unsharded_class(module: nn.Module) -> type:
    """The module's own class. ``fully_shard`` swaps a sharded module's class for a generated ``FSDP<Name>``
    subclass that lives in torch's FSDP package: neither the RM type to name nor a class path to import back."""
    if not is_sharded(module):
        return type(module)
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def class_path_of(module: nn.Module) -> str:
    """``<module>.<qualname>`` of the module's own class, sharded or not (what checkpoints and results record)."""
    cls = unsharded_class(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def shard_reward_module(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer, then the reward module as the root.

    Idempotent, because Lightning calls ``configure_model`` again for every ``fit``/``validate``/
    ``test`` on the same module. Activation checkpointing, when the module enabled it (HF
    gradient checkpointing, non-reentrant), wraps each layer's call including FSDP's hooks, which
    FSDP2 supports: the layer is gathered again for the recomputation in backward.
    """
    if is_sharded(module):
        return module
    shard_mesh = data_parallel_mesh(mesh)
    for layer in decoder_layers(module.model):
        fully_shard(layer, mesh=shard_mesh)
    fully_shard(module, mesh=shard_mesh, reshard_after_forward=False)
    register_fsdp_forward_method(module, ROOT_FORWARD_METHOD)
    return module


@contextmanager
def root_gathered(module: nn.Module) -> Iterator[None]:
    """The root unit's weights (embeddings, final norm, LM head) whole inside the block, for code that runs the
    HF model without the root's forward (``generate``); each decoder layer still gathers its own in its hooks.
    A module that is not sharded is left as it is."""
    if not is_sharded(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
