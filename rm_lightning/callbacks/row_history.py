"""A callback's rows over a fit, as a CSV and a plot in the run directory: what the margin history and the
dynamics monitor share, so both survive interruption, resuming and a disk that refuses the plot alike."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.errors import OutputWriteError
from rm_lightning.files import write_csv_atomically


class RowHistory(L.Callback):
    """Subclasses append dicts to ``rows`` and say how they are plotted (``plot``) under ``filename``."""

    csv_columns: tuple[str, ...] = ()

    def __init__(self, filename: str):
        self.filename = filename
        self.rows: list[dict] = []

    def plot(self, path: Path) -> None:
        raise NotImplementedError

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """An interrupted or failed fit keeps the rows it has (a start that failed has none). Not an evaluation
        that failed: the rows it holds are the fit's own, restored from the checkpoint it scores."""
        if isinstance(exception, OutputWriteError) and f"{self.filename}.csv: " in str(exception):
            return  # its own file is what failed, at the end of fit: no second try, no second message
        if self.rows and trainer.state.fn == TrainerFn.FITTING:
            try:
                self.write(run_dir(trainer))
            except OutputWriteError as err:  # raised here, it would stand in for the exception that ended the run
                rank_zero_warn(str(err))

    def state_dict(self) -> dict:
        """The rows travel in checkpoints, so a resumed fit writes the whole history, not only its own."""
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = [dict(row) for row in state_dict.get("rows", [])]

    @rank_zero_only
    def write(self, directory: Path) -> None:
        """The CSV, then the plot; a plot that cannot be written (a full disk, no backend) is a warning: the
        figures are in the CSV, and a finished fit must not end as failed."""
        directory.mkdir(parents=True, exist_ok=True)
        write_csv_atomically(directory / f"{self.filename}.csv", self.rows, self.csv_columns)
        if not self.rows:
            return
        try:
            self.plot(directory / f"{self.filename}.png")
        except Exception as err:  # noqa: BLE001 - the plot is a convenience
            rank_zero_warn(f"could not write {directory / self.filename}.png ({type(err).__name__}: {err}); "
                           f"the figures are in {self.filename}.csv")
