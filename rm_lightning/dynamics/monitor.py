"""``DynamicsMonitor``: watch, during training, why each eval set's margins move.

At step 0 and every N optimizer steps, on a fixed seeded probe subset of each eval set, it
records the margin change the real optimizer step produced, and beside it the first-order
analysis of one plain gradient step on the same training batch (``one_step.one_step_changes``):
the eNTK prediction for every RM type, the EX-RM's hidden-similarity term, the IM-RM's
matching- and non-matching-token terms. Logged to TensorBoard as ``dynamics/<set>/<quantity>``
(means over the probe pairs), written to ``dynamics.csv`` and plotted in ``dynamics.png``.

Each check costs a gradient of the training batch and a few forwards per eval set (one of them
forward-mode), so it is opt-in (``configs/callbacks/dynamics.yaml``) and reports its own time at
the end of fit.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rm_lightning.callbacks.row_history import RowHistory
from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.dynamics.one_step import one_step_changes, probe_rewards
from rm_lightning.errors import RMLightningError
from rm_lightning.files import save_figure_atomically
from rm_lightning.pairs.contract import preference_data_of
from rm_lightning.pairs.records import EncodedPair

QUANTITIES = ("real_margin_change", "sgd_margin_change", "ntk_margin_change", "hidden_similarity", "matching",
              "non_matching")
CSV_COLUMNS = ("step", "epoch", "set", "eta", "probe_pairs", *QUANTITIES, "seconds")
LABELS = {"real_margin_change": "real optimizer step", "sgd_margin_change": "SGD step (measured)",
          "ntk_margin_change": "first order (eNTK)", "hidden_similarity": "EX-RM: hidden similarity",
          "matching": "IM-RM: matching tokens", "non_matching": "IM-RM: non-matching tokens"}


@dataclass
class PendingCheck:
    """A check begun before an optimizer step, finished after it."""

    step: int
    epoch: int
    eta: float
    before: dict[str, torch.Tensor]
    rows: dict[str, dict]
    seconds: float  # spent on the check before the optimizer step


class DynamicsMonitor(RowHistory):
    """Log why margins move: real margin changes beside the one-step first-order analysis.

    Args:
        every_n_steps: check at optimizer step 0 and every N steps after.
        probe_pairs: pairs drawn (seeded) from each eval set and kept for the whole run.
        seed: the draw's seed.
        eta: step size of the analysed plain gradient step; default: the optimizer's current
            learning rate (the real step is the optimizer's own, e.g. Adam's, so it differs).
        filename: stem of the CSV and PNG written to the run directory.
    """

    csv_columns = CSV_COLUMNS

    def __init__(self, every_n_steps: int = 5, probe_pairs: int = 16, seed: int = 0, eta: Optional[float] = None,
                 filename: str = "dynamics"):
        if every_n_steps < 1 or probe_pairs < 1 or (eta is not None and not eta > 0):
            raise RMLightningError(f"DynamicsMonitor: every_n_steps and probe_pairs must be at least 1 and eta "
                                   f"positive (got {every_n_steps}, {probe_pairs}, {eta})")
        self.every_n_steps, self.probe_pairs, self.seed, self.eta = every_n_steps, probe_pairs, seed, eta
        super().__init__(filename)
        self.probes: dict[str, list[EncodedPair]] = {}
        self.pending: PendingCheck | None = None
        self.seconds = 0.0
        self._fit_started = 0.0

    # --- hooks -----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            raise RMLightningError(f"DynamicsMonitor needs one process (this run has {trainer.world_size}): its "
                                   f"one-step analysis steps and restores the full weights; drop it or use 1 device")
        run_dir(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:
        data = preference_data_of(trainer)
        if data is None:
            raise RMLightningError("DynamicsMonitor needs a data module with named eval sets (PreferenceData)")
        sets = {name: dataset for name, dataset in data.encoded_sets().items() if name != "train" and len(dataset)}
        rng = random.Random(self.seed)
        self.probes = {name: [dataset.pairs[i] for i in sorted(rng.sample(range(len(dataset)),
                                                                          min(self.probe_pairs, len(dataset))))]
                       for name, dataset in sets.items()}
        self._fit_started = time.monotonic()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.pending is not None or step % self.every_n_steps or any(r["step"] == step for r in self.rows):
            return
        started = time.monotonic()
        eta = self.eta if self.eta is not None else trainer.optimizers[0].param_groups[0]["lr"]
        context = trainer.precision_plugin.forward_context
        before, rows = {}, {}
        changes = one_step_changes(pl_module, batch, self.probes, eta, predict_rewards=False, context=context)
        for name, change in changes.items():
            before[name] = change.before
            rows[name] = {"sgd_margin_change": change.measured_margin.mean().item(),
                          "ntk_margin_change": change.predicted_margin.mean().item(),
                          **{key: value.mean().item() for key, value in change.output_layer.items()}}
        self.pending = PendingCheck(step, trainer.current_epoch, eta, before, rows, time.monotonic() - started)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pending = self.pending
        if pending is None or trainer.global_step <= pending.step:  # no optimizer step yet (accumulation)
            return
        resumed = time.monotonic()
        was_training = pl_module.training
        pl_module.eval()
        metrics = {}
        for name, pairs in self.probes.items():
            probe = {k: v.to(pl_module.device) for k, v in pl_module.collator()(pairs).items()}
            after = probe_rewards(pl_module, probe)  # in the weights' precision, as ``before`` (one_step.probe_change)
            change = after - pending.before[name]
            row = {"step": pending.step, "epoch": pending.epoch, "set": name, "eta": pending.eta,
                   "probe_pairs": len(pairs), "real_margin_change": (change[:, 0] - change[:, 1]).mean().item(),
                   **pending.rows[name]}
            self.rows.append(row)
            metrics.update({f"dynamics/{name}/{key}": row[key] for key in QUANTITIES if key in row})
        pl_module.train(was_training)
        seconds = pending.seconds + time.monotonic() - resumed
        self.seconds += seconds
        for row in self.rows[-len(self.probes):]:
            row["seconds"] = round(seconds, 3)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=pending.step)
        self.pending = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(run_dir(trainer))
        total = time.monotonic() - self._fit_started
        checks = len({row["step"] for row in self.rows})
        if trainer.is_global_zero and checks:
            print(f"\ndynamics monitor: {checks} checks of {sum(len(p) for p in self.probes.values())} probe pairs "
                  f"took {self.seconds:.0f} s, {self.seconds / max(total, 1e-9):.0%} of fit "
                  f"({run_dir(trainer) / self.filename}.csv, .png)")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A check cut short by the stop is dropped; the finished ones are kept (``RowHistory``)."""
        self.pending = None
        super().on_exception(trainer, pl_module, exception)

    @property
    def state_key(self) -> str:
        """One per output file: two monitors of a run (another eta, another filename) keep their own rows."""
        return self._generate_state_key(filename=self.filename)

    def plot(self, path: Path) -> None:
        plot_dynamics(self.rows, path)


def eta_label(rows: list[dict]) -> str:
    """The analysed step size: one, or the range a learning-rate schedule gave it over the checks."""
    low, high = min(row["eta"] for row in rows), max(row["eta"] for row in rows)
    return f"eta = {low:.2g}" if low == high else f"eta = {low:.2g} to {high:.2g}"


def plot_dynamics(rows: list[dict], path: Path) -> None:
    """Per eval set: the real step's mean margin change (top) and the SGD step's terms (bottom), over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sets = list(dict.fromkeys(row["set"] for row in rows))
    fig, axes = plt.subplots(2, len(sets), figsize=(3.6 * len(sets), 6.4), squeeze=False, sharex=True)
    for column, name in enumerate(sets):
        points = [row for row in rows if row["set"] == name]
        steps = [row["step"] for row in points]
        top, bottom = axes[0][column], axes[1][column]
        top.plot(steps, [row["real_margin_change"] for row in points], marker="o", color="black",
                 label=LABELS["real_margin_change"])
        for key in QUANTITIES[1:]:
            values = [row.get(key, math.nan) for row in points]
            if not all(math.isnan(v) for v in values):
                bottom.plot(steps, values, marker="o", label=LABELS[key])
        for axis in (top, bottom):
            axis.axhline(0.0, color="0.6", lw=0.8)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.set_title(name, fontsize=9)
        bottom.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("mean margin change")
    axes[1][0].set_ylabel(f"one SGD step ({eta_label(rows)})")
    handles, labels = [], []
    for axis in (axes[0][0], axes[1][0]):
        h, lab = axis.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Why margins move: each eval set's probe pairs, before and after an optimizer step")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    save_figure_atomically(fig, path)
    plt.close(fig)
