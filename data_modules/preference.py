"""Real-world shifts (paper §5.2): train on one preference set, evaluate on named, tagged sets.

The paper's question is how an RM trained on one distribution generalizes: in distribution,
under token-level shifts (the same responses paraphrased or translated) and under domain shifts
(math, code). Each eval set therefore carries a shift tag, and results are logged per set as
``val/<set>/<metric>`` so they can be grouped by tag afterwards.
"""

from __future__ import annotations

from typing import Optional, Union

from data_modules.base import EvalSet, PreferenceDataModule, ResponseSet
from data_modules.preference_sources import EvalSetSource, PairSource, subsample
from rm_lightning.errors import DataError
from rm_lightning.pairs import PreferencePair
from rm_lightning.settings import TRAIN_SAMPLE, check_eval_set_names, check_options

CAPS = ("max_prompt_tokens", "max_response_tokens")


class RealWorldDataModule(PreferenceDataModule):
    """A training source and any number of named eval sets, each a local file or a hub dataset.

    From YAML::

        data:
          class_path: data_modules.RealWorldDataModule
          init_args:
            train: {path: ultrafeedback/train.jsonl}
            eval_sets:
              ultrafeedback_test: {path: ultrafeedback/test.jsonl, tag: in_distribution, limit: 100}
              rewardbench_math: {path: rewardbench_math/test.jsonl, tag: domain_shift}

    To evaluate or score a trained model without training, leave ``train`` out (or null): ``validate``,
    ``test`` and ``predict`` then use the eval sets alone, and ``fit`` fails in one line.

    Length caps: the data module's ``max_prompt_tokens`` / ``max_response_tokens`` (and ``truncate``)
    apply to the training set only. Eval sets keep every row, as the paper's did (capped once, when
    the data was prepared), unless ``eval_max_*_tokens`` or a set's own ``max_*_tokens`` cap them;
    ``truncate`` then cuts their over-long texts instead of dropping pairs, which keeps row-aligned
    sets (an original and its paraphrased or translated copies) aligned.

    Args:
        train: the training pairs (``path`` or ``hub``; optional ``columns``, ``format``, ``limit``;
            see ``PairSource``: JSONL/JSON/Parquet/CSV or any hub id, standard or conversational); null:
            evaluation only.
        eval_sets: set name -> source with a shift tag (in_distribution, token_shift, domain_shift).
            Names become metric keys, so they may hold only letters, digits, ``_`` and ``-``.
            ``kind: responses`` makes a set of single prompt/response records that ``predict`` scores
            one reward each (``validate``/``test`` skip it).
        data_seed: seed of every ``limit`` draw and of the training sample; one seed for all sets keeps
            aligned files aligned.
        train_sample: evaluate this many training pairs, drawn with ``data_seed`` (all of them when the
            training set has fewer), as the eval set ``train_sample`` tagged ``training`` (the paper's
            training accuracy, on 200 training pairs; the real-world configs set 200); the training caps
            apply to it. null (default) or 0: none.
        eval_max_prompt_tokens: prompt length cap for every eval set (a set's own ``max_prompt_tokens``
            wins); null (default): none.
        eval_max_response_tokens: response length cap for every eval set (a set's own
            ``max_response_tokens`` wins); null (default): none.
        **kwargs: batch sizes, training length caps, truncation, bucketing and shuffle seed of
            ``PreferenceDataModule``.
    """

    def __init__(self, train: Optional[PairSource] = None, eval_sets: dict[str, EvalSetSource] = {},
                 data_seed: int = 0, train_sample: Optional[int] = None,
                 eval_max_prompt_tokens: Optional[int] = None, eval_max_response_tokens: Optional[int] = None,
                 **kwargs):
        super().__init__(**kwargs)
        check_options("data", {"train_sample": train_sample, "eval_max_prompt_tokens": eval_max_prompt_tokens,
                               "eval_max_response_tokens": eval_max_response_tokens})
        self.train_source = None if train is None else self._as_source(train, PairSource, "train")
        self.eval_sources = {name: self._as_source(source, EvalSetSource, name) for name, source in eval_sets.items()}
        check_eval_set_names(self.eval_sources)
        self.data_seed = data_seed
        self.train_sample = train_sample or 0
        self.eval_caps = {"max_prompt_tokens": eval_max_prompt_tokens, "max_response_tokens": eval_max_response_tokens}

    @staticmethod
    def _as_source(value, kind: type, name: str):
        """Accept a dataclass or a plain dict (Python callers), so both spell a set the same way."""
        if isinstance(value, kind):
            source = value
        elif isinstance(value, dict):
            try:
                source = kind(**value)
            except TypeError as err:
                raise DataError(f"set '{name}': {err}") from None
        else:
            raise DataError(f"set '{name}': expected a {kind.__name__} or a mapping of its fields, "
                            f"got {type(value).__name__}")
        check_options(f"data.{name}", {"path": source.path, "hub": source.hub, "limit": source.limit,
                                       **{cap: getattr(source, cap) for cap in CAPS if hasattr(source, cap)}})
        return source

    def load_pairs(self) -> tuple[Optional[list[PreferencePair]], dict[str, Union[EvalSet, ResponseSet]]]:
        wanted = self.train_source is not None and (self.loads_training_set or self.train_sample > 0)
        train = self.train_source.load(self.data_seed) if wanted else None
        eval_sets = {name: ResponseSet(source.load_responses(self.data_seed), source.tag)
                     if getattr(source, "kind", "pairs") == "responses" else EvalSet(source.load(self.data_seed), source.tag)
                     for name, source in self.eval_sources.items()}
        if train is not None and self.train_sample > 0:
            eval_sets[TRAIN_SAMPLE] = EvalSet(subsample(train, self.train_sample, self.data_seed), "training")
        return (train if self.loads_training_set else None), eval_sets

    def eval_set_encoder(self, name: str, train_encoder):
        """The training sample: the training caps; any other set: its own caps, else ``eval_max_*_tokens``."""
        if name == TRAIN_SAMPLE:
            return train_encoder
        source = self.eval_sources[name]
        caps = {cap: getattr(source, cap) if getattr(source, cap) is not None else self.eval_caps[cap] for cap in CAPS}
        return self._reward_module().pair_encoder(**caps, truncate=self.truncate, **self.encoding_options())
