"""Where preference pairs come from: local files (JSONL, JSON, Parquet, CSV) or any hub dataset.

A source is a small dataclass (``PairSource``; ``EvalSetSource`` adds a shift tag) so that a
YAML config can name each set in a line. A record becomes a pair by plain functions, kept
separate from reading and downloading so they can be checked without a network:
``record_pair`` for any file or hub dataset in either of TRL's preference formats (standard
prompt/chosen/rejected strings, or conversational lists of role/content turns), with a column
mapping and an optional per-pair ``margin``; ``ultrafeedback_pair``, ``rewardmath_pair`` and
``rewardbench_pair`` for the four hub sets of the paper (§5.2), named by a short word.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from data_modules.files import located_records
from rm_lightning.errors import DataError
from rm_lightning.hub import offline_unless_reachable
from rm_lightning.pairs import PreferencePair, ResponseRecord, ShiftTag, Turn, check_text_fields
from rm_lightning.pairs.records import present_fields

# The paper's four hub sets, each with its own conversion; any other hub id is read with ``record_pair``.
HubName = Literal["ultrafeedback", "rewardmath", "rewardbench_math", "rewardbench_code"]
PairFormat = Literal["auto", "standard", "conversational"]
PAIR_FORMATS = ("auto", "standard", "conversational")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "margin")  # what ``columns`` may map
RESPONSE_COLUMNS = ("prompt", "response")  # the same for a set of kind ``responses``
ROLES = ("system", "user", "assistant")

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


# --- any record -> pair (TRL's standard and conversational preference formats) ---------------------


def _column(record: dict, field: str, columns: dict[str, str], where: str, required: bool = True) -> Any:
    """The value of ``field`` (under its mapped column name), or None when it is absent and not required."""
    name = columns.get(field, field)
    mapped = f" (the {field} column)" if name != field else ""
    if name not in record:
        if not required:
            return None
        raise DataError(f"{where}: missing field '{name}'{mapped} (has: {present_fields(record, name)})")
    if record[name] is None and required:
        raise DataError(f"{where}: field '{name}'{mapped} is empty")
    return record[name]


def _margin(record: dict, columns: dict[str, str], where: str) -> float | None:
    """The pair's margin: required when ``columns`` maps ``margin``, else read from a ``margin`` column if any."""
    value = _column(record, "margin", columns, where, required="margin" in columns)
    name = columns.get("margin", "margin")
    if value is None or (isinstance(value, str) and not value.strip() and "margin" not in columns):
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: field '{name}' must be a number, got {value!r}")
    try:
        margin = float(value)  # CSV cells are text
    except (TypeError, ValueError):
        raise DataError(f"{where}: field '{name}' must be a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    return margin


def _json_cell(value: Any, where: str, name: str, format: PairFormat) -> Any:
    """A text cell holding a JSON list of messages (how a CSV file holds a conversation) as that list; other
    values as they are.

    ``standard`` reads every cell as text. ``auto`` takes a cell for messages only when it is a JSON list of
    objects: ``[1, 2, 3]`` or ``["a", "b"]`` is an answer's text (code, math). ``conversational`` parses
    every cell that starts with ``[``, and one that is no JSON is an error.
    """
    if format == "standard" or not (isinstance(value, str) and value.lstrip().startswith("[")):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        if format == "conversational":
            raise DataError(f"{where}: field '{name}' is not a valid JSON list of messages ({err.msg})") from None
        return value
    if not isinstance(parsed, list):
        return value
    if format == "auto" and not (parsed and all(isinstance(message, dict) for message in parsed)):
        return value
    return parsed


def _turns(value: Any, where: str, name: str) -> tuple[Turn, ...]:
    """A list of ``{"role", "content"}`` messages as turns."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    turns = []
    for index, message in enumerate(value):
        at = f"{where}: field '{name}', message {index}"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        turns.append(Turn(role, content))
    return tuple(turns)


def _conversation_pair(prompt: Any, chosen: Any, rejected: Any, where: str, columns: dict[str, str],
                       margin: float | None) -> PreferencePair:
    """A pair from conversations: explicit (prompt turns + response turns) or implicit (whole conversations).

    Each response is appended to the prompt's turns (a string prompt is one user turn, a string
    response one assistant turn); the two conversations must then end in an assistant turn (the
    response) and agree on every turn before it (the prompt), as TRL's implicit-prompt extraction
    expects. A string prompt beside whole conversations (chosen holds user turns too) is a copy of
    their first turn, as in UltraFeedback binarized, and TRL ignores it then: so does this. So is a prompt of
    messages that both conversations start with (it is not said twice). A
    prompt of one user turn is kept as its text, so it tokenizes as a string prompt does.
    """
    def name(field: str) -> str:
        return columns.get(field, field)

    def as_turns(value: Any, field: str, lone_role: str) -> tuple[Turn, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (Turn(lone_role, value),)
        return _turns(value, where, name(field))

    context = as_turns(prompt, "prompt", "user")
    responses = {field: as_turns(value, field, "assistant") for field, value in (("chosen", chosen),
                                                                                ("rejected", rejected))}
    if len(context) == 1 and isinstance(prompt, str) and any(t.role != "assistant" for t in responses["chosen"]):
        context = ()  # a text prompt beside whole conversations repeats their prompt (UltraFeedback binarized)
    elif context and all(len(r) > len(context) and r[:len(context)] == context for r in responses.values()):
        # messages that both whole conversations start with are their prompt, kept beside them: said twice, the
        # model was trained on the prompt two times over (TRL would concatenate them so; no dataset means that)
        context = ()
    conversations = {}
    for field, response in responses.items():
        turns = context + response
        if not any(turn.role == "assistant" for turn in response):
            raise DataError(f"{where}: field '{name(field)}' has no assistant turn (the response is the last "
                            f"assistant turn of the conversation)")
        if turns[-1].role != "assistant":
            raise DataError(f"{where}: field '{name(field)}' does not end with an assistant turn (it ends with a "
                            f"{turns[-1].role} turn; the response is the last assistant turn)")
        conversations[field] = turns
    shared, other = conversations["chosen"][:-1], conversations["rejected"][:-1]
    if shared != other:
        differ = next((i for i, (a, b) in enumerate(zip(shared, other)) if a != b), min(len(shared), len(other)))
        raise DataError(f"{where}: fields '{name('chosen')}' and '{name('rejected')}' continue different "
                        f"conversations (they differ at message {differ}); only the last assistant turn may differ")
    if not shared:
        raise DataError(f"{where}: no prompt: the conversation has no turn before the response "
                        f"(give a '{name('prompt')}' field or whole conversations in chosen/rejected)")
    text_prompt = shared[0].content if len(shared) == 1 and shared[0].role == "user" else shared
    return PreferencePair(text_prompt, conversations["chosen"][-1].content, conversations["rejected"][-1].content,
                          where, margin)


def record_pair(record: dict, where: str, columns: Optional[dict[str, str]] = None, format: PairFormat = "auto",
                json_cells: bool = False) -> PreferencePair:
    """A pair from one record of a file or hub dataset, in either of TRL's preference formats.

    Args:
        record: column -> value.
        where: the record's location (``file:line``, ``file row N``), named by every error.
        columns: pair field -> the record's column for it (``prompt``, ``chosen``, ``rejected``,
            ``margin``); unmapped fields use their own name.
        format: ``standard`` (prompt/chosen/rejected strings), ``conversational`` (lists of
            role/content messages; the prompt may be absent when chosen/rejected are whole
            conversations) or ``auto``: conversational when any of the three is a list.
        json_cells: a string cell holding a JSON list is a list of messages (CSV cells are text).
    """
    columns = dict(columns or {})
    values = {field: _column(record, field, columns, where, required=field != "prompt" or format == "standard")
              for field in ("prompt", "chosen", "rejected")}
    if json_cells:
        values = {field: _json_cell(value, where, columns.get(field, field), format)
                  for field, value in values.items()}
    prompt, chosen, rejected = values["prompt"], values["chosen"], values["rejected"]
    margin = _margin(record, columns, where)
    if format == "auto":
        format = "conversational" if any(isinstance(v, list) for v in values.values()) else "standard"
    if format == "conversational":
        return _conversation_pair(prompt, chosen, rejected, where, columns, margin)
    if prompt is None:
        _column(record, "prompt", columns, where)  # a standard pair needs its prompt: say which field is missing
    names = {field: columns.get(field, field) for field in ("prompt", "chosen", "rejected")}
    check_text_fields({names[f]: v for f, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))},
                      list(names.values()), where)
    return PreferencePair(prompt, chosen, rejected, where, margin)


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


def load_hub_rows(dataset_id: str, split: str, subset: Optional[str] = None) -> list[dict]:
    """Rows of a hub split; any failure (offline, unknown split, no ``datasets``) ends in one DataError line."""
    try:
        from datasets import load_dataset

        offline_unless_reachable()
        rows = load_dataset(dataset_id, subset, split=split) if subset else load_dataset(dataset_id, split=split)
    except Exception as err:  # noqa: BLE001 - network, hub and package errors all mean "use a local file"
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        named = f"{dataset_id}{f' ({subset})' if subset else ''}"
        raise DataError(f"cannot load hub dataset {named} (split {split}): {type(err).__name__}"
                        f"{': ' + reason if reason else ''}; without internet, pass a local JSONL, JSON, Parquet "
                        f"or CSV file with prompt/chosen/rejected as `path` instead of `hub`") from None
    return [dict(row) for row in rows]


DEFAULT_HUB_SPLIT = "train"  # of a hub dataset other than the four named ones


def hub_split(name: str, split: Optional[str]) -> str:
    return split or (HUB_DATASETS[name].default_split if name in HUB_DATASETS else DEFAULT_HUB_SPLIT)


def load_hub_pairs(name: str, split: Optional[str] = None, subset: Optional[str] = None,
                   columns: Optional[dict[str, str]] = None, format: PairFormat = "auto") -> list[PreferencePair]:
    """Pairs of one of the four named hub sets (their own conversion), or of any hub dataset id (``record_pair``)."""
    split = hub_split(name, split)
    if name in HUB_DATASETS:
        hub = HUB_DATASETS[name]
        dataset_id, convert = hub.dataset_id, hub.convert
    elif "/" in name:
        dataset_id = name
        def convert(record: dict, where: str) -> PreferencePair:
            return record_pair(record, where, columns, format)
    else:
        raise DataError(f"unknown hub source {name!r}; expected one of {', '.join(HUB_DATASETS)} or a hub "
                        f"dataset id (owner/name)")
    pairs = []
    for number, record in enumerate(load_hub_rows(dataset_id, split, subset), start=1):
        pair = convert(record, f"{dataset_id}[{split}] row {number}")
        if pair is not None:
            pairs.append(pair)
    return pairs


# --- local files -------------------------------------------------------------------------------


def load_file_pairs(path: str, columns: Optional[dict[str, str]] = None,
                    format: PairFormat = "auto") -> list[PreferencePair]:
    """Pairs of a local JSONL, JSON, Parquet or CSV file (relative paths: as given, else under the data root)."""
    json_cells = Path(path).suffix.lower() == ".csv"
    return [record_pair(record, where, columns, format, json_cells) for where, record in located_records(path)]


def load_jsonl_pairs(path: str) -> list[PreferencePair]:
    """Pairs of a JSONL file with string fields prompt/chosen/rejected (relative paths: under the data root)."""
    return load_file_pairs(path, format="standard")


def load_file_responses(path: str, columns: Optional[dict[str, str]] = None) -> list[ResponseRecord]:
    """Single responses of a file (JSONL, JSON, Parquet, CSV) with string fields prompt/response, or the columns
    ``columns`` maps them to (no preference: scored, not evaluated)."""
    names = [(columns or {}).get(field, field) for field in RESPONSE_COLUMNS]
    records = located_records(path)
    for where, record in records:
        check_text_fields(record, names, where)
    return [ResponseRecord(r[names[0]], r[names[1]], where) for where, r in records]


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
    """One set of pairs: a local file ``path`` or a ``hub`` dataset (exactly one).

    Args:
        path: a JSON Lines (``.jsonl``), JSON (``.json``), Parquet (``.parquet``) or CSV (``.csv``)
            file; relative paths are taken as given when they exist, else under the data root
            (``$RM_LIGHTNING_DATA``, default ``../shared/data``), e.g. ``ultrafeedback/train.jsonl``.
        hub: one of the paper's sets by name: ``ultrafeedback`` (filtered as in the paper),
            ``rewardmath``, ``rewardbench_math`` (subset math-prm) or ``rewardbench_code`` (subsets
            hep-*); or any hub dataset id (``owner/name``), read as a file is. Needs internet. The hub
            has no train/test split for RewardMATH and RewardBench: prefer the prepared local files.
        split: hub split; default train_prefs (UltraFeedback), test (RewardMATH), filtered
            (RewardBench), train (any other id). With a ``path``, ``split`` and ``subset`` are an error (a file is
            read whole).
        subset: the hub dataset's configuration (``load_dataset``'s ``name``), if it has several.
        columns: pair field -> the data's column, for ``prompt``, ``chosen``, ``rejected`` and
            ``margin``, e.g. ``{prompt: question, chosen: good, rejected: bad}``; unmapped fields use
            their own name. A ``margin`` column (a number per pair, read when present, required when
            mapped) reaches the loss as ``batch["margin"]``.
        format: ``standard`` (prompt/chosen/rejected strings), ``conversational`` (TRL's lists of
            ``{role, content}`` messages: a prompt of any turns and chosen/rejected holding the final
            assistant turn, or whole conversations sharing their prompt turns) or ``auto`` (default:
            conversational for a record where any of the three is a list). In a CSV file a
            conversation is a cell holding its JSON list.
        limit: keep this many pairs, drawn with the data module's ``data_seed``; null keeps all. The
            draw comes before the length caps, so pairs dropped as over-long leave fewer.
    """

    path: Optional[str] = None
    hub: Optional[str] = None
    split: Optional[str] = None
    subset: Optional[str] = None
    columns: Optional[dict[str, str]] = None
    format: PairFormat = "auto"
    limit: Optional[int] = None

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"hub:{self.hub}{f'/{self.subset}' if self.subset else ''}[{hub_split(self.hub, self.split)}]"

    def check(self) -> None:
        """The source's options, each error naming the option; reading comes later (``load``)."""
        if (self.path is None) == (self.hub is None):
            raise DataError(f"a pair source needs exactly one of `path` or `hub` (got path={self.path!r}, "
                            f"hub={self.hub!r}); an override merges into the config's set, so set the other to null")
        if self.path is not None and (self.split is not None or self.subset is not None):
            # a local file has no splits: ignored, `split: test` read the whole file (a training file, say) unsaid
            raise DataError(f"{self.path}: `split` and `subset` choose part of a hub dataset; a local file is read "
                            f"whole (got split={self.split!r}, subset={self.subset!r}): give the split's own file as "
                            f"`path`, and set them to null")
        if self.format not in PAIR_FORMATS:
            raise DataError(f"format must be one of {', '.join(PAIR_FORMATS)}, got {self.format!r}")
        fields = self.column_fields()
        unknown = sorted(set(self.columns or {}) - set(fields))
        if unknown:
            raise DataError(f"columns: unknown field {', '.join(map(repr, unknown))}; the fields are "
                            f"{', '.join(fields)} (field: column of the data)")
        if any(not isinstance(column, str) or not column for column in (self.columns or {}).values()):
            raise DataError(f"columns: every column name must be a non-empty string, got {self.columns!r}")
        if self.hub in HUB_DATASETS and (self.columns or self.format != "auto"):
            raise DataError(f"hub {self.hub!r} has its own conversion: `columns` and `format` apply to files and "
                            f"other hub ids (e.g. hub: {HUB_DATASETS[self.hub].dataset_id})")

    def column_fields(self) -> tuple[str, ...]:
        """The fields ``columns`` may map to a column of the data."""
        return PAIR_COLUMNS

    def load(self, seed: int = 0) -> list[PreferencePair]:
        self.check()
        if self.path:
            pairs = load_file_pairs(self.path, self.columns, self.format)
        else:
            pairs = load_hub_pairs(self.hub, self.split, self.subset, self.columns, self.format)
        if not pairs:
            raise DataError(f"{self.describe()}: no pairs left after filtering")
        return subsample(pairs, self.limit, seed)


SetKind = Literal["pairs", "responses"]
SET_KINDS = ("pairs", "responses")


@dataclass
class EvalSetSource(PairSource):
    """A named eval set's source plus how it relates to the training data (its shift tag).

    ``kind: responses`` reads a file of prompt/response records instead of pairs: ``predict`` gives
    each response one reward; ``validate``/``test`` skip such a set (a lone response has no accuracy).

    ``max_prompt_tokens`` / ``max_response_tokens``: this set's own length caps. An eval set keeps
    every row unless a cap is set here or in the data module's ``eval_max_*_tokens`` (the data
    module's ``max_*_tokens`` cap the training set only): the paper capped its sets when preparing
    them, and a cap applied again with another tokenizer would drop rows of one set and not of its
    row-aligned paraphrased or translated copies. Over-long pairs are dropped, or cut under the data
    module's ``truncate``.
    """

    tag: ShiftTag = "in_distribution"
    kind: SetKind = "pairs"
    max_prompt_tokens: Optional[int] = None
    max_response_tokens: Optional[int] = None

    def check(self) -> None:
        """``PairSource.check`` and the kind: from Python a misspelt kind was read as pairs ("missing field
        'chosen'" about a file of responses); the CLI checks it against ``SetKind`` itself."""
        if self.kind not in SET_KINDS:
            raise DataError(f"kind must be {' or '.join(SET_KINDS)}, got {self.kind!r}")
        super().check()

    def column_fields(self) -> tuple[str, ...]:
        return RESPONSE_COLUMNS if self.kind == "responses" else PAIR_COLUMNS

    def load_responses(self, seed: int = 0) -> list[ResponseRecord]:
        if self.hub is not None or self.path is None:
            raise DataError(f"a set of kind 'responses' needs a local file `path` (JSONL, JSON, Parquet, CSV) "
                            f"with prompt/response fields "
                            f"(got path={self.path!r}, hub={self.hub!r})")
        self.check()
        return subsample(load_file_responses(self.path, self.columns), self.limit, seed)
