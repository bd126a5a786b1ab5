"""Passes over several sets at once, the pairs of one prompt side by side.

The packed layout (``perf/packed_pairs.py``) computes a prefix once for every row of a batch that
holds it, but only within a batch. Persona's original and paraphrased sets share their prompts, and
Lightning runs them one loader at a time, so each prompt ran once per set. The IM-RM reference pass
(``models/reference_cache.py``) and the evaluation's rewards (``perf/eval_rewards.py``) instead run the
pairs of every set together in token-id order, which puts the pairs of one prompt next to each other,
in batches of up to ``PASS_BATCH_PAIRS`` pairs and ``PASS_BATCH_TOKENS`` tokens: larger batches share
each prompt across more pairs; the token bound keeps batches of long pairs (UltraFeedback's) near the
memory of a 16-pair batch.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rm_lightning.pairs.records import EncodedPair
from rm_lightning.perf.micro_batches import encoded_pair_tokens

PASS_BATCH_PAIRS = 64
PASS_BATCH_TOKENS = 16384


def pair_key(pair: EncodedPair) -> tuple:
    """What a pair's rewards and log-probs depend on: its token ids and where each response starts."""
    return tuple(pair.chosen_ids), pair.chosen_start, tuple(pair.rejected_ids), pair.rejected_start


def distinct_by_prompt(pairs: Iterable[EncodedPair]) -> list[EncodedPair]:
    """Each distinct pair (``pair_key``) once, sorted by token ids: the pairs of one prompt side by side."""
    distinct: dict[tuple, EncodedPair] = {}
    for pair in pairs:
        distinct.setdefault(pair_key(pair), pair)
    return sorted(distinct.values(), key=lambda pair: (pair.chosen_ids, pair.rejected_ids))


def consecutive_batches(pairs: list[EncodedPair], layout: str, max_pairs: int = PASS_BATCH_PAIRS,
                        max_tokens: int = PASS_BATCH_TOKENS) -> list[list[int]]:
    """Indices of ``pairs`` in runs of at most ``max_pairs`` pairs and ``max_tokens`` tokens (each pair's own,
    ``encoded_pair_tokens``: more than the batch runs once prompts are shared), a longer pair alone."""
    batches: list[list[int]] = []
    tokens = 0
    for index, pair in enumerate(pairs):
        size = encoded_pair_tokens(pair, layout)
        if batches and len(batches[-1]) < max_pairs and tokens + size <= max_tokens:
            batches[-1].append(index)
            tokens += size
        else:
            batches.append([index])
            tokens = size
    return batches


def collated_batches(module, pairs: list[EncodedPair], batches: list[list[int]], description: str,
                     show_progress: bool) -> Iterator[tuple[list[int], dict]]:
    """(pair indices, batch) for each of ``batches``, collated as ``module`` collates (on the CPU), behind a
    progress bar: what a pass over ``consecutive_batches`` iterates."""
    loader = DataLoader(pairs, batch_sampler=batches, collate_fn=module.collator())
    yield from zip(batches, tqdm(loader, desc=description, disable=not show_progress, leave=False))
