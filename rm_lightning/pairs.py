"""The one tokenization and collation path shared by every RM type.

A preference pair is text; an RM type only decides how (prompt, response) becomes a
(prefix, suffix) pair of strings (``RewardModule.format_texts``). Everything else, the length
caps, tokenization, padding and the concatenated chosen+rejected batch, lives here, so every
RM type sees exactly the same pairs and token boundaries.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from rm_lightning.errors import DataError

TextFormatter = Callable[[str, str], "tuple[str, str]"]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class EncodedPair:
    """Token ids of one pair. ``*_start`` is the index of the first response token."""

    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int
    reference_logps: tuple[float, float] | None = None  # filled by the IM-RM reference cache

    def __len__(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def chat_formatter(tokenizer) -> TextFormatter:
    """(prompt, response) -> (templated prompt with generation prompt, response suffix).

    With a chat template the response is whatever follows the prompt text in the templated
    conversation (PAPER.md's definition, and what TRL's chat templating trains on), so it keeps
    the end-of-turn token and any separator the template puts after it, e.g. SmolLM2's newline
    after ``<|im_end|>``. That choice matters for EX-RM, which reads the last token: on Persona
    with SmolLM2-135M (lr 1e-5, 3 epochs, seed 0) paraphrased test accuracy was 0.96 reading the
    newline with a normal head, but 0.88 reading ``<|im_end|>`` with a zero head (and 0.58 after
    two epochs with a normal one). Without a chat template, a plain User:/Assistant: format.
    """
    if not getattr(tokenizer, "chat_template", None):
        return lambda prompt, response: (f"User: {prompt}\nAssistant:", f" {response}")

    def format_with_template(prompt: str, response: str) -> tuple[str, str]:
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if response == "":
            return prefix, ""
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prefix):  # templates that rewrite earlier turns; fall back to appending
            return prefix, response
        return prefix, full[len(prefix):]

    return format_with_template


class PairEncoder:
    """Apply length caps on the raw texts, format, and tokenize a pair.

    Caps are measured on the raw prompt and responses (before any template), so EX-RM, IM-RM
    and EX-GRM keep exactly the same pairs. Over-long pairs are dropped, or, with
    ``truncate=True``, cut: prompts keep their end, responses their start, never to empty.
    """

    def __init__(self, tokenizer, formatter: TextFormatter, max_prompt_tokens: int | None = 512,
                 max_response_tokens: int | None = 512, truncate: bool = False):
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.truncate = truncate
        for name, limit in (("max_prompt_tokens", max_prompt_tokens), ("max_response_tokens", max_response_tokens)):
            if limit is not None and limit < 1:
                raise DataError(f"{name} must be a positive number of tokens or null, got {limit}")
        # Prefixes get BOS only when no chat template supplies its own special tokens.
        self._prefix_special = not getattr(tokenizer, "chat_template", None)

    def encode_all(self, pairs: Sequence[PreferencePair]) -> tuple[list[EncodedPair], int]:
        """Encode a set; returns (encoded pairs, number dropped by the length caps)."""
        encoded = [self.encode(pair) for pair in pairs]
        kept = [e for e in encoded if e is not None]
        return kept, len(encoded) - len(kept)

    def encode(self, pair: PreferencePair) -> EncodedPair | None:
        capped = self._apply_caps(pair)
        if capped is None:
            return None
        chosen_ids, chosen_start = self._tokenize(capped.prompt, capped.chosen)
        rejected_ids, rejected_start = self._tokenize(capped.prompt, capped.rejected)
        return EncodedPair(chosen_ids, chosen_start, rejected_ids, rejected_start)

    def _tokenize(self, prompt: str, response: str) -> tuple[list[int], int]:
        prefix, suffix = self.formatter(prompt, response)
        prefix_ids = self.tokenizer(prefix, add_special_tokens=self._prefix_special)["input_ids"]
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        return prefix_ids + suffix_ids, len(prefix_ids)

    def _apply_caps(self, pair: PreferencePair) -> PreferencePair | None:
        prompt = self._cap(pair.prompt, self.max_prompt_tokens, keep_end=True)
        chosen = self._cap(pair.chosen, self.max_response_tokens, keep_end=False)
        rejected = self._cap(pair.rejected, self.max_response_tokens, keep_end=False)
        if prompt is None or chosen is None or rejected is None:
            return None
        return PreferencePair(prompt, chosen, rejected)

    def _cap(self, text: str, limit: int | None, keep_end: bool) -> str | None:
        """``text`` within ``limit`` tokens, or None when the pair must go.

        Truncation cuts on token boundaries; a cut inside a multi-byte character can re-encode
        longer, so the cut moves until the decoded text fits. A text that would be left blank
        is not kept: an empty response is no response.
        """
        if limit is None:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text
        if not self.truncate:
            return None
        for keep in range(limit, 0, -1):
            piece = self.tokenizer.decode(ids[-keep:] if keep_end else ids[:keep])
            if len(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) <= limit:
                return piece if piece.strip() else None
        return None


class EncodedPairs(Dataset):
    """A named, already tokenized set of pairs (tokenized once in ``setup``)."""

    def __init__(self, name: str, pairs: list[EncodedPair], tag: str = "in_distribution", dropped: int = 0):
        self.name, self.pairs, self.tag, self.dropped = name, pairs, tag, dropped

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> EncodedPair:
        return self.pairs[index]

    def fingerprint(self) -> str:
        """Hash of the token ids: the data half of the reference-cache key."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            digest.update(repr((pair.chosen_ids, pair.chosen_start, pair.rejected_ids, pair.rejected_start)).encode())
        return digest.hexdigest()


@dataclass
class PairCollator:
    """Stack chosen then rejected into one batch of 2B rows, so one forward serves both.

    Position ids are derived from the attention mask, so rewards do not depend on the padding side.
    """

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, pairs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        starts = [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs]
        width = max(len(s) for s in sequences)
        rows = len(sequences)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        response_mask = torch.zeros((rows, width), dtype=torch.bool)
        for row, (ids, start) in enumerate(zip(sequences, starts)):
            offset = width - len(ids) if self.padding_side == "left" else 0
            input_ids[row, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, offset:offset + len(ids)] = 1
            response_mask[row, offset + start:offset + len(ids)] = True
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        last_index = torch.tensor(
            [(width - 1) if self.padding_side == "left" else len(ids) - 1 for ids in sequences], dtype=torch.long
        )
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "response_mask": response_mask, "last_index": last_index,
        }
        if all(p.reference_logps is not None for p in pairs):
            batch["reference_logps"] = torch.tensor(
                [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs], dtype=torch.float64
            )
        return batch


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
        batches += batches[: per_rank * self.num_replicas - len(batches)]  # equal step counts on all ranks
        return batches[self.rank::self.num_replicas]

    def is_repeated(self, step: int) -> bool:
        """Whether this rank's ``step``-th batch is one of the copies dealt after the real batches."""
        real_batches = -(-len(self.lengths) // self.batch_size)
        return self.num_replicas > 1 and step * self.num_replicas + self.rank >= real_batches

    def __iter__(self) -> Iterator[int]:
        return iter([index for batch in self.batches() for index in batch])

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches())


def check_text_fields(record: dict, fields: Sequence[str], where: str) -> None:
    """Fail with the location when a record lacks a field or holds a non-string in it."""
    for name in fields:
        if name not in record:
            raise DataError(f"{where}: missing field '{name}' (has: {', '.join(sorted(record)) or 'nothing'})")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}")
