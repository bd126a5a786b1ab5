"""Batches of similar length, dealt whole to each process."""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional, Sequence

from torch.utils.data import DataLoader, DistributedSampler


class LengthBucketSampler(DistributedSampler):
    """Yield indices so that consecutive ``batch_size`` blocks have similar lengths.

    Compute then follows real tokens rather than the longest row of a random batch. Indices are
    shuffled, cut into pools of ``pool_batches`` batches, sorted by length inside each pool and
    split into batches, whose order is shuffled again (seed + epoch). Whole batches are dealt to
    ranks, so it is its own distributed sampler (Lightning leaves a ``DistributedSampler`` alone);
    the one short batch, if any, stays last so a ``DataLoader(batch_size=...)`` cuts the same blocks.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 pool_batches: int = 50, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths, self.batch_size, self.pool_batches = list(lengths), batch_size, pool_batches
        self.first_batch = 0  # where the next pass begins (ResumableLoader: a fit resumed inside an epoch)

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch."""
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        pool = self.batch_size * self.pool_batches
        if not self.shuffle:
            pool = len(order) or 1
        ordered = []
        for begin in range(0, len(order), pool):
            ordered += sorted(order[begin:begin + pool], key=lambda i: self.lengths[i])
        batches = [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if self.shuffle:
            rng.shuffle(batches)
        batches += short
        per_rank = -(-len(batches) // self.num_replicas)
        # equal step counts on all ranks: batches repeated, cyclically where ranks outnumber them
        missing = per_rank * self.num_replicas - len(batches)
        batches += [batches[i % len(batches)] for i in range(missing)]
        return batches[self.rank::self.num_replicas]

    def is_repeated(self, step: int) -> bool:
        """Whether this rank's ``step``-th batch is one of the copies dealt after the real batches."""
        real_batches = -(-len(self.lengths) // self.batch_size)
        return self.num_replicas > 1 and step * self.num_replicas + self.rank >= real_batches

    def __iter__(self) -> Iterator[int]:
        first, self.first_batch = self.first_batch, 0
        return iter([index for batch in self.batches()[first:] for index in batch])

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches())


class ResumableLoader(DataLoader):
    """A training loader that a fit resumed inside an epoch continues at the batch it stopped before.

    Lightning keeps the ``state_dict`` of a loader that has one in the checkpoint, and loads it before
    iterating when a fit restarts inside an epoch; a plain loader starts that epoch over, training its
    first batches again and never its last ones, where a run never stopped would train the last ones.
    The state is the epoch and how many of its batches this loader handed out; the sampler then skips
    them by index, loading nothing. Iterating is deferred to the first batch, so the sampler's order is
    that of the epoch Lightning has set by then (``set_epoch`` comes after Lightning's first ``iter``;
    worker processes would otherwise take their first indices from the previous epoch's order).

    Args: those of ``DataLoader``, whose ``sampler`` must be a ``LengthBucketSampler``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, LengthBucketSampler):
            raise TypeError(f"ResumableLoader needs a LengthBucketSampler, got {type(self.sampler).__name__}")
        self._position: dict[str, Any] = {"epoch": self.sampler.epoch, "batches": 0}
        self._resume: Optional[dict[str, Any]] = None

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        resume, self._resume = self._resume, None
        first = resume["batches"] if resume is not None and resume.get("epoch") == epoch else 0
        self.sampler.first_batch = first
        self._position = {"epoch": epoch, "batches": first}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Begin the next pass at the saved batch, if that pass is of the saved epoch (a checkpoint from an
        epoch's end is followed by the next epoch, from its first batch)."""
        self._resume = dict(state_dict)


def is_repeated_batch(sampler, step: int) -> bool:
    """Whether this rank's ``step``-th batch only pads the rank to an equal step count.

    Evaluation leaves such copies out of the metrics, so every pair counts once, as in a 1-process run.
    """
    return isinstance(sampler, LengthBucketSampler) and sampler.is_repeated(step)
