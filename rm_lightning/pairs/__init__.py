"""Preference pairs from text to batches: records, tokenization, collation, sampling, and the data contract."""

from rm_lightning.pairs.collation import PairCollator
from rm_lightning.pairs.contract import PreferenceData, VerifiableData, preference_data_of
from rm_lightning.pairs.encoding import PairEncoder, TextFormatter, chat_formatter
from rm_lightning.pairs.records import (
    SHIFT_TAGS, EncodedPair, EncodedPairs, EncodedResponses, PreferencePair, ResponseRecord, ShiftTag, check_shift_tag, check_text_fields,
)
from rm_lightning.pairs.sampling import LengthBucketSampler, is_repeated_batch

__all__ = [
    "PairCollator", "PreferenceData", "VerifiableData", "preference_data_of", "PairEncoder", "TextFormatter",
    "chat_formatter", "SHIFT_TAGS", "EncodedPair", "EncodedPairs", "EncodedResponses", "PreferencePair",
    "ResponseRecord", "ShiftTag", "check_shift_tag",
    "check_text_fields", "LengthBucketSampler", "is_repeated_batch",
]
