"""The two fixed batches of the benchmark, built through the project's own data path.

* ``persona``: the first 8 training pairs of ``PersonaDataModule`` with the settings of
  ``configs/*_persona.yaml`` (builtin statements, 80/40 prompts, data seed 875). Rows have
  similar lengths, so there is little padding.
* ``ultrafeedback``: 8 pairs of ``ultrafeedback/test.jsonl`` chosen so that about half the
  tokens of the batch padded to its longest row are padding: one pair whose longest row is
  just under ``width`` tokens, and seven whose rows are close to the length that brings the
  real tokens to ``(1 - padding) * 16 * width``. The choice depends only on the tokenizer,
  so every RM type and every peer trains on the same pairs.

Both take another pair count (``--pairs``), for hardware that 8 short pairs leave idle (a GPU):
persona then trains on that many prompts (at least the usual 80, so its first 8 pairs stay the
same), ultrafeedback picks that many rows the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_modules.base import PreferenceDataModule
from data_modules.jsonl import read_jsonl
from data_modules.persona import PersonaDataModule
from rm_lightning.errors import DataError
from rm_lightning.pairs import EncodedPairs, PairEncoder, PreferencePair, chat_formatter

BATCH_PAIRS = 8
PERSONA_SETTINGS = dict(source="builtin", num_train=80, num_test=40, data_seed=875)
PERSONA_MAX_PAIRS = 152  # the 192 builtin statements less the 40 test prompts
ULTRAFEEDBACK_FILE = "ultrafeedback/test.jsonl"
PAIR_FIELDS = ("prompt", "chosen", "rejected")


class FixedPairsDataModule(PreferenceDataModule):
    """A data module over given pairs, so they are tokenized by the same code as any dataset."""

    def __init__(self, pairs: list[PreferencePair], **kwargs):
        super().__init__(**kwargs)
        self.pairs = list(pairs)

    def load_pairs(self):
        return self.pairs, {}


@dataclass
class BatchSpec:
    """What a worker needs to rebuild a batch: its name and, for UltraFeedback, the chosen rows."""

    name: str
    ultrafeedback_rows: tuple[int, ...] = ()
    pairs: int = BATCH_PAIRS

    @classmethod
    def of_run(cls, spec: dict) -> "BatchSpec":
        """The batch of a worker's run spec (see ``bench_step.run_worker``)."""
        return cls(spec["batch"], tuple(spec.get("ultrafeedback_rows", ())), spec.get("pairs", BATCH_PAIRS))


def persona_datamodule(pairs: int) -> PersonaDataModule:
    if pairs > PERSONA_MAX_PAIRS:
        raise DataError(f"the persona benchmark batch holds at most {PERSONA_MAX_PAIRS} pairs; got {pairs}")
    return PersonaDataModule(**{**PERSONA_SETTINGS, "num_train": max(PERSONA_SETTINGS["num_train"], pairs)})


def persona_pairs(pairs: int = BATCH_PAIRS) -> list[PreferencePair]:
    train, _ = persona_datamodule(pairs).load_pairs()
    return train[:pairs]


def ultrafeedback_pairs(rows: tuple[int, ...]) -> list[PreferencePair]:
    records = read_jsonl(ULTRAFEEDBACK_FILE, PAIR_FIELDS)
    return [PreferencePair(records[i]["prompt"], records[i]["chosen"], records[i]["rejected"]) for i in rows]


def batch_pairs(spec: BatchSpec) -> list[PreferencePair]:
    """The texts of a batch (what TRL gets)."""
    if spec.name == "persona":
        return persona_pairs(spec.pairs)
    if spec.name == "ultrafeedback":
        return ultrafeedback_pairs(spec.ultrafeedback_rows)
    raise DataError(f"unknown benchmark batch {spec.name!r}; expected persona or ultrafeedback")


def encoded_batch(spec: BatchSpec, module) -> EncodedPairs:
    """The batch's pairs tokenized for ``module`` through a data module (the training path)."""
    if spec.name == "persona":
        datamodule = persona_datamodule(spec.pairs)
    else:
        datamodule = FixedPairsDataModule(batch_pairs(spec))
    datamodule.attach(module).setup("fit")
    pairs = datamodule.train_set.pairs[:spec.pairs]
    if len(pairs) < spec.pairs:
        raise DataError(f"benchmark batch {spec.name!r}: only {len(pairs)} pairs left after the length caps")
    return EncodedPairs(f"bench-{spec.name}", pairs)


def chat_encoder(tokenizer) -> PairEncoder:
    """The encoder EX-RM and IM-RM use (chat template, 512-token caps), built from a tokenizer alone."""
    return PairEncoder(tokenizer, chat_formatter(tokenizer), 512, 512, truncate=False)


def select_padding_heavy_rows(tokenizer, width: int = 192, padding: float = 0.5,
                              pairs: int = BATCH_PAIRS) -> tuple[int, ...]:
    """Row numbers of ``pairs`` UltraFeedback pairs whose padded batch is about ``padding`` padding."""
    records = read_jsonl(ULTRAFEEDBACK_FILE, PAIR_FIELDS)
    encoder = chat_encoder(tokenizer)
    lengths = {}
    for row, record in enumerate(records):
        encoded = encoder.encode(PreferencePair(record["prompt"], record["chosen"], record["rejected"]))
        if encoded is not None and len(encoded) <= width:
            lengths[row] = (len(encoded.chosen_ids), len(encoded.rejected_ids))
    if len(lengths) < pairs:
        raise DataError(f"{ULTRAFEEDBACK_FILE}: only {len(lengths)} pairs fit in {width} tokens; raise --uf-width")
    longest = max(lengths, key=lambda row: (max(lengths[row]), -row))
    batch_width = max(lengths[longest])
    real_target = (1 - padding) * 2 * pairs * batch_width - sum(lengths[longest])
    row_target = real_target / (2 * max(pairs - 1, 1))

    def distance(row: int) -> tuple[float, int]:
        chosen, rejected = lengths[row]
        return (chosen - row_target) ** 2 + (rejected - row_target) ** 2, row

    others = sorted((row for row in lengths if row != longest and max(lengths[row]) < batch_width), key=distance)
    return tuple(sorted([longest, *others[:pairs - 1]]))


def padding_fraction(batch) -> float:
    mask = batch["attention_mask"]
    return 1.0 - mask.sum().item() / mask.numel()
