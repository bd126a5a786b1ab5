"""``results.json``: one machine-readable record per run, the unit that sweeps and reports work on.

``status`` is one of ``STATUSES``:

* ``finished``: fit ended as configured and the metrics come from an evaluation at its last step;
* ``not_evaluated``: fit ended, but no evaluation ran at its last step (validation off, or a
  schedule that skipped it): ``eval_sets`` holds the last evaluation there was, if any;
* ``interrupted``: Ctrl-C (KeyboardInterrupt) or SIGTERM stopped it; the last evaluation is kept;
* ``failed``: an exception stopped it after training had begun; the last evaluation is kept.

``stage`` is the command that wrote the record (``fit``, ``validate``, ``test``). Sweeps skip only
``finished`` fit records, and ``rm_lightning.report`` aggregates the fit records into the paper's tables
and win rates: a validate or test record evaluates a model trained by another run.

``global_step`` and ``epoch`` are those the evaluated weights were trained to: a fit's own; for
validate and test those of the checkpoint loaded (``checkpoint``), since Lightning restores only the
weights there and leaves the trainer at step 0. Without a checkpoint they are null, and
``steps_unknown`` says why.
"""

from __future__ import annotations

import math
import os
import re
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rm_lightning.callbacks.epoch_progress import uncount_cut_short_epoch
from rm_lightning.callbacks.generation_check import generation_summary
from rm_lightning.callbacks.margin_history import is_last_batch_of_fit, stop_after_validation
from rm_lightning.callbacks.peak_memory import peak_memory
from rm_lightning.callbacks.phase_times import phase_timings
from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.errors import OutputWriteError, user_error_behind
from rm_lightning.files import write_json_atomically
from rm_lightning.metrics.keys import EVAL_METRICS
from rm_lightning.pairs.contract import preference_data_of
from rm_lightning.perf.sharding import class_path_of, unsharded_class

RESULTS_FILENAME = "results.json"
STATUSES = ("finished", "not_evaluated", "interrupted", "failed")
FORMAT_VERSION = 1
VERSIONED_PACKAGES = ("torch", "lightning", "transformers", "rm-lightning")


class ResultsWriter(L.Callback):
    """Write results.json at the end of fit, after validate and test, and when a fit is interrupted or fails.

    ``validate`` and ``test`` also print one table of every eval set's metrics (the CLI turns
    Lightning's table per dataloader off).

    The metrics are the module's ``eval_sets.last`` (the last evaluation that ran), and the file
    says where they come from (``eval_source``, ``eval_step``). When ``max_steps`` ends a fit in
    the middle of an epoch, this callback asks Lightning to stop there (``trainer.should_stop``),
    which runs the validation Lightning runs before an early stop, and runs one itself in an epoch
    that ``check_val_every_n_epoch`` skips, the last epoch included: the final metrics then belong to
    the final weights (so ``check_val_every_n_epoch`` above ``max_epochs`` evaluates once, at the end). A
    start that fails before training (bad data, a bad option) writes no file.

    Args:
        dirpath: where to write; default: the run directory (the logger's version directory).
        filename: file name, ``results.json`` by default.
        config_name: the experiment's name, which reports group runs by; the CLI sets it to the stem
            of the first config file given (default: that of the first config file it parsed).
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = RESULTS_FILENAME,
                 config_name: Optional[str] = None):
        self.dirpath, self.filename, self.config_name = dirpath, filename, config_name
        self._started = time.monotonic()
        self._eval_source, self._eval_step = None, None
        self._peak_memory: Optional[dict] = None
        self._trained = False
        self._loaded_steps: Optional[tuple[Optional[int], Optional[int]]] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._started = time.monotonic()
        self._trained = False
        self._loaded_steps = None
        run_dir(trainer)  # collective: resolve the run directory on every rank now

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """validate/test/predict restore only the weights, so the trainer's step and epoch stay 0: the ones
        the weights were trained to are known only from the checkpoint, which Lightning hands over here."""
        self._loaded_steps = (checkpoint.get("global_step"), checkpoint.get("epoch"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._trained = True
        out_of_steps = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if out_of_steps or is_last_batch_of_fit(trainer, batch_idx):
            stop_after_validation(trainer, pl_module)  # Lightning does not validate at max_steps by itself

    def on_train_end(self, trainer, pl_module) -> None:
        uncount_cut_short_epoch(trainer)  # ``epoch``: the one a stop ended inside, not the next

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        before_any_work = not isinstance(user_error_behind(exception), (type(None), OutputWriteError))
        if before_any_work or (trainer.global_step == 0 and self._eval_step is None):
            return  # nothing ran: no results, and the run directory can be removed
        if isinstance(exception, SIGTERMException):
            status, reason = "interrupted", "SIGTERM: the process was asked to stop (kill, a scheduler, a sweep)"
        else:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            reason = f"{type(exception).__name__}: {exception}".strip().rstrip(":")
        # the command (fit, validate, test), not the loop that was running (a fit's "train" or "validate"):
        # sweeps and reports tell a training run's record from an evaluation's by it
        try:
            self.write(trainer, pl_module, stage=trainer.state.fn.value if trainer.state.fn else "fit",
                       status=status, reason=reason)
        except OutputWriteError as err:  # raised here, it would stand in for the exception that ended the run
            rank_zero_warn(str(err))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._eval_source = "sanity_check" if trainer.sanity_checking else "validation"
        self._eval_step = self.trained_steps(trainer)[0]
        if trainer.state.fn == "validate":  # a validate run (not fit's validations) ends here
            self._write_evaluation(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_source, self._eval_step = "test", self.trained_steps(trainer)[0]
        self._write_evaluation(trainer, pl_module, "test")

    def trained_steps(self, trainer) -> tuple[Optional[int], Optional[int], Optional[str]]:
        """(global step, epoch) the evaluated weights were trained to, and why they are unknown when they are.

        A fit's are the trainer's. Outside fit they are the loaded checkpoint's; with no checkpoint, the
        trainer's only when it trained the module itself (a ``test`` after ``fit`` in one process): a fresh
        trainer's 0 would claim that weights of unknown training had none.
        """
        if trainer.state.fn == "fit":
            return trainer.global_step, trainer.current_epoch, None
        if self._loaded_steps is not None:
            return *self._loaded_steps, None
        if trainer.global_step > 0:
            return trainer.global_step, trainer.current_epoch, None
        if trainer.ckpt_path:
            return None, None, f"the checkpoint {trainer.ckpt_path} holds no callback states (weights only)"
        return None, None, ("no checkpoint loaded (ckpt_path null): the weights as the config builds them, "
                            "trained for an unknown number of steps (none by this code)")

    def _write_evaluation(self, trainer, pl_module, stage: str) -> None:
        self._peak_memory = peak_memory(trainer)  # collective: every rank, before the rank-0 write
        self.write(trainer, pl_module, stage=stage)
        data = preference_data_of(trainer)
        tags = data.eval_set_tags if data is not None else {}
        print_final_table(stage, eval_set_metrics(pl_module.eval_sets.last, tags), self.path(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._peak_memory = peak_memory(trainer)
        evaluated_at_end = bool(pl_module.eval_sets.last) and self._eval_step == trainer.global_step
        reason = None if self._trained or trainer.ckpt_path is None else nothing_left_to_train(trainer)
        if reason:
            rank_zero_warn(reason)
        self.write(trainer, pl_module, stage="fit", status="finished" if evaluated_at_end else "not_evaluated",
                   reason=reason)

    def path(self, trainer) -> Path:
        return Path(self.dirpath) / self.filename if self.dirpath else run_dir(trainer) / self.filename

    @rank_zero_only
    def write(self, trainer, pl_module, stage: str, status: str = "finished", reason: Optional[str] = None) -> None:
        record = self.record(trainer, pl_module, stage, status)
        if reason:
            record["reason"] = reason
        write_json_atomically(self.path(trainer), _plain(record))

    def record(self, trainer, pl_module, stage: str, status: str = "finished") -> dict[str, Any]:
        assert status in STATUSES, status
        config, config_files = resolved_config(trainer, pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        data = preference_data_of(trainer)
        tags = data.eval_set_tags if data is not None else {}
        global_step, epoch, steps_unknown = self.trained_steps(trainer)
        return {
            "format_version": FORMAT_VERSION,
            "status": status,
            "stage": stage,
            "rm_type": unsharded_class(pl_module).__name__,  # under FSDP too, not its FSDP<Name> class
            "rm_class_path": class_path_of(pl_module),
            "backbone": pl_module.hparams.get("backbone"),
            "datamodule": type(datamodule).__name__ if datamodule is not None else None,
            "config_name": self.config_name or (Path(config_files[0]).stem if config_files else None),
            "config_files": config_files,
            "seed": global_seed(),
            # fit: the checkpoint it resumed from; validate/test: the weights evaluated
            "checkpoint": checkpoint_location(trainer.ckpt_path),
            "global_step": global_step,
            "epoch": epoch,
            **({"steps_unknown": steps_unknown} if steps_unknown else {}),
            "eval_source": self._eval_source,
            "eval_step": self._eval_step,
            "eval_sets": eval_set_metrics(pl_module.eval_sets.last, tags),
            # every check of the policy's generations (callbacks/generation_check.py): the correct rate of
            # the train and test prompts per epoch; None when the run has no generation check
            "generation_check": generation_summary(trainer),
            "wall_time_s": round(time.monotonic() - self._started, 3),
            # the run's peak resident memory (and peak CUDA memory on a GPU), the largest over its processes
            "peak_memory": self._peak_memory or peak_memory(),
            # wall seconds of a fit by phase (callbacks/phase_times.py); None outside a CLI fit
            "timings": phase_timings(trainer),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(self.path(trainer).parent.resolve()),
            "versions": package_versions(),
            "config": config,
        }


def nothing_left_to_train(trainer) -> str:
    """Why a fit resumed from a checkpoint ran no step: said in results.json and at the end, since Lightning's
    own line (max_epochs reached) reads like a run that trained, and the new run directory holds no training.
    It names only the limits that were reached: raising another one would train nothing either."""
    reached = []
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        reached.append(f"max_epochs ({trainer.max_epochs})")
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        reached.append(f"max_steps ({trainer.max_steps})")
    where = (f"no training step ran after resuming from {trainer.ckpt_path}: at step {trainer.global_step}, "
             f"epoch {trainer.current_epoch}")
    if not reached:
        return f"{where}, with max_epochs {trainer.max_epochs} and max_steps {trainer.max_steps}"
    if len(reached) == 1:
        return f"{where}, the run's {reached[0]} was already reached; raise it to train on"
    return f"{where}, the run's {' and '.join(reached)} were already reached; raise both to train on"


def checkpoint_location(ckpt_path) -> Optional[str]:
    """A local checkpoint as an absolute path (a record read from elsewhere still finds it); a URL as given."""
    if not ckpt_path:
        return None
    return str(ckpt_path) if "://" in str(ckpt_path) else os.path.abspath(ckpt_path)


def eval_set_metrics(last_eval: dict[str, dict], tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Plain floats per eval set (NaN becomes null, so the file stays strict JSON)."""
    sets = {}
    for name, values in last_eval.items():
        entry: dict[str, Any] = {"shift_tag": tags.get(name)}
        margins = values.get("margins")
        entry["num_pairs"] = int(margins.numel()) if margins is not None else None
        for key in EVAL_METRICS:
            if key in values:
                entry[key] = finite_or_none(float(values[key]))
        sets[name] = entry
    return sets


TABLE_COLUMNS = (("accuracy", "accuracy"), ("margin", "margin"), ("normalized_margin", "norm. margin"),
                 ("chosen_reward", "chosen r"), ("rejected_reward", "rejected r"), ("loss", "loss"))


def final_table(stage: str, sets: dict[str, dict[str, Any]]) -> str:
    """One table of every eval set's metrics (a row per set), as ``validate``/``test`` print it at the end."""
    width = max([len("eval set"), *map(len, sets)])
    header = f"{'eval set':<{width}}  {'tag':<15} {'pairs':>6}" + "".join(f" {title:>12}" for _, title in TABLE_COLUMNS)
    lines = [f"{stage} results", header, "-" * len(header)]
    for name, entry in sets.items():
        cells = "".join(f" {'-' if entry.get(key) is None else format(entry[key], '.4f'):>12}" for key, _ in TABLE_COLUMNS)
        lines.append(f"{name:<{width}}  {entry.get('shift_tag') or '-':<15} {entry.get('num_pairs') or 0:>6}{cells}")
    if not sets:
        lines.append("(no eval set was evaluated)")
    return "\n".join(lines)


@rank_zero_only
def print_final_table(stage: str, sets: dict[str, dict[str, Any]], path: Path) -> None:
    print(f"{final_table(stage, sets)}\nresults: {path}", flush=True)


def finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def global_seed() -> Optional[int]:
    """The seed given to ``seed_everything`` (LightningCLI's ``seed_everything`` sets it)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed not in (None, "") else None


def resolved_config(trainer, pl_module) -> tuple[dict[str, Any], list[str]]:
    """(the full config, the config files given), best source first.

    Under LightningCLI its SaveConfigCallback holds the parsed config; otherwise the
    ``config.yaml`` it wrote to the run directory; otherwise the module's and data's hparams.
    """
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            config = yaml.safe_load(callback.parser.dump(callback.config, skip_none=False))
            files = [os.path.abspath(str(p)) for p in (callback.config.get("config") or [])]
            return config, files
    saved = run_dir(trainer) / "config.yaml"
    if saved.is_file():
        return yaml.safe_load(saved.read_text()) or {}, []
    datamodule = getattr(trainer, "datamodule", None)
    return {"model": _plain(dict(pl_module.hparams)),
            "data": _plain(dict(getattr(datamodule, "hparams", {}) or {}))}, []


def _plain(value: Any) -> Any:
    """JSON-safe copy: containers kept, anything else as its repr."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return finite_or_none(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def package_versions() -> dict[str, Optional[str]]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = _source_tree_version() if package == "rm-lightning" else None
    return versions


def _source_tree_version(pyproject: Path = Path(__file__).resolve().parent.parent / "pyproject.toml") -> Optional[str]:
    """rm-lightning run from a checkout without ``pip install``: the version in pyproject.toml.

    Read as the first ``version = "..."`` line, the [project] table's, rather than with ``tomllib``,
    which Python 3.10 lacks."""
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.MULTILINE)
    except OSError:
        return None
    return found.group(1) if found else None
