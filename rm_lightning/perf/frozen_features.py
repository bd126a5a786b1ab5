"""Hidden states of a frozen backbone, computed once per distinct sequence instead of once per step.

With ``trainable: output_layer`` nothing below the output layer learns, so every sequence's
final hidden states are the same at every step and epoch. They are computed in one pass before
training and carried by each pair; the collator hands them to the batch as ``hidden_states``,
and the reward module reads them instead of running the decoder. Training then costs a few
small matmuls a step, which is what lets Theorem 2's runs go to convergence on a CPU.

A sequence that occurs in several pairs or sets (a training pair is also in the set that
re-evaluates the training prompts; a paraphrased response recurs across the 2x2 pairs of its
prompt) is computed once. Distinct sequences are sorted, so that sequences of one prompt sit
next to each other, and run two at a time as a pair of the packed layout, which computes
their common prompt once.
"""

from __future__ import annotations

from typing import Iterable

import torch

from rm_lightning.pairs.records import EncodedPair, EncodedPairs
from rm_lightning.perf.by_prompt import collated_batches
from rm_lightning.perf.weight_casts import evaluation_forward


def distinct_sequences(datasets: Iterable[EncodedPairs]) -> list[tuple[int, ...]]:
    """Every chosen and rejected token sequence of pairs still without features, once, sorted."""
    sequences = set()
    for dataset in datasets:
        for pair in dataset.pairs:
            if pair.hidden_states is None:
                sequences.update((tuple(pair.chosen_ids), tuple(pair.rejected_ids)))
    return sorted(sequences)


@torch.no_grad()
def attach_frozen_features(module, datasets: Iterable[EncodedPairs], batch_size: int = 16) -> None:
    """Give every pair of ``datasets`` its chosen and rejected final hidden states (CPU, float32)."""
    datasets = list(datasets)
    sequences = distinct_sequences(datasets)
    if not sequences:
        return
    neighbours = [EncodedPair(list(a), len(a), list(b), len(b))  # two sequences a batch pair; no response needed
                  for a, b in zip(sequences[0::2], sequences[1::2] + sequences[-1:] * (len(sequences) % 2))]
    trainer = getattr(module, "_trainer", None)
    show = trainer is None or trainer.is_global_zero
    was_training = module.model.training
    module.model.eval()
    states: dict[tuple[int, ...], torch.Tensor] = {}
    batches = [list(range(begin, min(begin + batch_size, len(neighbours))))
               for begin in range(0, len(neighbours), batch_size)]
    for members, batch in collated_batches(module, neighbours, batches, "frozen features", show):
        batch = {key: value.to(module.device) for key, value in batch.items()}
        with evaluation_forward(module):
            hidden = module.hidden_states(batch).float().cpu()
        count = len(members)
        for index, pair in enumerate(neighbours[member] for member in members):
            states[tuple(pair.chosen_ids)] = hidden[index, :len(pair.chosen_ids)].clone()
            states[tuple(pair.rejected_ids)] = hidden[count + index, :len(pair.rejected_ids)].clone()
    module.model.train(was_training)
    for dataset in datasets:
        for pair in dataset.pairs:
            if pair.hidden_states is None:
                pair.hidden_states = (states[tuple(pair.chosen_ids)], states[tuple(pair.rejected_ids)])

