"""``torch.compile`` of each decoder layer: the option ``compile_layers`` of every reward module.

Compiling a layer fuses its elementwise work (norms, rotary embeddings, activations, the
casts autocast inserts) into a few generated kernels and removes most per-op dispatch; the
matmuls stay library calls. Layers rather than the whole decoder, because every layer of a
model has the same code, so one compiled graph serves all of them (seconds to tens of seconds
to compile on a CPU, once per process). The packed attention between a layer's projections
stays eager (``pair_packing.grouped_segment_attention``): its number of attention groups and
their sizes change from batch to batch, and compiled they recompiled the layer for most new
batches of a varied dataset (six 45-second compiles in one short UltraFeedback epoch). So
only the first batch of a second length compiles again, with dynamic shapes, and so does the
first evaluation batch (no gradients); after that batches of any length reuse the graphs.

Measured on a 2-core CPU (SmolLM2-135M, Persona batch of 8 pairs, bf16 autocast, eager and
compiled steps alternated in one process): IM-RM steps 7% faster, EX-RM 1%. With the
attention compiled too they were 12% and 7%, which did not pay for the recompiles. On an H100
(a 1B model over 128 Persona pairs, bf16), where elementwise work is a larger share of a step,
it cut EX-RM steps from 0.23 to 0.17 s and EX-GRM from 0.32 to 0.24 s, but IM-RM went from
0.24 to 0.28 s, for a reason not yet found (``benchmarks/README.md``). Inductor's CPU backend needs a C++ compiler at run time; on a GPU it
generates Triton kernels. Compiled kernels round differently from eager ones, so an
untrained IM-RM's rewards are 0 up to float rounding instead of exactly 0.
"""

from __future__ import annotations

from torch import nn

from rm_lightning.sharding import decoder_layers


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
