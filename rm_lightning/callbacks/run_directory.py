"""The run directory: where a run's TensorBoard events, CSVs, plots and results.json go."""

from __future__ import annotations

from pathlib import Path


def run_dir(trainer) -> Path:
    """The logger's version directory (where TensorBoard events go), else the root dir.

    ``trainer.log_dir`` is a collective call (rank 0 broadcasts its version), so the first call
    must happen on every rank: callbacks call this in ``setup``, and the answer is kept on the
    trainer for the rank-0-only writers that ask later.
    """
    cached = getattr(trainer, "_rm_lightning_run_dir", None)
    if cached is None:
        cached = Path(trainer.log_dir or trainer.default_root_dir)
        trainer._rm_lightning_run_dir = cached
    return cached
