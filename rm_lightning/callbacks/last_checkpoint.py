"""``checkpoints/last.ckpt``: the one checkpoint a run keeps, written when it is worth its cost.

A checkpoint of the bundled model holds its weights and Adam's two moments (1.6 GB for 135M
parameters in fp32), and writing it takes seconds to tens of seconds, while an epoch of the persona
runs takes well under a minute: a save at every epoch's end made the saves a quarter of such a run.
So ``last.ckpt`` is written at the end of fit, always (also when ``max_steps`` or ``max_time`` stops
it inside an epoch, or before the first evaluation of a ``check_val_every_n_epoch: 2`` config), and
at an epoch's end only once ``every_minutes`` have passed since the last save (or since training
began). Ctrl-C or a crash writes nothing: the run keeps the last.ckpt it had, whose epoch-end state
resumes (``--ckpt_path last``) to the same final metrics as a run never stopped. A save at the end of a
fit that a stop ended inside an epoch records that epoch as unfinished (``epoch_progress.py``), so it
resumes there, to the same final metrics too.
"""

from __future__ import annotations

from time import monotonic
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint

from rm_lightning.callbacks.epoch_progress import epoch_cut_short, uncount_cut_short_epoch
from rm_lightning.settings import non_negative_number

DEFAULT_EVERY_MINUTES = 10.0
OPTION = "last_checkpoint.every_minutes"


class LastCheckpoint(ModelCheckpoint):
    """Only ``checkpoints/last.ckpt``: at the end of fit, and at an epoch's end every ``every_minutes``.

    The one "top-k" checkpoint of an unmonitored ModelCheckpoint is the newest, so naming it ``last``
    gives exactly that file (Lightning's ``save_last`` writes a second file, or nothing without top-k).

    Args:
        every_minutes: the least time between two saves at epoch ends (0: at every epoch's end).
            The save at the end of fit does not wait for it.
        dirpath: where to write; default: the run directory's ``checkpoints``.
    """

    def __init__(self, every_minutes: float = DEFAULT_EVERY_MINUTES, dirpath: Optional[str] = None):
        non_negative_number(none=False)(OPTION, every_minutes)
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, save_last=False,
                         enable_version_counter=False, save_on_train_epoch_end=True)
        self.every_minutes = float(every_minutes)
        self._last_save_time: Optional[float] = None

    @property
    def state_key(self) -> str:
        """The key a plain ModelCheckpoint with these settings has: last.ckpt files written before this
        class existed resume without Lightning's warning about a missing callback."""
        return ModelCheckpoint.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the saved paths only when resuming into the directory they name.

        A run resumed from another run's last.ckpt is a run of its own (the next ``version_N``), and
        what that run wrote has nothing to restore here: Lightning would warn that it restores only
        ``best_model_path``, of a file this run never writes or deletes.
        """
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """No saves inside an epoch: only an epoch-end state resumes exactly."""

    def on_validation_end(self, trainer, pl_module) -> None:
        """Validation does not save: the epoch's end, after its validation, does."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """An epoch a stop cut short is not at its end: Lightning calls this hook for it with the epoch
        counted as finished, and a save here would resume at the next epoch (on_train_end saves it right)."""
        if epoch_cut_short(trainer):
            return
        if self._interval_passed(trainer):
            self._save_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        uncount_cut_short_epoch(trainer)
        self._save_last(trainer)

    def _interval_passed(self, trainer) -> bool:
        """Whether rank 0's clock says a save is due, on every rank (every rank must join the save).

        The epoch's synced metrics are computed first, on every rank: the progress bar, on rank 0 only,
        computes them at the epoch's end before this hook, and their computation gathers from every
        rank. Had the other ranks gone on to the broadcast, each side would wait for the other forever
        (a DDP or FSDP run with its progress bar on hung at its first epoch's end).
        """
        trainer.callback_metrics  # noqa: B018 - computed (collectively) when read; then kept for the epoch
        since = None if self._last_save_time is None else monotonic() - self._last_save_time
        due = since is None or since >= 60.0 * self.every_minutes
        return bool(trainer.strategy.broadcast(due))

    def _save_last(self, trainer) -> None:
        """Write last.ckpt unless nothing changed since the last save (no step taken, or not fitting)."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_save_time = monotonic()
