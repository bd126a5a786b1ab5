"""``PreferenceDataModule``: named sets of text pairs in, tokenized loaders out.

A subclass only says where pairs come from (``load_pairs``). Tokenization goes through the
reward module's ``pair_encoder`` once, in ``setup``, so every RM type shares one path and the
training loop never tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from rm_lightning.errors import DataError, SettingError
from rm_lightning.pairs import (EncodedPairs, EncodedResponses, LengthBucketSampler, PreferencePair, ResponseRecord,
                                ResumableLoader, check_shift_tag)
from rm_lightning.pairs.screening import INVALID_PAIR_POLICIES, InvalidPairs, screen_pairs
from rm_lightning.pairs.token_cache import encode_pairs, token_cache_dir
from rm_lightning.settings import check_eval_every_n_epochs, check_options, check_validation_fits_an_epoch


@dataclass
class EvalSet:
    """A named eval set's pairs and how it relates to the training data (``rm_lightning.pairs.SHIFT_TAGS``)."""

    pairs: list[PreferencePair]
    tag: str = "in_distribution"

    def __post_init__(self):
        check_shift_tag(self.tag)


@dataclass
class ResponseSet:
    """A named set of single responses (no preference): ``predict`` scores each, evaluation skips the set."""

    responses: list[ResponseRecord]
    tag: str = "in_distribution"

    def __post_init__(self):
        check_shift_tag(self.tag)


class PreferenceDataModule(L.LightningDataModule):
    """Base of every dataset.

    Args:
        batch_size: pairs per training step (per process).
        eval_batch_size: pairs per evaluation batch.
        max_prompt_tokens: cap on the raw prompt's tokens; ``null`` for none. Over-long pairs are dropped
            unless ``truncate``.
        max_response_tokens: cap on each raw response's tokens; ``null`` for none (the same rule).
        truncate: cut over-long texts instead of dropping the pair (never to an empty response).
        length_bucketing: batch pairs of similar length together (less padding, same data).
        seed: shuffling seed of the training order.
        num_workers: DataLoader worker processes (0: batches are made in the training process).
        eval_every_n_epochs: ``{eval set: N}`` evaluates that set only before the first step, at
            every N-th epoch's validation and at the last epoch's, while training (``validate``/``test``
            always evaluate every set). For large sets whose curve matters less than their final figure:
            evaluation can cost more than training.
        invalid_pairs: what to do with a pair whose chosen and rejected responses are identical, or
            whose prompt or a response is empty or whitespace-only: ``drop`` it (counted in the data
            summary) or ``fail`` with its ``file:line``. Duplicates are counted and kept.
        cache_tokenized: keep each tokenized set on disk (``$RM_LIGHTNING_TOKEN_CACHE``, by default
            ``tokenized_pairs`` in the rm-lightning cache dir) and read it back in the next run with the
            same texts, tokenizer, caps and formatting (``rm_lightning/pairs/token_cache.py``).
    """

    def __init__(self, batch_size: int = 16, eval_batch_size: int = 32, max_prompt_tokens: Optional[int] = 512,
                 max_response_tokens: Optional[int] = 512, truncate: bool = False, length_bucketing: bool = True,
                 seed: int = 0, num_workers: int = 0, eval_every_n_epochs: dict[str, int] = {},
                 invalid_pairs: InvalidPairs = "drop", cache_tokenized: bool = True):
        super().__init__()
        check_options("data", {"batch_size": batch_size, "eval_batch_size": eval_batch_size,
                               "max_prompt_tokens": max_prompt_tokens, "max_response_tokens": max_response_tokens,
                               "num_workers": num_workers})
        check_eval_every_n_epochs("data.eval_every_n_epochs", eval_every_n_epochs)
        if invalid_pairs not in INVALID_PAIR_POLICIES:
            raise DataError(f"data.invalid_pairs: expected one of {', '.join(INVALID_PAIR_POLICIES)}, "
                            f"got {invalid_pairs!r}")
        self.invalid_pairs = invalid_pairs
        self.cache_tokenized = cache_tokenized
        self.eval_every_n_epochs = dict(eval_every_n_epochs)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_prompt_tokens, self.max_response_tokens, self.truncate = max_prompt_tokens, max_response_tokens, truncate
        self.length_bucketing, self.seed, self.num_workers = length_bucketing, seed, num_workers
        self.train_set: EncodedPairs | None = None
        self.eval_sets: dict[str, EncodedPairs] = {}
        self.response_sets: dict[str, EncodedResponses] = {}
        self._set_up = False
        self.loads_training_set = True
        self._module = None

    def load_pairs(self) -> tuple[Optional[list[PreferencePair]], dict[str, Union[EvalSet, ResponseSet]]]:
        """(training pairs, named eval sets). Called in ``setup``.

        Training pairs may be None for a data module that only evaluates (``validate``, ``test``,
        ``predict``); ``fit`` then fails in one line. A ``ResponseSet`` is scored by ``predict`` only.
        """
        raise NotImplementedError

    def encoding_options(self) -> dict:
        """Extra ``PairEncoder`` options this dataset needs (e.g. ``bare_response``); none by default."""
        return {}

    def eval_set_encoder(self, name: str, train_encoder):
        """The ``PairEncoder`` of eval set ``name``; by default the training set's (the same length caps)."""
        return train_encoder

    # --- setup ------------------------------------------------------------------------------------

    def attach(self, module) -> "PreferenceDataModule":
        """Use ``module``'s tokenization without a Trainer (tests, notebooks)."""
        self._module = module
        return self

    def _reward_module(self):
        if self._module is not None:
            return self._module
        if self.trainer is None or self.trainer.lightning_module is None:
            raise RuntimeError("PreferenceDataModule needs a reward module: use it with a Trainer or call attach()")
        return self.trainer.lightning_module

    def setup(self, stage: str | None = None) -> None:
        stage = getattr(stage, "value", stage)  # Lightning's TrainerFn, a str enum: its value in messages
        needs_train = stage in (None, "fit")
        if self._set_up and (self.train_set is not None or not needs_train):
            return
        self.loads_training_set = needs_train  # a subclass may skip reading training data it will not use
        train_pairs, eval_sets = self.load_pairs()
        if needs_train and train_pairs is None:
            raise DataError(f"{type(self).__name__}: fit needs a training set (data.init_args.train); this data "
                            f"module has only eval sets, which validate, test and predict use")
        encoder = self._reward_module().pair_encoder(max_prompt_tokens=self.max_prompt_tokens,
                                                     max_response_tokens=self.max_response_tokens,
                                                     truncate=self.truncate, **self.encoding_options())
        self.train_set = None
        if needs_train:  # evaluation and prediction never tokenize the training set
            self.train_set = self._encode("train", train_pairs, "in_distribution", encoder)
            if not len(self.train_set):
                raise DataError(f"{type(self).__name__}: no training pair left after screening and the length caps "
                                f"(max_prompt_tokens={self.max_prompt_tokens}, "
                                f"max_response_tokens={self.max_response_tokens})")
        unknown = sorted(set(self.eval_every_n_epochs) - {n for n, s in eval_sets.items() if isinstance(s, EvalSet)})
        if unknown and needs_train:  # a cadence is fit's: validate/test/predict evaluate every set, whatever it names
            raise DataError(f"eval_every_n_epochs: no eval set named {', '.join(map(repr, unknown))}; "
                            f"the eval sets are {', '.join(eval_sets)}")
        self.eval_sets = {name: self._encode(name, s.pairs, s.tag, self.eval_set_encoder(name, encoder))
                          for name, s in eval_sets.items() if isinstance(s, EvalSet)}
        self.response_sets = {name: self._encode_responses(name, s, self.eval_set_encoder(name, encoder))
                              for name, s in eval_sets.items() if isinstance(s, ResponseSet)}
        if not needs_train and not self.eval_sets and not (stage == "predict" and self.response_sets):
            raise DataError(f"{type(self).__name__}: {stage} needs at least one eval set of pairs "
                            f"(data.init_args.eval_sets); sets of kind 'responses' are only scored by predict")
        rank_zero_info(self.summary())
        for name, dataset in self.eval_sets.items():
            if not len(dataset) and (needs_train or any(len(d) for d in self.eval_sets.values())):
                rank_zero_warn(empty_set_warning(dataset, len(eval_sets[name].pairs)))
        scored = [*self.eval_sets.values(), *(self.response_sets.values() if stage == "predict" else ())]
        if not needs_train and not any(len(dataset) for dataset in scored):
            raise DataError(f"{type(self).__name__}: {stage} has nothing to score: every eval set is empty after "
                            f"screening and the length caps (the data summary above counts what was dropped)")
        self._set_up = True
        if self.trainer is not None and stage in (None, "fit"):
            check_validation_fits_an_epoch(self.trainer, len(self.train_dataloader()))

    def _token_cache(self) -> Optional[Path]:
        """Where tokenized sets are kept, or None with ``cache_tokenized: false``."""
        return token_cache_dir() if self.cache_tokenized else None

    def _encode(self, name: str, pairs: list[PreferencePair], tag: str, encoder) -> EncodedPairs:
        positions, counts = screen_pairs(name, pairs, self.invalid_pairs)
        encoded = encode_pairs(encoder, [pairs[i] for i in positions], name, self._token_cache())
        capped = [(i, e) for i, e in zip(positions, encoded) if e is not None]
        kept = [(i, e) for i, e in capped if not self._identical_once_truncated(name, pairs[i], i, e)]
        if len(kept) < len(capped):
            counts["identical"] += len(capped) - len(kept)
        return EncodedPairs(name, [e for _, e in kept], tag, len(encoded) - len(capped), counts,
                            texts=[pairs[i] for i, _ in kept], positions=[i for i, _ in kept])

    def _identical_once_truncated(self, name: str, pair: PreferencePair, position: int, encoded) -> bool:
        """``truncate: true`` can cut two responses that differ late to the same tokens: such a pair says as
        little as an identical one, so it is dropped (or fails) by the same rule."""
        if encoded.chosen_ids != encoded.rejected_ids:
            return False
        if self.invalid_pairs == "fail":
            where = pair.source or f"set '{name}', pair {position + 1}"
            raise DataError(f"{where}: chosen and rejected responses are the same tokens once tokenized and cut to "
                            f"the length caps (data.invalid_pairs: drop skips such pairs and counts them)")
        return True

    def _encode_responses(self, name: str, responses: ResponseSet, encoder) -> EncodedResponses:
        """Tokenize single responses; a blank prompt or response is dropped (or fails, as for pairs). Each is
        encoded as a pair of itself with itself, which is what ``PairEncoder.encode_response`` does, so that
        response sets take the one cached path."""
        blank = [r for r in responses.responses if not r.prompt.strip() or not r.response.strip()]
        if blank and self.invalid_pairs == "fail":
            raise DataError(f"{blank[0].source or name}: empty or whitespace-only prompt or response")
        positions = [i for i, r in enumerate(responses.responses) if r.prompt.strip() and r.response.strip()]
        records = [responses.responses[i] for i in positions]
        as_pairs = [PreferencePair(r.prompt, r.response, r.response) for r in records]
        encoded = encode_pairs(encoder, as_pairs, name, self._token_cache())
        kept = [(i, r, (e.chosen_ids, e.chosen_start)) for i, r, e in zip(positions, records, encoded)
                if e is not None]
        return EncodedResponses(name, [e for _, _, e in kept], responses.tag, len(encoded) - len(kept),
                                {"empty": len(blank)} if blank else {}, texts=[r for _, r, _ in kept],
                                positions=[i for i, _, _ in kept])

    def summary(self) -> str:
        """One row per set: pairs kept, then how many each rule dropped (and duplicates, kept)."""
        lines = [f"{type(self).__name__}: tokenized sets (pairs kept / dropped by length caps, as identical, "
                 f"as empty / duplicates kept)",
                 f"  {'set':<32} {'tag':<16} {'kept':>6}   {'long':>5} {'ident.':>6} {'empty':>6}   {'dup.':>5}"]
        for d in self.encoded_sets().values():
            s = d.screened
            kept = f"{d.num_responses} resp." if isinstance(d, EncodedResponses) else len(d)
            lines.append(f"  {d.name:<32} {d.tag:<16} {kept:>6}   {d.dropped:>5} {s.get('identical', 0):>6} "
                         f"{s.get('empty', 0):>6}   {s.get('duplicate', 0):>5}")
        return "\n".join(lines)

    def encoded_sets(self) -> dict[str, EncodedPairs]:
        """Every tokenized set, training first, then the eval sets and the response sets (the IM-RM reference
        cache walks these)."""
        train = {"train": self.train_set} if self.train_set is not None else {}
        return {**train, **self.eval_sets, **self.response_sets}

    @property
    def eval_set_names(self) -> list[str]:
        return list(self.eval_sets)

    @property
    def eval_set_tags(self) -> dict[str, str]:
        return {name: dataset.tag for name, dataset in self.eval_sets.items()}

    # --- loaders ----------------------------------------------------------------------------------

    def _loader(self, dataset: EncodedPairs, batch_size: int, shuffle: bool) -> DataLoader:
        collate = self._reward_module().collator()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.length_bucketing or world > 1:
            sampler = LengthBucketSampler([len(p) for p in dataset.pairs], batch_size, shuffle=shuffle,
                                          seed=self.seed, num_replicas=world, rank=rank,
                                          pool_batches=50 if self.length_bucketing else 1)
            # training: a fit resumed inside an epoch goes on where it stopped (ResumableLoader)
            loader_class = ResumableLoader if shuffle else DataLoader
            return loader_class(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                num_workers=self.num_workers)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, self.eval_batch_size, shuffle=False) for d in self.eval_sets.values()]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    # --- prediction -------------------------------------------------------------------------------

    def predict_sets(self) -> dict[str, EncodedPairs]:
        """What ``predict`` scores, in dataloader order: every eval set of pairs, then every response set."""
        return {**self.eval_sets, **self.response_sets}

    def predict_dataloader(self) -> list[DataLoader]:
        """Loaders whose batches carry ``pair_index`` (each pair's index in its set), so that any order
        (length-sorted here, for less padding) maps back to the texts."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            raise SettingError("predict runs in one process: set trainer.devices: 1 (and no multi-process strategy)")
        collate = IndexedCollate(self._reward_module().collator())
        loaders = []
        for dataset in self.predict_sets().values():
            indexed = IndexedPairs(dataset)
            if self.length_bucketing:
                sampler = LengthBucketSampler([len(p) for p in dataset.pairs], self.eval_batch_size, shuffle=False)
                loaders.append(DataLoader(indexed, batch_size=self.eval_batch_size, sampler=sampler,
                                          collate_fn=collate, num_workers=self.num_workers))
            else:
                loaders.append(DataLoader(indexed, batch_size=self.eval_batch_size, shuffle=False,
                                          collate_fn=collate, num_workers=self.num_workers))
        return loaders


def empty_set_warning(dataset: EncodedPairs, given: int) -> str:
    """Why eval set ``dataset`` holds no pair. Evaluation skips an empty set: without this line it was missing from
    the final table and results.json with only Lightning's "Total length of `DataLoader` ... is zero" to say so."""
    counts = {"by the length caps": dataset.dropped, "as identical": dataset.screened.get("identical", 0),
              "as empty": dataset.screened.get("empty", 0)}
    why = ", ".join(f"{count} {rule}" for rule, count in counts.items() if count)
    hint = " (truncate: true or longer caps keep over-long pairs)" if dataset.dropped else ""
    return f"eval set '{dataset.name}' is empty: its {given} pairs were dropped ({why}); it is not evaluated{hint}"


class IndexedPairs(Dataset):
    """(index, encoded pair) of a set: the index rides through the batch to the predictions file."""

    def __init__(self, dataset: EncodedPairs):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


@dataclass
class IndexedCollate:
    """The reward module's collator on the pairs, plus ``pair_index`` [B]."""

    collate: object

    def __call__(self, items) -> dict:
        batch = self.collate([pair for _, pair in items])
        batch["pair_index"] = torch.tensor([index for index, _ in items], dtype=torch.long)
        return batch
