"""Real-world shifts (paper §5.2): train on one preference set, evaluate on named, tagged sets.

The paper's question is how an RM trained on one distribution generalizes: in distribution,
under token-level shifts (the same responses paraphrased or translated) and under domain shifts
(math, code). Each eval set therefore carries a shift tag, and results are logged per set as
``val/<set>/<metric>`` so they can be grouped by tag afterwards.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from data_modules.base import EvalSet, PreferenceDataModule, ResponseSet
from data_modules.preference_sources import EvalSetSource, PairSource
from rm_lightning.errors import DataError
from rm_lightning.pairs import PreferencePair
from rm_lightning.settings import check_options

_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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

    Args:
        train: the training pairs (``path`` or ``hub``; optional ``columns``, ``format``, ``limit``;
            see ``PairSource``: JSONL/JSON/Parquet/CSV or any hub id, standard or conversational); null:
            evaluation only.
        eval_sets: set name -> source with a shift tag (in_distribution, token_shift, domain_shift).
            Names become metric keys, so they may hold only letters, digits, ``_``, ``.`` and ``-``.
            ``kind: responses`` makes a set of single prompt/response records that ``predict`` scores
            one reward each (``validate``/``test`` skip it).
        data_seed: seed of every ``limit`` draw; one seed for all sets keeps aligned files aligned.
        **kwargs: batch sizes, length caps, truncation, bucketing and shuffle seed of
            ``PreferenceDataModule``.
    """

    def __init__(self, train: Optional[PairSource] = None, eval_sets: dict[str, EvalSetSource] = {},
                 data_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.train_source = None if train is None else self._as_source(train, PairSource, "train")
        self.eval_sources = {name: self._as_source(source, EvalSetSource, name) for name, source in eval_sets.items()}
        for name in self.eval_sources:
            if name == "train" or not _SET_NAME.fullmatch(name):
                raise DataError(f"eval set name {name!r} is not allowed: use letters, digits, '_', '.' or '-', "
                                f"and not 'train'")
        self.data_seed = data_seed

    @staticmethod
    def _as_source(value, kind: type, name: str):
        """Accept a dataclass or a plain dict (Python callers), so both spell a set the same way."""
        if isinstance(value, kind):
            check_options(f"data.{name}", {"path": value.path, "hub": value.hub, "limit": value.limit})
            return value
        if isinstance(value, dict):
            try:
                source = kind(**value)
            except TypeError as err:
                raise DataError(f"set '{name}': {err}") from None
            check_options(f"data.{name}", {"path": source.path, "hub": source.hub, "limit": source.limit})
            return source
        raise DataError(f"set '{name}': expected a {kind.__name__} or a mapping of its fields, "
                        f"got {type(value).__name__}")

    def load_pairs(self) -> tuple[Optional[list[PreferencePair]], dict[str, Union[EvalSet, ResponseSet]]]:
        wanted = self.train_source is not None and self.loads_training_set
        train = self.train_source.load(self.data_seed) if wanted else None
        eval_sets = {name: ResponseSet(source.load_responses(self.data_seed), source.tag)
                     if getattr(source, "kind", "pairs") == "responses" else EvalSet(source.load(self.data_seed), source.tag)
                     for name, source in self.eval_sources.items()}
        return train, eval_sets
