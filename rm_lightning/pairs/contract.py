"""What a reward module reads from its data module, written down once.

A LightningModule and its LightningDataModule only meet through the Trainer. These protocols
name everything the reward module and its callbacks ask of the data side, so that a data
module of your own knows what to provide and a missing piece is found by type, not by a
failing attribute lookup in the middle of a run.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rm_lightning.pairs.records import EncodedPairs


@runtime_checkable
class PreferenceData(Protocol):
    """Named eval sets and their tokenized pairs (``data_modules.PreferenceDataModule`` provides them)."""

    eval_every_n_epochs: dict[str, int]  # eval set -> evaluate it at every N-th epoch while fitting

    @property
    def eval_set_names(self) -> list[str]:
        """Eval set names, in dataloader order: metric keys are ``val/<name>/<metric>``."""

    @property
    def eval_set_tags(self) -> dict[str, str]:
        """Eval set name -> shift tag (``rm_lightning.pairs.SHIFT_TAGS``)."""

    def encoded_sets(self) -> dict[str, EncodedPairs]:
        """Every tokenized set, training first: the IM-RM reference cache walks these."""


@runtime_checkable
class VerifiableData(Protocol):
    """Prompts whose sampled responses can be checked (``GenerationCheck`` needs them)."""

    def generation_prompts(self) -> dict[str, list[str]]:
        """Raw prompts per split ("train", "test")."""

    def verify(self, prompt: str, response: str) -> bool:
        """Whether ``response`` is a correct answer to ``prompt``."""


def preference_data_of(trainer) -> PreferenceData | None:
    """The trainer's data module when it provides ``PreferenceData``, else None."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return datamodule if isinstance(datamodule, PreferenceData) else None
