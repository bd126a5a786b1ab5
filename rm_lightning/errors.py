"""One exception family and one way out: bad input ends in a single ``error: ...`` line and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERROR_STATUS = 2


class RMLightningError(Exception):
    """Bad user input: a missing file, a malformed record, an unknown name. Shown as one line."""


class DataError(RMLightningError):
    """A data file or record that cannot be used."""


class BackboneError(RMLightningError):
    """A backbone name or path that cannot be loaded."""


class OutputWriteError(RMLightningError):
    """A file of the run's (results.json, margin_history.csv, predictions.jsonl...) that the disk or its folder
    did not take (full, read-only). Unlike bad input it comes after the run did its work, so the run's record
    (results.json, ``failed``) is still written where it can be."""


class CheckpointWriteError(OutputWriteError):
    """A checkpoint the disk did not take (usually full)."""


def user_error_behind(err: BaseException | None) -> RMLightningError | None:
    """The bad-input error behind ``err``, if any: libraries (jsonargparse, Lightning) wrap errors raised
    in our ``__init__``s and hooks, so the cause chain is searched."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RMLightningError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library messages run long), or its type if it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def print_user_error(err: RMLightningError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return USER_ERROR_STATUS


def exit_status(main: Callable[..., int | None], *args) -> int:
    """A command's exit status from ``main(*args)``: bad input shown as one ``error:`` line and status 2.

    Every entry point (``cli.py``, sweep, report, prepare, the benchmark scripts) ends through here.
    """
    try:
        return main(*args) or 0
    except Exception as err:
        cause = user_error_behind(err)
        if cause is None:
            raise
        return print_user_error(cause)


class SettingError(RMLightningError, ValueError):
    """An option outside its allowed range (checked before any model is loaded)."""
