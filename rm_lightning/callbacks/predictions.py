"""``predictions.jsonl``: every reward ``predict`` computed, one JSON object a line, in the run directory.

A row per pair of every eval set (``eval_set``, ``shift_tag``, ``kind: pair``, ``index`` in the set,
``source`` ``file:line``, ``prompt`` (a string, or a conversation as its list of ``{role, content}`` messages),
``chosen_reward``, ``rejected_reward``, ``margin`` = chosen -
rejected) and a row per response of every set of kind ``responses`` (``kind: response``, ``prompt``,
``response``, ``reward``). Sets come in dataloader order, rows in each set's order. Non-finite
rewards are written as null. The file is written once, atomically, when prediction ends.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.files import write_text_atomically
from rm_lightning.models.scoring import prediction_rows

PREDICTIONS_FILENAME = "predictions.jsonl"


class PredictionsWriter(L.Callback):
    """Collect ``predict_step`` outputs per dataloader and write ``predictions.jsonl`` at the end.

    Args:
        dirpath: where to write; default: the run directory (the logger's version directory).
        filename: file name, ``predictions.jsonl`` by default.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = PREDICTIONS_FILENAME):
        self.dirpath, self.filename = dirpath, filename
        self._outputs: dict[int, list] = defaultdict(list)

    def setup(self, trainer, pl_module, stage: str) -> None:
        run_dir(trainer)  # collective: resolve the run directory on every rank now

    def on_predict_start(self, trainer, pl_module) -> None:
        self._outputs = defaultdict(list)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "pair_index" in outputs:
            self._outputs[dataloader_idx].append(outputs)

    def path(self, trainer) -> Path:
        return Path(self.dirpath) / self.filename if self.dirpath else run_dir(trainer) / self.filename

    def on_predict_end(self, trainer, pl_module) -> None:
        sets = getattr(trainer.datamodule, "predict_sets", None)
        if sets is None:
            return  # not a preference data module: nothing to map rewards back to
        self.write(trainer, list(sets().values()))

    @rank_zero_only
    def write(self, trainer, datasets: list) -> None:
        rows = [row for position, dataset in enumerate(datasets)
                for row in prediction_rows(dataset, self._outputs.get(position, []))]
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
        path = write_text_atomically(self.path(trainer), text)
        rank_zero_info(f"predictions: {len(rows)} rows in {path}")
