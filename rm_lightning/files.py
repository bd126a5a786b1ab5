"""Every file rm-lightning writes is written atomically: staged beside its target, then renamed.

A crash, a full disk or Ctrl-C while writing leaves the previous file (or none), never half a
file, and a reader never sees a partial one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rm_lightning.errors import OutputWriteError, first_line


@contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(staging_path)``, then move the staged file into place."""
    with staged(path) as staging:
        write(staging)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """A text output (results.json, a CSV, predictions.jsonl): a full disk or a read-only folder is one
    ``OutputWriteError`` line naming the file, not an ``OSError`` traceback after the run's work is done."""
    try:
        return write_atomically(path, lambda staging: staging.write_text(text))
    except OSError as err:
        raise write_refused(path, err) from err


def write_refused(path: str | os.PathLike, err: Exception, error: type[OutputWriteError] = OutputWriteError,
                  what: str = "") -> OutputWriteError:
    """The one line for an output the disk refused: the file, why, and the free space where it goes."""
    return error(f"{path}: {what}could not be written ({write_failure(err)}); {free_space(path)} free on its disk; "
                 f"the previous one, if any, is unchanged")


def write_failure(err: Exception) -> str:
    """Why a write failed, in a few words: the OS's reason, else the first line of torch's writer, whose reason
    comes after where in its C++ it failed (``[enforce fail at x.cc:778] . ``)."""
    return getattr(err, "strerror", None) or re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first_line(err))


def free_space(path: str | os.PathLike) -> str:
    """Free space where ``path`` goes, in GiB: a full disk is the usual reason a file cannot be written."""
    try:
        return f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30:.1f} GiB"
    except OSError:
        return "unknown space"


def write_json_atomically(path: str | os.PathLike, record: Any) -> Path:
    """Strict JSON (no NaN): callers turn non-finite floats into null first."""
    return write_text_atomically(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as CSV with the given columns (missing values and None as empty cells)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def write_csv_atomically(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    return write_text_atomically(path, csv_text(rows, columns))


def save_figure_atomically(figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    return write_atomically(path, lambda staging: figure.savefig(staging, dpi=dpi))


def write_directory_atomically(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(staging_folder)``, then rename the folder to ``target``.

    When another process finished the same folder first, its copy is kept and this one dropped:
    the callers write folders whose content depends only on their inputs (a converted model).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir() or not any(target.iterdir()):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
