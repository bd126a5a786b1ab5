"""``torch.compile`` of each decoder layer: the ``compile_layers`` option of every reward module.

Compiling a layer fuses its elementwise work (norms, rotary embeddings, activations, the
casts autocast inserts) into a few generated kernels and removes most per-op dispatch; the
matmuls stay library calls. Layers rather than the whole decoder, because every layer of a
model has the same code, so one compiled graph serves all of them (compiled once per process).
The packed attention between a layer's projections stays eager
(``packed_pairs.grouped_segment_attention``): its number of attention groups and their sizes
change from batch to batch, and compiled it would recompile the layer for most new batches of
a varied dataset. So only the first batch of a second length compiles again, with dynamic
shapes, and so does the first evaluation batch (no gradients); after that batches of any
length reuse the graphs. What it gains depends on the machine (``benchmarks/README.md``):
little on a CPU, where the matmuls dominate, more on a GPU.

Inductor's CPU backend needs a C++ compiler at run time; on a GPU it generates Triton kernels.
Compiled kernels round differently from eager ones, so an untrained IM-RM's rewards are 0 up
to float rounding instead of exactly 0.
"""

from __future__ import annotations

from torch import nn

from rm_lightning.perf.sharding import decoder_layers


def is_compiled(layer: nn.Module) -> bool:
    return getattr(layer, "_compiled_call_impl", None) is not None


def compile_decoder_layers(model: nn.Module) -> None:
    """Compile every decoder layer of the HF causal LM ``model`` in place (idempotent).

    In place (``nn.Module.compile``) keeps parameter names, so checkpoints, FSDP sharding
    and activation checkpointing see the same modules as without compiling.
    """
    for layer in decoder_layers(model):
        if not is_compiled(layer):
            layer.compile()
