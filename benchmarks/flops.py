"""Useful model FLOPs of one training step, the numerator of model-FLOP utilization (MFU).

"Useful" means the work any correct implementation of the RM type must do on the batch's
real tokens, each pair's common prefix counted once: a chosen and a rejected row that start
with the same tokens have the same hidden states there, so computing them twice is not
needed (``rm_lightning.pair_packing`` does not). Every variant of one (batch, RM type) is
credited the same amount, so MFU ratios equal throughput ratios. Counted, per real (non-pad)
token of each row, forward:

* ``2 * P`` for the decoder's matmuls, with ``P`` its parameters without the token embedding;
  a rejected row's tokens inside its pair's common prefix are not counted again;
* ``4 * hidden * t`` per layer for causal attention at position ``t`` (QK^T and AV);
* the output head where the RM reads it: IM-RM the LM head (``2 * hidden * vocab``) at each
  position that predicts a response token, EX-GRM the LM head at the last position of each
  row, EX-RM its ``hidden -> 1`` head at the last position.

Training is 3x the forward (backward costs two forwards). Not counted: a reference-model
forward (cacheable, since the reference is frozen), LM-head work at positions nobody reads,
padding, embedding lookups, norms and elementwise work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from rm_lightning.perf.packed_pairs import lay_out_pairs


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    vocab: int
    decoder_params: int  # matmul parameters of the decoder: everything but the token embedding

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        config = model.config
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        seen, decoder_params = set(), 0
        for param in model.parameters():
            if id(param) in seen or param is embedding or param is head:
                continue
            seen.add(id(param))
            decoder_params += param.numel()
        return cls(config.num_hidden_layers, config.hidden_size, embedding.shape[0], decoder_params)


def decoder_linear_shapes(model: torch.nn.Module) -> list[list[int]]:
    """``[fan_in, fan_out, count]`` of the decoder's linear layers (the output head left out): the
    matmuls every token of every RM type goes through, forward and backward."""
    head = model.get_output_embeddings()
    shapes = Counter(
        (layer.in_features, layer.out_features) for layer in model.modules()
        if isinstance(layer, torch.nn.Linear) and layer is not head
    )
    return [[fan_in, fan_out, count] for (fan_in, fan_out), count in sorted(shapes.items())]


def head_positions(rm_type: str, batch: dict[str, torch.Tensor]) -> int:
    """How many positions the RM type's output head must read."""
    if rm_type == "imrm":
        return int(batch["response_mask"][:, 1:].sum())
    return int(batch["attention_mask"].shape[0])


def distinct_rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(real tokens, leading tokens shared with the pair's chosen row) of every row; chosen rows share 0."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    skipped, _, _ = lay_out_pairs(torch.split(batch["input_ids"][mask], lengths))
    return list(zip(lengths, skipped))


def distinct_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens once each pair's common prefix is counted once: the rows the decoder's matmuls need."""
    return sum(length - shared for length, shared in distinct_rows(batch))


def linear_layers_training_flops(shapes: list[list[int]], tokens: int) -> float:
    """Forward and backward FLOPs of the linear layers ``shapes`` (``decoder_linear_shapes``) on ``tokens`` rows."""
    return 6 * tokens * sum(fan_in * fan_out * count for fan_in, fan_out, count in shapes)


def useful_training_flops(shape: ModelShape, rm_type: str, batch: dict[str, torch.Tensor]) -> float:
    forward = 0.0
    for length, shared in distinct_rows(batch):
        forward += 2 * shape.decoder_params * (length - shared)
        # a token at position t attends to t + 1 keys
        forward += 4 * shape.hidden * shape.layers * (length * (length + 1) - shared * (shared + 1)) / 2
    head_width = 1 if rm_type == "exrm" else shape.vocab
    forward += 2 * shape.hidden * head_width * head_positions(rm_type, batch)
    return 3 * forward
