"""Where real-world preference pairs come from (paper §5.2): local JSONL files or the hub.

A source is a small dataclass (``PairSource``; ``EvalSetSource`` adds a shift tag) so that a
YAML config can name each set in a line. Hub records are turned into pairs by plain functions
(``ultrafeedback_pair``, ``rewardmath_pair``, ``rewardbench_pair``), kept separate from the
download so they can be checked without a network.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from data_modules.jsonl import located_jsonl
from rm_lightning.errors import DataError
from rm_lightning.pairs import PreferencePair, ResponseRecord, ShiftTag, check_text_fields

HubName = Literal["ultrafeedback", "rewardmath", "rewardbench_math", "rewardbench_code"]

# The authors' rule: drop UltraFeedback prompts that contain "translate" or "translation" in any case
# (so also "Translated", "translations"), because the translated eval sets would otherwise test a
# skill the training data asks for. "translating" or "traduire" are kept, as in their data.
TRANSLATION_PROMPT = re.compile(r"translat(e|ion)", re.IGNORECASE)


def is_translation_prompt(prompt: str) -> bool:
    return TRANSLATION_PROMPT.search(prompt) is not None


# --- hub records -> pairs ----------------------------------------------------------------------


def assistant_reply(messages, where: str, field: str) -> str:
    """The text of the last assistant turn of an UltraFeedback message list."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: field '{field}' must be a list of chat messages, got {type(messages).__name__}")
    replies = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not replies or not isinstance(replies[-1], str):
        raise DataError(f"{where}: field '{field}' has no assistant message with text content")
    return replies[-1]


def ultrafeedback_pair(record: dict, where: str = "ultrafeedback record") -> PreferencePair | None:
    """A pair from a ``HuggingFaceH4/ultrafeedback_binarized`` record, or None when filtered out.

    Kept: score_chosen > score_rejected (ties carry no preference) and no translation prompt.
    """
    check_text_fields(record, ("prompt",), where)
    for field in ("score_chosen", "score_rejected"):
        if not isinstance(record.get(field), (int, float)):
            raise DataError(f"{where}: field '{field}' must be a number, got {record.get(field)!r}")
    if record["score_chosen"] <= record["score_rejected"] or is_translation_prompt(record["prompt"]):
        return None
    return PreferencePair(record["prompt"], assistant_reply(record.get("chosen"), where, "chosen"),
                          assistant_reply(record.get("rejected"), where, "rejected"), where)


def _solution_text(steps, where: str, field: str) -> str:
    if isinstance(steps, str):
        return steps
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: field '{field}' must be a list of solution steps (strings)")
    return " ".join(steps)


def rewardmath_pair(record: dict, where: str = "rewardmath record") -> PreferencePair:
    """A pair from a ``RewardMATH/RewardMATH_pairwise`` record: solutions are step lists joined by spaces."""
    check_text_fields(record, ("problem",), where)
    position = record.get("chosen_position")
    if position not in ("A", "B"):
        raise DataError(f"{where}: field 'chosen_position' must be 'A' or 'B', got {position!r}")
    other = "B" if position == "A" else "A"
    chosen = _solution_text(record.get(f"eval_solution_{position}"), where, f"eval_solution_{position}")
    rejected = _solution_text(record.get(f"eval_solution_{other}"), where, f"eval_solution_{other}")
    return PreferencePair(record["problem"], chosen, rejected, where)


def rewardbench_pair(record: dict, where: str = "reward-bench record") -> PreferencePair:
    check_text_fields(record, ("prompt", "chosen", "rejected"), where)
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], where)


def _rewardbench_subset(accept: Callable[[str], bool]) -> Callable[[dict, str], PreferencePair | None]:
    def convert(record: dict, where: str) -> PreferencePair | None:
        return rewardbench_pair(record, where) if accept(str(record.get("subset", ""))) else None
    return convert


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset, its default split and how one of its records becomes a pair (None: skip it)."""

    dataset_id: str
    default_split: str
    convert: Callable[[dict, str], PreferencePair | None]


HUB_DATASETS: dict[str, HubDataset] = {
    "ultrafeedback": HubDataset("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", ultrafeedback_pair),
    "rewardmath": HubDataset("RewardMATH/RewardMATH_pairwise", "test", rewardmath_pair),
    "rewardbench_math": HubDataset("allenai/reward-bench", "filtered", _rewardbench_subset(lambda s: s == "math-prm")),
    "rewardbench_code": HubDataset("allenai/reward-bench", "filtered",
                                   _rewardbench_subset(lambda s: s.startswith("hep-"))),
}


def load_hub_rows(dataset_id: str, split: str) -> list[dict]:
    """Rows of a hub split; any failure (offline, unknown split, no ``datasets``) ends in one DataError line."""
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset_id, split=split)
    except Exception as err:  # noqa: BLE001 - network, hub and package errors all mean "use a local file"
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise DataError(f"cannot load hub dataset {dataset_id} (split {split}): {type(err).__name__}"
                        f"{': ' + reason if reason else ''}; without internet, pass a local JSONL with "
                        f"prompt/chosen/rejected as `path` instead of `hub`") from None
    return [dict(row) for row in rows]


def load_hub_pairs(name: str, split: Optional[str] = None) -> list[PreferencePair]:
    if name not in HUB_DATASETS:
        raise DataError(f"unknown hub source {name!r}; expected one of {', '.join(HUB_DATASETS)}")
    hub = HUB_DATASETS[name]
    split = split or hub.default_split
    pairs = []
    for number, record in enumerate(load_hub_rows(hub.dataset_id, split), start=1):
        pair = hub.convert(record, f"{hub.dataset_id}[{split}] row {number}")
        if pair is not None:
            pairs.append(pair)
    return pairs


# --- local files -------------------------------------------------------------------------------


def load_jsonl_pairs(path: str) -> list[PreferencePair]:
    """Pairs of a JSONL file with string fields prompt/chosen/rejected (relative paths: under the data root)."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], where)
            for where, r in located_jsonl(path, ("prompt", "chosen", "rejected"))]


def load_jsonl_responses(path: str) -> list[ResponseRecord]:
    """Single responses of a JSONL file with string fields prompt/response (no preference: scored, not evaluated)."""
    return [ResponseRecord(r["prompt"], r["response"], where) for where, r in located_jsonl(path, ("prompt", "response"))]


def subsample(pairs: list[PreferencePair], limit: Optional[int], seed: int) -> list[PreferencePair]:
    """``limit`` pairs drawn without replacement, in their original order.

    The draw depends only on (seed, len(pairs), limit), so files whose rows are aligned (UltraFeedback
    and its paraphrased/translated variants) keep the same rows when given the same limit.
    """
    if limit is None or limit >= len(pairs):
        return list(pairs)
    if limit < 1:
        raise DataError(f"limit must be at least 1 (or null for all pairs), got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in chosen]


@dataclass
class PairSource:
    """One set of pairs: a local JSONL ``path`` or a ``hub`` dataset (exactly one).

    Args:
        path: JSONL with prompt/chosen/rejected; relative paths are resolved under the data root
            (``$RM_LIGHTNING_DATA``, default ``../shared/data``), e.g. ``ultrafeedback/train.jsonl``.
        hub: ``ultrafeedback`` (filtered as in the paper), ``rewardmath``, ``rewardbench_math``
            (subset math-prm) or ``rewardbench_code`` (subsets hep-*). Needs internet. The hub has no
            train/test split for RewardMATH and RewardBench: prefer the prepared local files there.
        split: hub split; default train_prefs (UltraFeedback), test (RewardMATH), filtered (RewardBench).
        limit: keep this many pairs, drawn with the data module's ``data_seed``; null keeps all. The
            draw comes before the length caps, so pairs dropped as over-long leave fewer.
    """

    path: Optional[str] = None
    hub: Optional[HubName] = None
    split: Optional[str] = None
    limit: Optional[int] = None

    def describe(self) -> str:
        return self.path if self.path else f"hub:{self.hub}[{self.split or HUB_DATASETS[self.hub].default_split}]"

    def load(self, seed: int = 0) -> list[PreferencePair]:
        if (self.path is None) == (self.hub is None):
            raise DataError(f"a pair source needs exactly one of `path` or `hub` (got path={self.path!r}, "
                            f"hub={self.hub!r}); an override merges into the config's set, so set the other to null")
        pairs = load_jsonl_pairs(self.path) if self.path else load_hub_pairs(self.hub, self.split)
        if not pairs:
            raise DataError(f"{self.describe()}: no pairs left after filtering")
        return subsample(pairs, self.limit, seed)


SetKind = Literal["pairs", "responses"]


@dataclass
class EvalSetSource(PairSource):
    """A named eval set's source plus how it relates to the training data (its shift tag).

    ``kind: responses`` reads a JSONL of prompt/response records instead of pairs: ``predict`` gives
    each response one reward; ``validate``/``test`` skip such a set (a lone response has no accuracy).
    """

    tag: ShiftTag = "in_distribution"
    kind: SetKind = "pairs"

    def load_responses(self, seed: int = 0) -> list[ResponseRecord]:
        if self.hub is not None or self.path is None:
            raise DataError(f"a set of kind 'responses' needs a local JSONL `path` with prompt/response fields "
                            f"(got path={self.path!r}, hub={self.hub!r})")
        return subsample(load_jsonl_responses(self.path), self.limit, seed)
