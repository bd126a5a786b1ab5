"""One evaluation's rewards computed ahead of its loaders: every due set at once, by prompt.

Lightning runs the eval sets one loader at a time, so a prompt that several sets share (Persona's
original and paraphrased sets) ran once per set. At the start of a validation or test,
``EvalRewards.fill`` scores the rows of every batch the evaluation will run in one pass over all of
them, the pairs of one prompt side by side (``perf/by_prompt.py``), with the module's own
``rewards`` under the trainer's precision; each eval step then reads its rows' rewards back, keyed
by a row's tokens and where its response starts. A row's reward depends on that row alone, so the
values are the ones the step would compute, up to float rounding (other batches). Metrics, losses
and everything downstream of a step are unchanged.

Under several processes the ranks split the pass (every rank the same sets, each every n-th batch of
it) and then exchange their rewards. Sharded (FSDP) weights are gathered by all ranks together at every
forward, so there each rank runs as many forwards (``fill``); DDP's evaluation forwards synchronize
nothing. Where ``limit_val_batches`` cuts a set, each DDP rank scores ahead the rows of its own loaders
only (its sampler's indices); sharded weights then go batch by batch (the ranks' passes would differ in
length).

Only where that is safe (``why_not_ahead``): no token budget (``auto`` measures a training forward
inside the first evaluation), every weight trainable (no frozen features riding in the batches), a
loss computed from the rewards alone, and not in a sanity check (a few batches).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from rm_lightning.pairs.records import EncodedPair, EncodedPairs
from rm_lightning.perf.by_prompt import collated_batches, consecutive_batches, distinct_by_prompt
from rm_lightning.perf.sharding import is_sharded
from rm_lightning.perf.weight_casts import evaluation_forward


def why_not_ahead(module, trainer) -> Optional[str]:
    """Why ``module``'s evaluation computes its rewards batch by batch, or None when they may be computed ahead."""
    if trainer.sanity_checking:
        return "a sanity check"
    if module.hparams.token_budget is not None:
        return "a token budget"
    if module.hparams.trainable != "all":
        return "frozen layers"
    if not module.loss_from_rewards():
        return "a loss that is not a function of the rewards"
    return None


def evaluated_part(dataset: EncodedPairs, loader, batches: int) -> EncodedPairs:
    """The pairs of ``dataset`` that the first ``batches`` batches of ``loader`` hold (its whole set, or fewer
    under ``limit_val_batches``), in the loader's order."""
    return dataset if batches >= len(loader) else _first_batches(dataset, loader, batches)


def rank_part(dataset: EncodedPairs, loader, batches: int) -> EncodedPairs:
    """What this process evaluates of ``dataset``: ``evaluated_part`` in one process; under several, the pairs
    of this rank's first ``batches`` batches (its distributed sampler's indices, with the batches it repeats
    so that every rank runs as many steps)."""
    if getattr(loader.sampler, "num_replicas", 1) == 1:
        return evaluated_part(dataset, loader, batches)
    return _first_batches(dataset, loader, batches)


def _first_batches(dataset: EncodedPairs, loader, batches: int) -> EncodedPairs:
    indices = list(loader.sampler)[:batches * loader.batch_size]
    return EncodedPairs(dataset.name, [dataset.pairs[i] for i in indices], dataset.tag)


def row_keys_of_pair(pair: EncodedPair) -> tuple[tuple, tuple]:
    return (pair.chosen_start, *pair.chosen_ids), (pair.rejected_start, *pair.rejected_ids)


def row_keys_of_batch(batch: dict[str, torch.Tensor]) -> list[tuple]:
    """Each row's (response start, token ids ...), as ``row_keys_of_pair`` gives them before collation."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    responses = batch["response_mask"].cpu()
    starts = torch.where(responses.any(dim=1), responses.int().argmax(dim=1), torch.tensor(lengths)).tolist()
    ids = batch["input_ids"].cpu()
    return [(start, *ids[row, :length].tolist()) for row, (start, length) in enumerate(zip(starts, lengths))]


class EvalRewards:
    """Rewards of the rows an evaluation will run, by row key, filled at its start and cleared at its end."""

    def __init__(self):
        self.rewards: dict[tuple, float] = {}
        self.dtype: Optional[torch.dtype] = None

    def clear(self) -> None:
        self.rewards, self.dtype = {}, None

    def fill(self, module, datasets: list[EncodedPairs], show_progress: bool,
             share: Optional[tuple[int, int]] = None) -> None:
        """Score every row of ``datasets`` in one pass by prompt (the module in its evaluation loop: no
        gradients, its trainer's precision).

        With ``share`` = (rank, ranks), ``datasets`` being the same on every rank, each rank scores every
        ranks-th batch of the pass and the ranks then exchange their rewards, so that each ends with all
        of them: the pairs of a prompt stay together, in whichever rank's batch, and no row is scored twice.
        Sharded weights are gathered by all ranks at every forward, so there a rank with a batch fewer
        scores its first batch again: every rank runs as many forwards.
        """
        self.clear()
        pairs = distinct_by_prompt(pair for dataset in datasets for pair in dataset.pairs)
        if not pairs:
            return
        batches = consecutive_batches(pairs, module.hparams.decoder_layout)
        if share is not None:
            rank, ranks = share
            mine = batches[rank::ranks]
            if is_sharded(module) and len(mine) < -(-len(batches) // ranks):
                mine.append(batches[0])
            batches = mine
        names = ", ".join(dataset.name for dataset in datasets)
        with torch.no_grad():
            for members, batch in collated_batches(module, pairs, batches, f"rewards by prompt [{names}]",
                                                   show_progress):
                batch = {key: value.to(module.device) for key, value in batch.items()}
                with evaluation_forward(module):
                    rewards = module.rewards(batch)
                self.dtype = rewards.dtype
                chosen, rejected = rewards.double().cpu().chunk(2)  # exact for every reward dtype
                for pair, chosen_reward, rejected_reward in zip((pairs[i] for i in members), chosen.tolist(),
                                                                rejected.tolist()):
                    chosen_key, rejected_key = row_keys_of_pair(pair)
                    self.rewards[chosen_key], self.rewards[rejected_key] = chosen_reward, rejected_reward
        if share is not None:
            self._gather_from_ranks(share[1])

    def _gather_from_ranks(self, ranks: int) -> None:
        """Every rank's rewards on every rank (their reward dtype: that of any rank that scored a batch)."""
        parts: list = [None] * ranks
        dist.all_gather_object(parts, (self.rewards, self.dtype))
        self.rewards = {key: value for rewards, _ in parts for key, value in rewards.items()}
        self.dtype = next((dtype for _, dtype in parts if dtype is not None), None)

    def lookup(self, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The rewards [2B] of ``batch``'s rows when every one was scored ahead, else None."""
        if not self.rewards:
            return None
        try:
            values = [self.rewards[key] for key in row_keys_of_batch(batch)]
        except KeyError:
            return None
        return torch.tensor(values, dtype=torch.float64, device=batch["input_ids"].device).to(self.dtype)
