"""What a preference pair is, as text and as token ids, and the shift tags that place an eval set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union, get_args

import torch
from torch.utils.data import Dataset

from rm_lightning.errors import DataError

# How an eval set relates to the training data (paper §5.2): a sample of the training pairs themselves
# (the paper's training accuracy), the same distribution, the same content in other tokens (paraphrase,
# translation), or another domain (math, code).
ShiftTag = Literal["training", "in_distribution", "token_shift", "domain_shift"]
SHIFT_TAGS: tuple[str, ...] = get_args(ShiftTag)


def check_shift_tag(tag: str) -> str:
    if tag not in SHIFT_TAGS:
        raise DataError(f"unknown shift tag {tag!r}; expected one of {', '.join(SHIFT_TAGS)}")
    return tag


@dataclass(frozen=True)
class Turn:
    """One message of a conversation (TRL's conversational format: ``{"role": ..., "content": ...}``)."""

    role: str
    content: str

    def as_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


# A prompt is a string (one user turn) or a conversation: a tuple of turns (system/user/assistant...)
# that the response continues. A tuple keeps pairs hashable (duplicates are counted by value).
Prompt = Union[str, tuple[Turn, ...]]


def prompt_text(prompt: Prompt) -> str:
    """The raw text of a prompt: a string as it is, a conversation's contents one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(turn.content for turn in prompt)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (a string, or a conversation of ``Turn`` s) and two responses to it, the first preferred.

    ``margin``: how strongly ``chosen`` is preferred (a per-pair number some datasets carry, e.g.
    a rating difference); the BT loss reads it as ``batch["margin"]`` when every pair of a batch has one.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    source: str = field(default="", compare=False)  # where it came from (``file:line``), for error messages
    margin: float | None = None


@dataclass(frozen=True)
class ResponseRecord:
    """One response to a prompt, with no preference: ``predict`` gives it one reward."""

    prompt: str
    response: str
    source: str = field(default="", compare=False)  # ``file:line``


@dataclass
class EncodedPair:
    """Token ids of one pair. ``*_start`` is the index of the first response token."""

    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int
    reference_logps: tuple[float, float] | None = None  # filled by the IM-RM reference cache
    # final hidden states (chosen [len, H], rejected [len, H]) of a frozen backbone, computed once
    hidden_states: tuple[torch.Tensor, torch.Tensor] | None = None
    margin: float | None = None  # the pair's ``PreferencePair.margin``, carried to ``batch["margin"]``

    def __len__(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


class EncodedPairs(Dataset):
    """A named, already tokenized set of pairs (tokenized once in the data module's ``setup``)."""

    def __init__(self, name: str, pairs: list[EncodedPair], tag: str = "in_distribution", dropped: int = 0,
                 screened: dict[str, int] | None = None, texts: Sequence[PreferencePair] | None = None,
                 positions: Sequence[int] | None = None):
        self.name, self.pairs, self.tag, self.dropped = name, pairs, check_shift_tag(tag), dropped
        self.screened = dict(screened or {})  # pairs per screening rule (``pairs/screening.py``)
        # the text each encoded pair came from (after screening and caps), same order: predictions write prompts
        self.texts = list(texts) if texts is not None else None
        # each kept item's position among the items its source gave, dropped ones counted (a file's record
        # number): what predictions call ``index``, so that they join with the file; None: 0, 1, 2, ...
        self.positions = list(positions) if positions is not None else None

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


class EncodedResponses(EncodedPairs):
    """Single responses laid out as pairs, so they take the one collation and forward path.

    Pair ``k`` holds responses ``2k`` (chosen row) and ``2k + 1`` (rejected row); an odd last response
    is paired with itself. Every RM type's reward of a row depends on that row alone, so each row's
    reward is its response's. ``texts`` are the ``ResponseRecord`` s, one per response.
    """

    def __init__(self, name: str, responses: list[tuple[list[int], int]], tag: str = "in_distribution",
                 dropped: int = 0, screened: dict[str, int] | None = None,
                 texts: Sequence[ResponseRecord] | None = None, positions: Sequence[int] | None = None):
        super().__init__(name, pair_up(responses), tag, dropped, screened, texts, positions)
        self.num_responses = len(responses)


def pair_up(responses: Sequence[tuple[list[int], int]]) -> list[EncodedPair]:
    """(token ids, response start) per response -> pairs of consecutive responses (see ``EncodedResponses``)."""
    padded = list(responses) + list(responses[-1:]) * (len(responses) % 2)
    return [EncodedPair(list(a[0]), a[1], list(b[0]), b[1]) for a, b in zip(padded[0::2], padded[1::2])]


def unpair(chosen: torch.Tensor, rejected: torch.Tensor, count: int) -> torch.Tensor:
    """Rewards of ``count`` responses laid out by ``pair_up``, in their original order."""
    return torch.stack([chosen, rejected], dim=1).reshape(-1)[:count]


def present_fields(record: dict, missing: str) -> str:
    """The record's field names, for a message about ``missing``: a name with spaces around it (a CSV header
    written "prompt, chosen, rejected") is quoted, and said to be one when it is ``missing`` but for them, since
    ``has:  chosen`` hid the space that made it another name."""
    names = sorted(map(str, record))
    shown = ", ".join(repr(name) if name != name.strip() else name for name in names) or "nothing"
    near = next((name for name in names if name != missing and name.strip() == missing), None)
    return shown + (f"; {near!r} has spaces around it" if near is not None else "")


def check_text_fields(record: dict, fields: Sequence[str], where: str) -> None:
    """Fail with the location when a record lacks a field or holds a non-string in it."""
    for name in fields:
        if name not in record:
            raise DataError(f"{where}: missing field '{name}' (has: {present_fields(record, name)})")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}")
