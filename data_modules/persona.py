"""Persona (paper §5.1): a controlled token-level shift.

Training responses agree or disagree with a statement using one vocabulary ("yes"/"sure" vs
"no"/"never"); the paraphrased eval sets say the same with words never seen in training
("certainly"/"absolutely" vs "not really"/"nope"). An RM that learned meaning ranks both; one
that learned tokens does not.
"""

from __future__ import annotations

import itertools
from typing import Literal, Optional

import torch

from data_modules.base import EvalSet, PreferenceDataModule
from data_modules.jsonl import read_jsonl
from data_modules.persona_statements import AGREEABLENESS_STATEMENTS
from rm_lightning.errors import DataError
from rm_lightning.hub import offline_unless_reachable
from rm_lightning.pairs import PreferencePair, check_text_fields
from rm_lightning.settings import check_options

HUB_DATASET = "Anthropic/model-written-evals"
QUESTION_TEMPLATE = 'Is the following statement something you would say?\n"{statement}"'


class PersonaDataModule(PreferenceDataModule):
    """Persona statements with templated agree/disagree responses.

    Args:
        source: ``builtin``: the agreeable statements shipped with rm-lightning (no files needed);
            ``anthropic``: Anthropic's model-written-evals persona file, from ``path`` or, when
            ``path`` is null, the hub dataset (needs internet). Only items whose
            ``answer_matching_behavior`` is "Yes" are kept.
        path: local persona JSONL (``anthropic`` source).
        trait: persona file name on the hub, e.g. ``agreeableness``, ``conscientiousness``.
        num_train: training prompts.
        num_test: test prompts.
        data_seed: fixes the split and the template draws, both made as the authors make them
            (``authors_split``): the Anthropic file with seed 875 gives the paper's.
        chosen_prefixes: training pool of the chosen responses' openings; each example draws one.
        chosen_tokens: training pool of the chosen responses' answer tokens ("yes", "sure"); one drawn.
        rejected_prefixes: training pool of the rejected responses' openings; one drawn.
        rejected_tokens: training pool of the rejected responses' answer tokens ("no", "never"); one drawn.
        paraphrased_chosen_prefixes: the paraphrased eval sets' chosen openings; every prompt gets all
            combinations of the paraphrased prefixes and tokens.
        paraphrased_chosen_tokens: the paraphrased chosen answers ("certainly", "absolutely").
        paraphrased_rejected_prefixes: the paraphrased eval sets' rejected openings.
        paraphrased_rejected_tokens: the paraphrased rejected answers ("not really", "nope").
        response_format: ``sentence`` (default): a prefix then the token, as the paper's Persona
            experiment; ``single_token``: the whole response is the token alone, with nothing after
            it (no end-of-turn), as Theorem 2 assumes. Every token must then be a single token of
            the backbone's tokenizer (checked in ``setup``), and the paraphrased sets hold tokens
            never seen in training. Prefix pools are not used.
    """

    def __init__(self, source: Literal["builtin", "anthropic"] = "builtin", path: Optional[str] = None,
                 trait: str = "agreeableness", num_train: int = 80, num_test: int = 40, data_seed: int = 875,
                 chosen_prefixes: list[str] = ["In my view, the answer is ", "A truthful reply is "],
                 chosen_tokens: list[str] = ["yes", "sure"],
                 rejected_prefixes: list[str] = ["My judgement: ", "Considering the statement, I say "],
                 rejected_tokens: list[str] = ["no", "never"],
                 paraphrased_chosen_prefixes: list[str] = ["My response would be "],
                 paraphrased_chosen_tokens: list[str] = ["certainly", "absolutely"],
                 paraphrased_rejected_prefixes: list[str] = ["I lean toward "],
                 paraphrased_rejected_tokens: list[str] = ["not really", "nope"],
                 response_format: Literal["sentence", "single_token"] = "sentence",
                 **kwargs):
        check_options("data", {"num_train": num_train, "num_test": num_test})
        super().__init__(**kwargs)
        if source not in ("builtin", "anthropic"):
            raise DataError(f"PersonaDataModule: unknown source {source!r}; use 'builtin' or 'anthropic'")
        for name, pool in [("chosen_prefixes", chosen_prefixes), ("chosen_tokens", chosen_tokens),
                           ("rejected_prefixes", rejected_prefixes), ("rejected_tokens", rejected_tokens),
                           ("paraphrased_chosen_prefixes", paraphrased_chosen_prefixes),
                           ("paraphrased_chosen_tokens", paraphrased_chosen_tokens),
                           ("paraphrased_rejected_prefixes", paraphrased_rejected_prefixes),
                           ("paraphrased_rejected_tokens", paraphrased_rejected_tokens)]:
            if not pool:
                raise DataError(f"PersonaDataModule: template pool '{name}' is empty")
        if response_format not in ("sentence", "single_token"):
            raise DataError(f"PersonaDataModule: response_format must be 'sentence' or 'single_token', "
                            f"got {response_format!r}")
        self.response_format = response_format
        self.source, self.path, self.trait = source, path, trait
        self.num_train, self.num_test, self.data_seed = num_train, num_test, data_seed
        self.train_pools = (list(chosen_prefixes), list(chosen_tokens), list(rejected_prefixes), list(rejected_tokens))
        self.paraphrased_pools = (list(paraphrased_chosen_prefixes), list(paraphrased_chosen_tokens),
                                  list(paraphrased_rejected_prefixes), list(paraphrased_rejected_tokens))

    # --- prompts ----------------------------------------------------------------------------------

    def prompts(self) -> list[str]:
        """Every usable prompt of the source, in file order."""
        if self.source == "builtin":
            return [QUESTION_TEMPLATE.format(statement=s) for s in AGREEABLENESS_STATEMENTS]
        records = self._anthropic_records()
        return [r["question"] for r in records if r["answer_matching_behavior"].strip().lower() == "yes"]

    def _anthropic_records(self) -> list[dict]:
        fields = ("question", "answer_matching_behavior")
        if self.path:
            return read_jsonl(self.path, fields)
        try:
            from datasets import load_dataset

            offline_unless_reachable()
            rows = load_dataset(HUB_DATASET, data_files=f"persona/{self.trait}.jsonl", split="train")
        except Exception as err:  # offline, unknown trait, missing package: all end the same way
            raise DataError(f"cannot load persona trait '{self.trait}' from the hub dataset {HUB_DATASET} "
                            f"({type(err).__name__}); download persona/{self.trait}.jsonl and pass --data.path") from None
        records = [dict(row) for row in rows]
        for number, record in enumerate(records, start=1):
            check_text_fields(record, fields, f"{HUB_DATASET}/persona/{self.trait}.jsonl:{number}")
        return records

    def split_prompts(self) -> tuple[list[str], list[str]]:
        """(train prompts, test prompts), split as the authors split them (``authors_split``)."""
        train, test, _ = self.authors_split()
        return train, test

    def authors_split(self) -> tuple[list[str], list[str], torch.Generator]:
        """The authors' procedure (princeton-pli/exrm-vs-imrm, ``PersonaControlledDataModule.setup``): one
        ``torch.Generator`` seeded with ``data_seed`` draws ``torch.randperm`` over the usable prompts in file
        order; the first ``num_train`` of the permutation train, the next ``num_test`` test. The generator is
        returned as the split left it: the response templates are drawn from it next (``load_pairs``), so for
        the Anthropic file and seed 875 the pairs are the paper's. (Their seed must be positive, else they
        draw from the global generator; here every seed is used as given.)
        """
        prompts = self.prompts()
        needed = self.num_train + self.num_test
        where = self.path or (f"hub {self.trait}" if self.source == "anthropic" else "builtin statements")
        if len(prompts) < needed:
            raise DataError(f"persona source ({where}) has {len(prompts)} usable prompts; "
                            f"num_train + num_test = {needed}")
        generator = torch.Generator().manual_seed(self.data_seed)
        order = torch.randperm(len(prompts), generator=generator).tolist()
        return ([prompts[i] for i in order[:self.num_train]], [prompts[i] for i in order[self.num_train:needed]],
                generator)

    # --- pairs ------------------------------------------------------------------------------------

    def load_pairs(self) -> tuple[list[PreferencePair], dict[str, EvalSet]]:
        train_prompts, test_prompts, generator = self.authors_split()
        train = [self._drawn_pair(p, generator) for p in train_prompts]
        original_test = [self._drawn_pair(p, generator) for p in test_prompts]
        eval_sets = {
            "original_train_prompts": EvalSet(train, "in_distribution"),
            "original_test_prompts": EvalSet(original_test, "in_distribution"),
            "paraphrased_train_prompts": EvalSet(self._paraphrased(train_prompts), "token_shift"),
            "paraphrased_test_prompts": EvalSet(self._paraphrased(test_prompts), "token_shift"),
        }
        return train, eval_sets

    def _drawn_pair(self, prompt: str, generator: torch.Generator) -> PreferencePair:
        """One pair with the templates drawn as the authors draw them: one ``torch.randint`` each for the chosen
        prefix, the chosen token, the rejected prefix and the rejected token, in that order (single-token
        responses draw the two tokens only)."""
        chosen_prefixes, chosen_tokens, rejected_prefixes, rejected_tokens = self.train_pools

        def draw(pool: list[str]) -> str:
            return pool[int(torch.randint(0, len(pool), (1,), generator=generator))]

        if self.response_format == "single_token":
            return PreferencePair(prompt, draw(chosen_tokens), draw(rejected_tokens))
        chosen = draw(chosen_prefixes)
        chosen += draw(chosen_tokens)
        rejected = draw(rejected_prefixes)
        rejected += draw(rejected_tokens)
        return PreferencePair(prompt, chosen, rejected)

    def _paraphrased(self, prompts: list[str]) -> list[PreferencePair]:
        chosen_prefixes, chosen_tokens, rejected_prefixes, rejected_tokens = self.paraphrased_pools
        if self.response_format == "single_token":
            chosen_prefixes = rejected_prefixes = [""]
        chosen_texts = [p + t for p, t in itertools.product(chosen_prefixes, chosen_tokens)]
        rejected_texts = [p + t for p, t in itertools.product(rejected_prefixes, rejected_tokens)]
        return [PreferencePair(prompt, c, r)
                for prompt in prompts for c, r in itertools.product(chosen_texts, rejected_texts)]

    # --- single-token responses -------------------------------------------------------------------

    def encoding_options(self) -> dict:
        return {"bare_response": self.response_format == "single_token"}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.response_format == "single_token":
            self.check_single_tokens(self._reward_module().tokenizer)
        super().setup(stage)

    def check_single_tokens(self, tokenizer) -> None:
        """Fail in one line, naming every word the tokenizer splits, before anything is tokenized."""
        seen = self.train_pools[1] + self.train_pools[3]
        unseen = self.paraphrased_pools[1] + self.paraphrased_pools[3]
        split = {word: len(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in seen + unseen}
        split = {word: count for word, count in split.items() if count != 1}
        if split:
            listed = ", ".join(f"{word!r} ({count} tokens)" for word, count in split.items())
            raise DataError(f"PersonaDataModule (response_format: single_token): not single tokens of this "
                            f"tokenizer: {listed}; choose other words for the token pools")
        overlap = sorted(set(seen) & set(unseen))
        if overlap:
            raise DataError(f"PersonaDataModule (response_format: single_token): {', '.join(map(repr, overlap))} "
                            f"both trained on and held out; the paraphrased tokens must be unseen")
