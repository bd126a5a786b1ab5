"""What a reward module does to its model once the trainer has placed it: shard, then compile."""

from __future__ import annotations

from rm_lightning.perf.compiled_layers import compile_decoder_layers
from rm_lightning.perf.sharding import shard_reward_module


def prepare_model(module, compile_layers: bool) -> None:
    """Shard with FSDP2 when the strategy supplies a device mesh (``ModelParallelStrategy``), then compile
    the decoder layers if asked.

    Lightning calls ``configure_model`` after ``setup``, so IM-RM's reference pass has run eagerly
    and unsharded by then. Both steps are idempotent: ``configure_model`` runs again for every
    ``fit``/``validate``/``test`` on the same module.
    """
    if module.device_mesh is not None:
        shard_reward_module(module, module.device_mesh)
    if compile_layers:
        compile_decoder_layers(module.model)
