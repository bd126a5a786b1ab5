"""Stop training when training accuracy stops rising, then evaluate once.

The paper trains its real-world reward models for a fixed 5 epochs at its learning rate; another
backbone, learning rate or data size fits its training pairs sooner or later, so a fixed count either
spends epochs on a model that has stopped learning or stops one that has not. This stops at the end of
the first epoch whose accuracy over the training batches is high enough (``threshold``) or has not
beaten the best earlier epoch by ``min_delta`` for ``patience`` epochs, and runs the final evaluation
there.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from rm_lightning.callbacks.margin_history import stop_after_validation


class TrainingPlateau(L.Callback):
    """End fit once training accuracy plateaus.

    Judged at the last training batch of each epoch on the accuracy over all that epoch's training
    batches (``train/epoch_accuracy``, which TensorBoard shows per epoch), so the stop can evaluate
    every eval set right away, even when ``check_val_every_n_epoch`` skips that epoch.

    Args:
        min_delta: the gain over the best earlier epoch that counts as still rising.
        patience: epochs in a row without that gain before stopping.
        threshold: stop once an epoch reaches this accuracy (nothing left to rise to); None: never.
        min_epochs: never stop before this many epochs.
    """

    def __init__(self, min_delta: float = 0.01, patience: int = 1, threshold: Optional[float] = 0.98,
                 min_epochs: int = 1):
        if min_delta < 0 or patience < 1 or min_epochs < 1:
            raise ValueError(f"TrainingPlateau: min_delta must be >= 0, patience and min_epochs >= 1 "
                             f"(got {min_delta}, {patience}, {min_epochs})")
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"TrainingPlateau: threshold must be in (0, 1] or null, got {threshold}")
        self.min_delta, self.patience, self.threshold, self.min_epochs = min_delta, patience, threshold, min_epochs
        self.history: list[float] = []  # training accuracy per finished epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            return
        self.history.append(float(pl_module.epoch_train_accuracy.compute()))  # every rank: a collective sum
        reason = self.reason_to_stop()
        if reason is not None:
            rank_zero_info(f"training plateau: stopping after epoch {trainer.current_epoch} ({reason}); "
                           f"training accuracy per epoch {', '.join(f'{a:.3f}' for a in self.history)}")
            stop_after_validation(trainer, pl_module)

    def reason_to_stop(self) -> Optional[str]:
        """Why the epochs in ``history`` call for a stop, or None to go on."""
        epochs = len(self.history)
        if epochs < self.min_epochs:
            return None
        latest = self.history[-1]
        if self.threshold is not None and latest >= self.threshold:
            return f"training accuracy {latest:.3f} >= threshold {self.threshold}"
        if epochs <= self.patience:
            return None
        best_before = max(self.history[:-self.patience])
        if max(self.history[-self.patience:]) < best_before + self.min_delta:
            return (f"no epoch of the last {self.patience} beat {best_before:.3f} by {self.min_delta}")
        return None

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
