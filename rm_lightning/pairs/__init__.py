"""Preference pairs from text to batches: records, tokenization, collation, sampling, and the data contract."""

from rm_lightning.pairs.collation import PairCollator
from rm_lightning.pairs.contract import PreferenceData, VerifiableData, preference_data_of
from rm_lightning.pairs.encoding import PairEncoder, TextFormatter, chat_formatter, conversation_lines
from rm_lightning.pairs.records import (
    SHIFT_TAGS, EncodedPair, EncodedPairs, EncodedResponses, PreferencePair, Prompt, ResponseRecord, ShiftTag,
    Turn, check_shift_tag, check_text_fields, prompt_text,
)
from rm_lightning.pairs.sampling import LengthBucketSampler, ResumableLoader, is_repeated_batch

__all__ = [
    "PairCollator", "PreferenceData", "VerifiableData", "preference_data_of", "PairEncoder", "TextFormatter",
    "chat_formatter", "conversation_lines", "SHIFT_TAGS", "EncodedPair", "EncodedPairs", "EncodedResponses",
    "PreferencePair", "ResponseRecord", "ShiftTag", "check_shift_tag", "check_text_fields", "Prompt", "Turn",
    "prompt_text", "LengthBucketSampler", "ResumableLoader", "is_repeated_batch",
]
