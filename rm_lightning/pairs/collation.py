"""Encoded pairs -> one batch of 2B rows (chosen, then rejected), so one forward serves both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rm_lightning.pairs.records import EncodedPair


@dataclass
class PairCollator:
    """Stack chosen then rejected rows, right-padded; ``response_mask`` marks response tokens.

    ``last_index`` is each row's last real token (EX-RM and EX-GRM read there). When every pair
    carries cached reference log-probs (IM-RM), they ride along as ``reference_logps``; when every
    pair carries the hidden states of a frozen backbone, as ``hidden_states`` [2B, T, H]; when
    every pair carries a ``margin`` (a per-pair column of the data), as ``margin`` [B] (float32,
    one per pair, not per row: the BT loss reads it).
    """

    pad_token_id: int

    def __call__(self, pairs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        starts = [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs]
        width = max(len(s) for s in sequences)
        rows = len(sequences)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        response_mask = torch.zeros((rows, width), dtype=torch.bool)
        for row, (ids, start) in enumerate(zip(sequences, starts)):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
            response_mask[row, start:len(ids)] = True
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
            "response_mask": response_mask,
            "last_index": torch.tensor([len(ids) - 1 for ids in sequences], dtype=torch.long),
        }
        if all(p.reference_logps is not None for p in pairs):
            batch["reference_logps"] = torch.tensor(
                [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs], dtype=torch.float64
            )
        if all(p.margin is not None for p in pairs):
            batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        if all(p.hidden_states is not None for p in pairs):
            states = [p.hidden_states[0] for p in pairs] + [p.hidden_states[1] for p in pairs]
            hidden = states[0].new_zeros(rows, width, states[0].shape[-1])
            for row, row_states in enumerate(states):
                hidden[row, :len(row_states)] = row_states
            batch["hidden_states"] = hidden
        return batch
