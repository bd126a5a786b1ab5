"""Watch the reward margins move: TensorBoard scalars and histograms, then a CSV and a PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from lightning.pytorch.utilities import rank_zero_only

from rm_lightning.callbacks.peak_memory import describe, peak_memory
from rm_lightning.callbacks.phase_times import describe_timings, phase_timings
from rm_lightning.callbacks.row_history import RowHistory
from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.files import save_figure_atomically
from rm_lightning.metrics.keys import EVAL_METRICS, TRAIN_METRICS, TRAIN_SET, train_key
from rm_lightning.perf.sharding import unsharded_class

CSV_COLUMNS = ("step", "epoch", "set", "split") + EVAL_METRICS


class MarginHistory(RowHistory):
    """Record reward means and margins during training and each eval set at every validation.

    Scalars are logged by the module, on the CSV's step (this callback gives training batches theirs);
    this callback adds a histogram of margins per eval set to TensorBoard and, at the end of fit,
    writes ``margin_history.csv`` and ``margin_history.png`` (eval margins, train-batch margin and
    accuracy over steps, one line per eval set, titled with the run and its RM type) to the run
    directory, and prints the final metrics of every eval set and the run's peak memory. The rows are
    saved in checkpoints, so a run resumed with ``--ckpt_path`` writes the whole history.

    Args:
        filename: stem of the CSV and PNG.
        validate_at_start: run Lightning's validation loop once before the first training step of a
            fit that starts from step 0, so every curve starts at step 0 (the margins of the model before
            training; an IM-RM's rewards are exactly 0 there, its policy being its reference). It costs
            one evaluation of every eval set, those on an ``eval_every_n_epochs`` schedule included;
            off, the first point is the first scheduled validation.
    """

    csv_columns = CSV_COLUMNS

    def __init__(self, filename: str = "margin_history", validate_at_start: bool = True):
        super().__init__(filename)
        self.validate_at_start = validate_at_start
        self._title = ""

    def setup(self, trainer, pl_module, stage: str) -> None:
        run_dir(trainer)  # collective: resolve the run directory on every rank now
        self._title = run_title(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.validate_at_start and trainer.global_step == 0 and trainer.enable_validation:
            validate_now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        if all(train_key(name) in metrics for name in ("chosen_reward", "rejected_reward", "margin")):
            row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "set": TRAIN_SET, "split": TRAIN_SET}
            for name in TRAIN_METRICS:
                if train_key(name) in metrics:
                    row[name] = float(metrics[train_key(name)])
            self.rows.append(row)
        # the x-axis of this batch's logged scalars: the CSV row's step (Lightning's own is the count of optimizer
        # steps before the batch, one less, so TensorBoard and the CSV disagreed by one). Logged as ``step``, which
        # Lightning takes as the step and does not log; ``epoch``, which it then no longer adds, is kept.
        pl_module.log_dict({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch)},
                           on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The epoch's scalars (``train/epoch_accuracy``) at its last batch's step, the CSV's, as Lightning puts
        them at its own last step. ``sync_dist``: the same on every rank, but Lightning warns on an epoch value
        without it under several processes."""
        pl_module.log("step", float(trainer.global_step), on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._record_eval(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._record_eval(trainer, pl_module, "test")

    def _record_eval(self, trainer, pl_module, split: str) -> None:
        experiment = _tensorboard(trainer)
        for name, values in pl_module.eval_sets.last.items():
            row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "set": name, "split": split}
            row.update({key: float(values[key]) for key in EVAL_METRICS if key in values})
            self.rows.append(row)
            margins = values.get("margins")
            if experiment is not None and margins is not None and margins.numel() and trainer.is_global_zero:
                step = pl_module.eval_sets.last_step  # a validate/test run's: its checkpoint's (not the trainer's 0)
                experiment.add_histogram(f"{split}/{name}/margins", margins.float().cpu(), step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(run_dir(trainer))
        name = unsharded_class(pl_module).__name__
        evaluated = next((row["step"] for row in reversed(self.rows) if row["split"] != TRAIN_SET), None)
        heading = (f"\nfinal evaluation ({name})" if evaluated == trainer.global_step else
                   f"\nlast evaluation ({name}), at step {evaluated}: none ran at the last step, "
                   f"{trainer.global_step}")
        # collective: every rank measures
        self._print_final(pl_module, peak_memory(trainer), heading, phase_timings(trainer))

    def plot(self, path: Path) -> None:
        plot_history(self.rows, path, self._title)

    @rank_zero_only
    def _print_final(self, pl_module, peaks: dict, heading: str, timings: Optional[dict] = None) -> None:
        last = pl_module.eval_sets.last
        indent = "  " if last else ""
        time_line = f"\n{indent}{describe_timings(timings)}" if timings else ""
        if not last:
            print(f"\n{describe(peaks)}{time_line}")
            return
        print(heading)
        print(f"  {'eval set':<32} {'accuracy':>9} {'norm. margin':>13} {'chosen r':>10} {'rejected r':>11}")
        for name, v in last.items():
            print(f"  {name:<32} {float(v['accuracy']):>9.3f} {float(v['normalized_margin']):>13.3f} "
                  f"{float(v['chosen_reward']):>10.4f} {float(v['rejected_reward']):>11.4f}")
        print(f"  {describe(peaks)}{time_line}")


def validate_now(trainer) -> None:
    """Run the fit's validation loop once now, as Lightning does when ``val_check_interval`` is due:
    the same loop, logging, callbacks and eval-set schedule (all ranks together)."""
    connector = trainer._logger_connector
    first_loop_iter = connector._first_loop_iter
    trainer.validating = True
    trainer.fit_loop.epoch_loop.val_loop.run()
    trainer.training = True
    connector._first_loop_iter = first_loop_iter


def stop_after_validation(trainer, pl_module) -> None:
    """End fit after this training batch with an evaluation of the final weights.

    Lightning validates before a requested stop (``trainer.should_stop``), but only in an epoch that
    ``check_val_every_n_epoch`` lets validate; in any other this runs the loop itself, once per step
    however many callbacks ask. Every eval set is due at a stop (``metrics/eval_sets.is_due``).
    """
    trainer.should_stop = True
    skipped_epoch = not trainer.fit_loop.epoch_loop._should_check_val_epoch()
    if trainer.enable_validation and skipped_epoch and pl_module.eval_sets.last_step != trainer.global_step:
        validate_now(trainer)


def is_last_batch_of_fit(trainer, batch_idx: int) -> bool:
    """Whether this training batch ends the last epoch ``max_epochs`` allows."""
    last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


def run_title(trainer, pl_module) -> str:
    """``<experiment>/<version> · <RM type> · <backbone>``: which run the plot belongs to."""
    from rm_lightning.callbacks.results import ResultsWriter

    directory = run_dir(trainer)
    names = [c.config_name for c in trainer.callbacks if isinstance(c, ResultsWriter) and c.config_name]
    experiment = names[0] if names else (directory.parent.parent.name or directory.parent.name)
    backbone = getattr(pl_module, "hparams", {}).get("backbone")
    return " · ".join(part for part in (f"{experiment}/{directory.name}", unsharded_class(pl_module).__name__,
                                        str(backbone) if backbone else "") if part)


def _tensorboard(trainer):
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):
            return experiment
    return None


def plot_history(rows: list[dict], path: Path, title: str = "") -> None:
    """Three panels over optimizer steps, one legend for all: the eval sets' normalized margins (signed,
    solid; absolute, dotted), the training batches' raw margin (reward units, on its own axis: it is not
    normalized) and the pairwise accuracy of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from matplotlib.ticker import MaxNLocator

    fig, (ax_eval, ax_train, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    ax_eval.xaxis.set_major_locator(MaxNLocator(integer=True))
    sets = sorted({r["set"] for r in rows if r["split"] != TRAIN_SET})
    train = [r for r in rows if r["split"] == TRAIN_SET]
    handles = []
    if train:
        steps = [r["step"] for r in train]
        ax_train.plot(steps, [r.get("margin", math.nan) for r in train], color="0.45", lw=1)
        ax_acc.plot(steps, [r.get("accuracy", math.nan) for r in train], color="0.7", lw=1)
        handles.append(Line2D([], [], color="0.6", lw=1, label="train batches"))
    for index, name in enumerate(sets):
        color = f"C{index % 10}"
        points = [r for r in rows if r["set"] == name and r["split"] != TRAIN_SET]
        steps = [r["step"] for r in points]
        ax_eval.plot(steps, [r.get("signed_normalized_margin", math.nan) for r in points], marker="o", color=color)
        ax_eval.plot(steps, [r.get("normalized_margin", math.nan) for r in points], ls=":", color=color)
        ax_acc.plot(steps, [r.get("accuracy", math.nan) for r in points], marker="o", color=color)
        handles.append(Line2D([], [], color=color, marker="o", label=name))
    if sets:
        handles += [Line2D([], [], color="0.3", marker="o", label="signed (r+ - r-) / sd(r)"),
                    Line2D([], [], color="0.3", ls=":", label="absolute |r+ - r-| / sd(r)")]
    ax_eval.axhline(0, color="0.5", ls="-", lw=0.6)
    ax_eval.set(title="eval sets: normalized reward margin", xlabel="optimizer step", ylabel="margin / sd(r)")
    ax_train.axhline(0, color="0.5", ls="-", lw=0.6)
    ax_train.set(title="training batches: mean margin r+ - r-", xlabel="optimizer step", ylabel="reward units")
    ax_acc.set(title="pairwise accuracy", xlabel="optimizer step", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax_acc.axhline(0.5, color="0.5", ls=":", lw=1)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    rows_of_legend = math.ceil(len(handles) / 4) if handles else 0
    fig.tight_layout(rect=(0, 0.04 * rows_of_legend + 0.02, 1, 1))
    save_figure_atomically(fig, path)
    plt.close(fig)
