"""The run directory: where a run's TensorBoard events, CSVs, plots, checkpoints and results.json go.

Two runs never share one. Lightning's loggers pick ``version_N`` by listing the folder, so two
runs started together both take ``version_0``; here a run claims its version with ``os.mkdir``
(atomic: exactly one process creates a folder) and takes the next number when it lost. A run
then holds its directory with a lock file naming its process, so a second run pointed at the
same fixed directory (a sweep re-run, ``logger.version`` given) fails in one line while the
first is alive. A start that fails before training leaves no directory behind.

A run directory belongs to the run that trained in it. ``validate``, ``test`` and ``predict`` started
from that run's config.yaml inherit its directory when the config pins one (a sweep's does, as absolute
paths): they take the next ``version_N`` under it instead, so their results.json, config.yaml and
events never replace the training run's.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from rm_lightning.errors import SettingError

LOCK_FILENAME = ".run.lock"
DEFAULT_LOGGER_NAME = "lightning_logs"  # TensorBoardLogger's default name: the folder of a run's versions
# what a run writes before its first training step; a directory holding nothing else is an unused start
START_FILES = re.compile(r"(config\.yaml|hparams\.yaml|events\.out\.tfevents\..*|\.run\.lock)")
_VERSION = re.compile(r"version_(\d+)")


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


def claim_version(root: str | os.PathLike) -> int:
    """Create ``root/version_N`` for the first free N (after every existing one) and return N."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name))]
    version = max(numbers, default=-1) + 1
    while True:
        try:  # makedirs: a failed start beside this one may have just removed an empty root
            os.makedirs(root / f"version_{version}")
            return version
        except FileExistsError:
            version += 1


def holder_of(directory: Path) -> Optional[int]:
    """The live process holding ``directory`` (its lock file names it), or None."""
    try:
        pid = int((directory / LOCK_FILENAME).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale lock: its process is gone
    except PermissionError:
        return pid
    return pid


class RunClaim:
    """This process's claim on a run directory: its lock file, and whether the directory was new."""

    def __init__(self, directory: Path, created: bool):
        self.directory, self.created = Path(directory), created
        holder = holder_of(self.directory)
        # a sweep locks a run's directory for the child it launches (sweep.hold): the child takes the lock over
        if holder is not None and holder not in (os.getpid(), os.getppid()):
            raise SettingError(f"run directory {self.directory} is in use by process {holder}; wait for it to end, "
                               f"stop it, or choose another trainer.default_root_dir")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / LOCK_FILENAME).write_text(f"{os.getpid()}\n")
        atexit.register(self.release)

    def release(self) -> None:
        release_lock(self.directory)

    def release_after_failed_start(self) -> None:
        """Remove the directory if this run created it and wrote nothing of its own there, else unlock it."""
        self.release()
        if self.created and self.directory.is_dir() and is_unused(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
            if self.directory.parent.name == DEFAULT_LOGGER_NAME:  # the versions' folder, if no run is left in it
                try:
                    self.directory.parent.rmdir()
                except OSError:
                    pass


def release_lock(directory: Path) -> None:
    """Remove ``directory``'s lock file if this process wrote it (another's, or none, is left as it is)."""
    lock = directory / LOCK_FILENAME
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass


def is_unused(directory: Path) -> bool:
    """Nothing in ``directory`` but what every start writes (config, hparams, TensorBoard events, the lock)."""
    return all(p.is_file() and START_FILES.fullmatch(p.name) for p in directory.iterdir())


EVALUATIONS = ("validate", "test", "predict")


def claim_logger_directory(logger, subcommand: Optional[str] = None, callbacks: tuple = ()) -> Optional[RunClaim]:
    """Give ``logger`` (TensorBoard or CSV, Lightning's) a directory no other run uses, and hold it.

    A logger without a version gets a freshly created ``version_N``; one with a fixed version
    (e.g. a sweep's) keeps it, and fails in one line if a live process holds it. A logger without a root
    directory (none, or the stand-in ``fast_dev_run`` puts in place of the configured one) claims nothing.

    An evaluation (``subcommand`` validate, test or predict) whose fixed directory already holds files
    (the training run whose config.yaml it started from) takes a fresh ``version_N`` under the logger's
    root instead, and ``callbacks`` that would write into that directory (``dirpath``, as results.json's
    writer has in a sweep's config) follow it: a fit in that directory (a sweep resuming) keeps it.
    """
    if getattr(logger, "root_dir", None) is None or not hasattr(logger, "_version"):
        return None
    created, taken = False, None
    if logger._version is not None and subcommand in EVALUATIONS and holds_files(Path(logger.log_dir)):
        taken = Path(logger.log_dir).resolve()
        logger._version = None
        for callback in callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if isinstance(dirpath, (str, os.PathLike)) and Path(dirpath).resolve() == taken:
                callback.dirpath = None  # the run directory, claimed below
    if logger._version is None:
        logger._version = claim_version(logger.root_dir)
        created = True
        if taken is not None:
            print(f"{subcommand}: {taken} holds the run this config comes from; this {subcommand} writes in "
                  f"{Path(logger.log_dir).resolve()}", file=sys.stderr, flush=True)
    return RunClaim(Path(logger.log_dir), created)


def claim_loggerless_directory(trainer, subcommand: Optional[str]) -> Optional[RunClaim]:
    """Give a run without a logger (``trainer.logger: false``) its own ``lightning_logs/version_N`` too.

    Without a logger Lightning writes checkpoints, and the callbacks results.json, straight into
    ``default_root_dir``: a second run with the same root replaced the first one's, and ``--ckpt_path
    last`` found neither. The run's root becomes the claimed directory, so everything it writes lands
    there exactly as with a logger, less the event files. ``fast_dev_run`` (a smoke test) and a CLI built
    without a subcommand (the analysis commands only build a model) keep the root.
    """
    if trainer.loggers or trainer.fast_dev_run or subcommand is None:
        return None
    root = Path(trainer.default_root_dir) / DEFAULT_LOGGER_NAME
    directory = root / f"version_{claim_version(root)}"
    trainer._default_root_dir = str(directory)  # Lightning's own field behind trainer.default_root_dir
    return RunClaim(directory, created=True)


def newest_run_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """``checkpoints/last.ckpt`` of the highest ``version_N`` under a runs root that has one (None if none)."""
    runs = {int(match.group(1)): ckpt
            for ckpt in Path(root).glob(f"{DEFAULT_LOGGER_NAME}/version_*/checkpoints/last.ckpt")
            if (match := _VERSION.fullmatch(ckpt.parent.parent.name))}
    return runs[max(runs)] if runs else None


def holds_files(directory: Path) -> bool:
    try:
        return any(directory.iterdir())
    except OSError:
        return False
