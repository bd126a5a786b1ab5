"""An epoch that a stop cut short is not a finished epoch.

Lightning ends every pass of its epoch loop alike: it counts the epoch as processed and completed and
calls ``on_train_epoch_end``, also when ``max_steps``, ``max_time`` or another requested stop ended it
before its last batch. A checkpoint written after that says the epoch was finished, so a fit resumed
from it starts the next epoch and never trains the batches the stop left (with ``max_epochs`` reached,
it trains nothing at all), and ``trainer.current_epoch`` (results.json's ``epoch``) counts an epoch
that was not trained to its end. ``uncount_cut_short_epoch`` takes that count back once the loop has
ended, so the trainer, results.json and last.ckpt say "inside epoch N, after batch k"; Lightning
resumes such a checkpoint inside the epoch, and the training loader
(``rm_lightning.pairs.sampling.ResumableLoader``) goes on from batch k.
"""

from __future__ import annotations


def epoch_cut_short(trainer) -> bool:
    """Whether fit's loop counted its current epoch as processed although a stop ended it before its last batch.

    True from that epoch's ``on_train_epoch_end`` until ``uncount_cut_short_epoch``. An epoch that ran
    out of batches, or that ``on_train_batch_start`` ended by returning -1, has its last batch marked.
    """
    fit_loop = trainer.fit_loop
    batches = fit_loop.epoch_loop.batch_progress
    epochs = fit_loop.epoch_progress.current
    return (epochs.ready > 0 and epochs.processed == epochs.ready and not batches.is_last_batch
            and 0 < batches.current.ready < trainer.num_training_batches)


def uncount_cut_short_epoch(trainer) -> None:
    """After fit's loop ended (``on_train_end``): an epoch a stop cut short is processed no more, so
    ``trainer.current_epoch`` is the epoch that was being trained and a checkpoint resumes inside it.

    Idempotent: every callback that reads the epoch at the end of fit may call it first, in any order.
    """
    if not epoch_cut_short(trainer):
        return
    progress = trainer.fit_loop.epoch_progress
    if progress.current.completed != progress.current.processed:
        return  # still inside on_train_epoch_end: Lightning counts the epoch completed after it
    for counts in (progress.current, progress.total):
        counts.processed -= 1
        counts.completed -= 1


def resume_at_the_next_epoch(trainer, checkpoint: dict) -> None:
    """A checkpoint written at an epoch's end (``on_train_epoch_end``: the epoch processed, not yet counted
    completed) resumes at the next epoch's first batch.

    Lightning does so only when ``max_steps`` is -1. With a ``max_steps`` it restarts such a checkpoint as one
    from inside the epoch: it trains one batch more in that epoch, then one epoch fewer than ``max_epochs``
    asks, and the last epoch's evaluation never runs. Rewritten here (before the loops are restored) to what
    it means, the epoch completed and no batch of the next one begun, it resumes alike with or without.
    """
    if trainer is None or trainer.max_steps == -1:
        return
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return
    current = epochs["current"]
    if not current["ready"] == current["started"] == current["processed"] == current["completed"] + 1:
        return
    for counts in (epochs["current"], epochs["total"]):
        counts["completed"] = counts["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
